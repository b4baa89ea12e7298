"""tvm_intlstm.tuning: block-form GEMM kernels + MetaSchedule design space, tuning database
(append-only, resumable), lookup for the compiler, and the failure modes (corrupt database,
foreign target). A handful of trials only: the real tuning runs are offline (tuning_logs/)."""
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir

from tvm_intlstm.kernels import build_kernel, resolve_isa
from tvm_intlstm.reference import ops as R
from tvm_intlstm.target import parse_target
from tvm_intlstm.tuning import (GemmTask, TuningLogError, TuningLogWarning, apply_tuning_logs,
                                gemm_blocks, register_intrinsics, schedule_gemm, tune)
from tvm_intlstm.tuning.cli import cli_tune
from tvm_intlstm.tuning.gemm import pack_weights
from tvm_intlstm.tuning.database import RECORD_FILE, WORKLOAD_FILE

from tvm.target import codegen  # noqa: E402

TARGET = f"llvm -mcpu={codegen.llvm_get_system_cpu()}"     # trials run here: tune for this CPU
HOST = parse_target(TARGET)
ISA = resolve_isa(HOST)
TASK = GemmTask(40, 20, "int16", 16, "test")      # odd sizes: K, O padding paths


def _data(N, K, O, dtype, extreme=False, seed=0):
    rng = np.random.default_rng(seed)
    if extreme:   # saturating accumulators and requantization, spec bounds (|W| <= 127)
        x = np.full((N, K), -128, np.int8)
        x[1::2] = 127
        W = np.where(rng.random((O, K)) < 0.5, -127, 127).astype(np.int8)
        b = rng.choice(np.array([-(2**30), 2**30, 0], np.int32), O).astype(np.int32)
        M = np.full(O, 2**31 - 1, np.int32)
        s = rng.integers(1, 3, O).astype(np.int32)
    else:
        x = rng.integers(-128, 128, (N, K)).astype(np.int8)
        W = rng.integers(-127, 128, (O, K)).astype(np.int8)
        b = rng.integers(-(2**20), 2**20, O).astype(np.int32)
        M = rng.integers(2**30, 2**31 - 1, O).astype(np.int32)
        s = rng.integers(8, 24, O).astype(np.int32)
    acc = R.linear_acc(x, W, b)
    if dtype == "int32":
        return (x, W, b), acc
    return (x, W, b, M, s), R.requantize(acc, M, s, int(dtype[3:]))


def _run(kernel, N, K, O, dtype, packed=True, **kw):
    inputs, ref = _data(N, K, O, dtype, **kw)
    if packed:
        inputs = (inputs[0], pack_weights(inputs[1])) + tuple(inputs[2:])
    args = [tvm.runtime.tensor(a) for a in inputs]
    args.append(tvm.runtime.empty((N, O), dtype, tvm.cpu()))
    kernel(*args)
    return args[-1].numpy(), ref


@pytest.mark.parametrize("K,O,dtype,nt,packed,order", [
    (40, 20, "int16", 4, True, 0), (37, 24, "int8", 2, False, 1), (64, 16, "int32", 8, False, 0),
    (37, 21, "int32", 1, True, 0)])
def test_block_kernel_bit_exact_symbolic_n(K, O, dtype, nt, packed, order):
    """One fixed point of the design space on the symbolic-N kernel: bit-exact for any row count
    (row tails, K and O padding) and at the extremes of the spec; pre-packed weights or packed per
    call (both loop orders)."""
    register_intrinsics()
    f = gemm_blocks(K, O, dtype, name="main", packed=packed)
    sch = s_tir.Schedule(tvm.IRModule({"main": f}), seed=3)
    schedule_gemm(sch, ISA, O, {"nt": nt, "unroll": 16, "pack": order})
    func = sch.mod["main"].with_attr("global_symbol", "gemm").with_attr("intlstm.isa", ISA)
    k = build_kernel(func, HOST)
    for N, extreme in ((1, False), (7, False), (33, True), (16, False)):
        y, ref = _run(k, N, K, O, dtype, packed=packed, extreme=extreme, seed=N)
        assert y.dtype == ref.dtype and np.array_equal(y, ref), (N, extreme)


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tl") / "znver3")
    spec = f"{TASK.K},{TASK.O},{TASK.out_dtype},{TASK.rows}"
    rc = cli_tune(["--gemm", spec, "--target", TARGET, "--trials", "4", "--trials-per-iter", "2",
                   "--log-dir", d, "--seed", "0"])
    assert rc == 0
    # tune() measured the default kernel as the baseline; 4 trials rarely beat it, so the tests of
    # the tuned path pretend the default took 1 s (test_default_kernel_baseline covers the real one)
    path = os.path.join(d, "defaults.json")
    with open(path) as f:
        measured = json.load(f)
    with open(path + ".measured", "w") as f:
        json.dump(measured, f)
    with open(path, "w") as f:
        json.dump({t: {k: 1.0 for k in v} for t, v in measured.items()}, f)
    return d


def test_default_kernel_baseline(tuned_dir, tmp_path):
    """tune() records the default kernel's time per task; apply_tuning_logs keeps the default
    kernel (skips the record) when the best tuned record is not faster than it."""
    with open(os.path.join(tuned_dir, "defaults.json.measured")) as f:
        measured = json.load(f)
    (times,) = measured.values()
    key = f"{TASK.K},{TASK.O},{TASK.out_dtype},{TASK.rows}"
    assert 0 < times[key] < 1.0
    import shutil
    d = str(tmp_path / "copy")
    shutil.copytree(tuned_dir, d)
    best = apply_tuning_logs(d, TARGET).best_us(*TASK.key)
    with open(os.path.join(d, "defaults.json"), "w") as f:     # a default faster than any record
        json.dump({t: {k: best * 1e-6 / 2 for k in v} for t, v in measured.items()}, f)
    tk = apply_tuning_logs(d, TARGET)
    assert TASK.key not in tk and tk.kept_default == [TASK.key]
    with open(os.path.join(d, "defaults.json"), "w") as f:     # a slower default: the record applies
        json.dump({t: {k: best * 1e-6 * 2 for k in v} for t, v in measured.items()}, f)
    assert TASK.key in apply_tuning_logs(d, TARGET)


def _lines(d, f):
    with open(os.path.join(d, f)) as fh:
        return fh.read().splitlines()


def test_tune_writes_database_and_restores_imports(tuned_dir):
    assert len(_lines(tuned_dir, WORKLOAD_FILE)) == 1
    recs = [json.loads(line) for line in _lines(tuned_dir, RECORD_FILE)]
    assert len(recs) == 4
    # the stub that keeps MetaSchedule from importing every backend's intrinsics is gone again
    mod = sys.modules.get("tvm.s_tir.tensor_intrin")
    assert mod is None or not getattr(mod, "__tvm_intlstm_stub__", False)


def test_tuned_kernel_bit_exact(tuned_dir):
    tk = apply_tuning_logs(tuned_dir, TARGET)
    assert (TASK.K, TASK.O, TASK.out_dtype) in tk and tk.best_us(*TASK.key) > 0
    assert tk.get(TASK.K, TASK.O, "int8") is None and tk.get(99, 20, "int16") is None
    func = tk.get(*TASK.key)
    assert func is not None and int(func.attrs["intlstm.tuned"]) == 1
    assert str(func.attrs["intlstm.weight_layout"]) == "o8k2"
    k = build_kernel(func, HOST)
    for N in (1, 5, 16, 61):           # symbolic N: the trace tuned at N=16 serves every N
        y, ref = _run(k, N, TASK.K, TASK.O, TASK.out_dtype, extreme=N == 5, seed=N)
        assert np.array_equal(y, ref), N


@pytest.mark.parametrize("M0,s0", [(None, 38), (1518500250, 38), (None, 20)])
def test_tuned_kernel_with_baked_scale(tuned_dir, M0, s0):
    """The compiler replays a record on a kernel with the GEMM's per-tensor shift (and multiplier)
    baked into the epilogue, like its default kernels (shift in [32, 62]: the 32-bit
    requantize_hi; below: the generic one with an immediate shift): bit-exact, and the trace
    replays unchanged on that epilogue."""
    tk = apply_tuning_logs(tuned_dir, TARGET)
    func = tk.get(*TASK.key, scale=(M0, s0))
    assert func is not None and tk.get(*TASK.key, scale=(M0, s0)) is func     # cached per scale
    k = build_kernel(func, HOST)
    K, O = TASK.K, TASK.O
    for N, seed in ((1, 0), (13, 1), (40, 2)):
        rng = np.random.default_rng(seed)
        x = rng.integers(-128, 128, (N, K)).astype(np.int8)
        W = rng.integers(-127, 128, (O, K)).astype(np.int8)
        b = rng.integers(-(2**20), 2**20, O).astype(np.int32)
        M = np.full(O, M0, np.int32) if M0 else rng.integers(2**30, 2**31 - 1, O).astype(np.int32)
        sv = np.full(O, s0, np.int32)
        ref = R.requantize(R.linear_acc(x, W, b), M, sv, 16)
        args = [tvm.runtime.tensor(a) for a in (x, pack_weights(W), b, M, sv)]
        args.append(tvm.runtime.empty((N, O), "int16", tvm.cpu()))
        k(*args)
        assert np.array_equal(args[-1].numpy(), ref), N


def test_bench_compares_tuned_and_default(tuned_dir):
    """`python -m tvm_intlstm.tuning.bench`: both kernels checked bit-exact (compare raises
    otherwise), one line per row count."""
    from tvm_intlstm.tuning.bench import bench
    lines = []
    out = bench(tuned_dir, TARGET, TASK.K, TASK.O, TASK.out_dtype, rows=(3, 16), rounds=1,
                log=lines.append)
    assert [n for n, _, _ in out] == [3, 16] and all(d > 0 and t > 0 for _, d, t in out)
    assert len(lines) == 2 and "per-round ratio tuned / default" in lines[0]
    with pytest.raises(ValueError, match="no tuned schedule"):
        bench(tuned_dir, TARGET, TASK.K, TASK.O, "int8", rows=(3,), rounds=1)


def test_tuned_kernel_through_relax_call_tir(tuned_dir):
    """The way LowerIntegerOps uses a kernel: no global_symbol, op_pattern, call_tir, symbolic rows."""
    func = apply_tuning_logs(tuned_dir, TARGET).get(*TASK.key)
    func = func.without_attr("global_symbol").with_attr("op_pattern", 8)
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    K, O = TASK.K, TASK.O
    params = [relax.Var("x", relax.TensorType([n, K], "int8")),
              relax.Var("w", relax.TensorType(list(pack_weights(np.zeros((O, K), np.int8)).shape),
                                              "int8"))] + [
        relax.Var(c, relax.TensorType([O], "int32")) for c in ("b", "m", "s")]
    with bb.function("main", params):
        gv = bb.add_func(func, "linear_requant")
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, params, relax.TensorType([n, O], "int16")))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target=HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for N in (3, 24):
        inputs, ref = _data(N, K, O, "int16", seed=N)
        inputs = (inputs[0], pack_weights(inputs[1])) + tuple(inputs[2:])
        y = vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()
        assert np.array_equal(y, ref)


def test_for_weight(tuned_dir):
    tk = apply_tuning_logs(tuned_dir, TARGET)
    W = np.random.default_rng(0).integers(-127, 128, (TASK.O, TASK.K)).astype(np.int8)
    func, wp, b = tk.for_weight(*TASK.key, relax.const(W, "int8"))
    assert func is not None and np.array_equal(wp.value.numpy(), pack_weights(W)) and b is None
    assert tk.for_weight(*TASK.key, relax.Var("w", relax.TensorType([TASK.O, TASK.K], "int8"))) \
        is None
    assert tk.for_weight(TASK.K, TASK.O, "int8", relax.const(W, "int8")) is None


def test_resume_appends(tuned_dir, tmp_path):
    d = str(tmp_path / "db")
    shutil.copytree(tuned_dir, d)
    before = {f: open(os.path.join(d, f)).read() for f in (WORKLOAD_FILE, RECORD_FILE)}
    # resume: the 4 records count towards the 6 asked for
    rep = tune(None, TARGET, tasks=[TASK], trials=6, log_dir=d, trials_per_iter=2, seed=1,
               verbose=False)
    assert rep[0]["trials_before"] == 4 and rep[0]["trials_run"] == 2
    after = {f: open(os.path.join(d, f)).read() for f in (WORKLOAD_FILE, RECORD_FILE)}
    assert after[WORKLOAD_FILE] == before[WORKLOAD_FILE]            # same workload, not re-added
    assert after[RECORD_FILE].startswith(before[RECORD_FILE])        # appended, never rewritten
    assert len(after[RECORD_FILE].splitlines()) == 6
    # nothing left to do: no trial, no write
    rep = tune(None, TARGET, tasks=[TASK], trials=6, log_dir=d, verbose=False)
    assert rep[0]["trials_run"] == 0
    assert open(os.path.join(d, RECORD_FILE)).read() == after[RECORD_FILE]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_index"])
def test_corrupt_database(tuned_dir, tmp_path, damage):
    d = str(tmp_path / "db")
    shutil.copytree(tuned_dir, d)
    path = os.path.join(d, RECORD_FILE)
    text = open(path).read()
    if damage == "garbage":
        text = text + "this is not json\n"
    elif damage == "truncated":   # an interrupted write
        text = text + text.splitlines()[0][:50]
    else:
        first = json.loads(text.splitlines()[0])
        first[0] = 7
        text = text + json.dumps(first) + "\n"
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(TuningLogError, match="corrupt"):
        tune(None, TARGET, tasks=[TASK], trials=6, log_dir=d, verbose=False)
    assert open(path).read() == text                                 # untouched
    with pytest.warns(TuningLogWarning, match="corrupt.*default kernels"):
        tk = apply_tuning_logs(d, TARGET)
    assert len(tk) == 0 and tk.get(*TASK.key) is None


def test_foreign_target_ignored_with_warning(tuned_dir):
    for other in ("llvm -mcpu=x86-64", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod"):
        with pytest.warns(TuningLogWarning, match=f"only for {TARGET}"):
            tk = apply_tuning_logs(tuned_dir, other)
        assert tk.get(*TASK.key) is None
    with pytest.raises(ValueError, match="cannot tune for"):
        tune(None, "llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod", tasks=[TASK],
             trials=2, log_dir=tuned_dir, verbose=False)


def test_tuning_refuses_x86_targets_this_cpu_cannot_run(tmp_path):
    """An AVX-512 target on an AVX2-only host would run its trials here and die with SIGILL:
    refused up front, naming the missing features (the CI machines are AVX2-only Zen3)."""
    from tvm_intlstm.tuning.targets import missing_host_features
    from tvm_intlstm.kernels import as_target
    missing = missing_host_features(as_target("llvm -mcpu=cascadelake"))
    if not missing:     # an AVX-512 VNNI host: the target is runnable and nothing is refused
        return
    assert "avx512f" in missing
    with pytest.raises(ValueError, match="lacks avx512"):
        tune(None, "llvm -mcpu=cascadelake", tasks=[TASK], trials=2, log_dir=str(tmp_path),
             verbose=False)
    assert missing_host_features(as_target(TARGET)) == []


def test_pack_weights_layout():
    W = np.arange(3 * 5, dtype=np.int8).reshape(3, 5)
    P = pack_weights(W)
    assert P.shape == (1, 3, 8, 2) and P.dtype == np.int8
    assert P[0, 1, 2, 1] == W[2, 3] and P[0, 2, 0, 1] == 0 and P[0, 0, 5, 0] == 0
    with pytest.raises(TypeError):
        pack_weights(W.astype(np.int16))


def test_missing_logs_fall_back(tmp_path):
    with pytest.warns(TuningLogWarning, match="not found"):
        tk = apply_tuning_logs(str(tmp_path / "nope"), TARGET)
    assert tk.get(*TASK.key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_tuning_logs(None, TARGET).get(*TASK.key) is None


def test_extract_tasks_from_quantized_model(tmp_path):
    import torch
    from torch import nn

    import tvm_intlstm as til
    from tvm_intlstm.tuning import extract_tasks

    class FeatureLSTM(nn.Module):
        def __init__(self, H=24):
            super().__init__()
            self.lstm = nn.LSTM(10, H)
            self.mid = nn.Linear(H, 16)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            h, _ = self.lstm(x)
            return self.head(self.mid(h))

    torch.manual_seed(0)
    q = til.quantize(FeatureLSTM().eval(), [torch.randn(7, 2, 10) for _ in range(2)])
    tasks = extract_tasks(q, (torch.randn(8, 3, 10),))
    got = {(t.K, t.O, t.out_dtype, t.rows, t.source) for t in tasks}
    assert got == {(10, 96, "int16", 24, "lstm_direction"), (24, 16, "int8", 24, "linear_requant"),
                   (16, 5, "int32", 24, "linear_i32")}
    assert {t.rows for t in extract_tasks(q, (torch.randn(8, 3, 10),), rows=64)} == {64}
    # 13 units: the compiler pads them to 16 on AVX2, so the projection to tune has 64 channels
    q13 = til.quantize(FeatureLSTM(13).eval(), [torch.randn(7, 2, 10)])
    lstm_o = {isa: [t.O for t in extract_tasks(q13, (torch.randn(8, 3, 10),), isa=isa)
                    if t.source == "lstm_direction"] for isa in (None, "generic", "avx2")}
    assert lstm_o == {None: [52], "generic": [52], "avx2": [64]}
    assert not any(t.u8_weights for t in tasks)
    # 7-bit weights: on AVX2 the compiler takes the u8 x s8 kernels (tuned as such, see below)
    q7 = til.quantize(FeatureLSTM().eval(), [torch.randn(7, 2, 10)], til.QuantConfig(weight_bits=7))
    t7 = extract_tasks(q7, (torch.randn(8, 3, 10),))
    assert len(t7) == 3 and all(t.u8_weights for t in t7)


def test_tune_and_apply_7bit_model(tmp_path):
    """QuantConfig(weight_bits=7) on AVX2: tune tunes the model's GEMMs as the u8 x s8 (vpmaddubsw)
    block kernel (workload layout o8k4w7, every trial checked bit for bit on 7-bit weights), its
    records apply to GEMMs on the u8 route only (not to an 8-bit model of the same shapes), and the
    compiled model with them is bit-exact with the reference."""
    import torch
    from torch import nn

    import tvm_intlstm as til
    from tvm_intlstm.tuning.x86_wide import INTRIN_AVX2_U8S7, INTRIN_VNNI256

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(12, 16)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    torch.manual_seed(1)
    model = M().eval()
    calib = [torch.randn(7, 2, 12) for _ in range(2)]
    q7 = til.quantize(model, calib, til.QuantConfig(weight_bits=7))
    ex = (torch.randn(8, 2, 12),)
    d = str(tmp_path / "db")
    msgs = []
    rep = tune(q7, TARGET, ex, trials=2, trials_per_iter=2, log_dir=d, seed=0, log=msgs.append)
    # (the u8 route's kernel is the family's: vpmaddubsw on AVX2, vpdpbusd on a VNNI host)
    vnni = ISA in ("x86_vnni", "avx512_vnni")
    assert sum((f"tuned as the u8 x s8 kernel of the {ISA} family" if vnni else
                "tuned as the u8 x s8 (vpmaddubsw) kernel") in m for m in msgs) == 2
    assert len(rep) == 2 and all(r["trials_run"] == 2 and r["best_us"] > 0 for r in rep)
    from tvm_intlstm.tuning.database import open_database, records
    assert {r[0][4] for r in records(open_database(d))} == {True}     # the o8k4w7 workloads
    assert (INTRIN_VNNI256 if vnni else INTRIN_AVX2_U8S7) in "".join(_lines(d, RECORD_FILE))
    with open(os.path.join(d, "defaults.json")) as f:
        measured = json.load(f)
    assert all(k.endswith(",w7") for v in measured.values() for k in v)
    # the default kernel and the best record were timed head to head; apply follows that verdict
    verdicts = [m for m in msgs if "(interleaved" in m]
    assert len(verdicts) == 2
    real = apply_tuning_logs(d, TARGET)
    for m, key in zip(sorted(verdicts), [(12, 64, "int16", "w7"), (16, 5, "int32", "w7")]):
        assert f"gemm_k{key[0]}_o{key[1]}_{key[2]}" in m
        assert (key in real) == ("the tuned kernel will be used" in m), m
        assert (key in real.kept_default) == ("the default kernel stays" in m), m
    # (2 trials rarely beat the default kernel: pretend it took 1 s so that the records apply)
    with open(os.path.join(d, "defaults.json"), "w") as f:
        json.dump({t: {k: 1.0 for k in v} for t, v in measured.items()}, f)
    tk = apply_tuning_logs(d, TARGET)
    assert tk.keys() == [(12, 64, "int16", "w7"), (16, 5, "int32", "w7")]
    assert tk.get(12, 64, "int16") is None and tk.get(12, 64, "int16", w7=True) is not None
    cm = til.compile(q7, TARGET, ex, tuning_logs=d, verbose=False)
    tuned = [gv.name_hint for gv, _ in cm.ir_module.functions_items()
             if gv.name_hint.startswith("tuned_")]
    assert len(tuned) == 2, tuned
    ref = til.reference(q7)
    for T, B in ((8, 2), (3, 1), (13, 3)):
        x = (torch.randn(T, B, 12) * 3).numpy()
        np.testing.assert_array_equal(cm(x), ref(x))
    # the records are not for 8-bit weights of the same shapes (the lowering asks get(...,
    # w7=False) for those, asserted None above); nor for weights outside [-64, 64] given w7=True:
    # _gemm asks w7=True only on the u8 route (passes._lowering.u8_route)


def test_compile_applies_committed_tuning_logs(tmp_path):
    """compile(..., tuning_logs=tuning_logs/znver3) uses the tuned, pre-packed GEMM for the
    256->512 LSTM's input projection and stays bit-exact with the reference."""
    import os

    import torch
    from torch import nn

    import tvm_intlstm as til

    class L(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(256, 512)

        def forward(self, x):
            return self.lstm(x)[0]

    torch.manual_seed(0)
    q = til.quantize(L().eval(), [torch.randn(6, 2, 256)])
    committed = os.path.join(os.path.dirname(__file__), "..", "tuning_logs", "znver3")
    # the committed baselines keep the default kernel for this GEMM (it beat the best record when
    # both were timed interleaved, tuning_logs/README.md) ...
    assert (256, 2048, "int16") in apply_tuning_logs(committed, "llvm -mcpu=znver3").kept_default
    # ... so replay the committed record with the baselines set aside
    logs = str(tmp_path / "znver3")
    shutil.copytree(committed, logs)
    os.remove(os.path.join(logs, "defaults.json"))
    cm = til.compile(q, "llvm -mcpu=znver3", (torch.randn(8, 2, 256),), tuning_logs=logs, verbose=False,
                     threads=True)
    text = cm.ir_module.script(show_meta=False)
    assert "tuned_linear_requant" in text
    # the tuned kernel replacing the (threaded) LSTM input projection is threaded too
    tuned = [f for gv, f in cm.ir_module.functions_items() if gv.name_hint.startswith("tuned_linear")]
    assert len(tuned) == 1 and "T.parallel" in tuned[0].script()
    for T, B in ((8, 2), (3, 1)):
        x = torch.randn(T, B, 256)
        np.testing.assert_array_equal(cm(x.numpy()), til.reference(q)(x.numpy()))
    # ... and bit-exact with two workers
    x = torch.randn(9, 3, 256).numpy()
    lib = cm.export_library(str(tmp_path / "tuned.so"))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", til.reference(q)(x))
    code = ("import sys, numpy as np, tvm_intlstm as til; d = sys.argv[1]; "
            "y = til.load(d + '/tuned.so')(np.load(d + '/x.npy')); "
            "assert (y == np.load(d + '/y.npy')).all(); print('exact')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, TVM_NUM_THREADS="2"))
    assert r.returncode == 0 and r.stdout.strip().endswith("exact"), r.stdout + r.stderr
