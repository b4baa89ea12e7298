"""Shared pieces of the char-LM quantization scripts (PTQ, QAT, evaluation, generation, main job).

Importing this module pins every runtime to ONE thread (the machines these scripts run on are
shared): ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` default to 1 (set before TVM is imported) and
``torch.set_num_threads(1)``.

Conventions used by every script:

* integer BPC = :func:`examples.char_lm.model.bpc` applied to the **dequantized** int32 logits
  of the compiled module, ``float32(logits) * s`` with the single logits scale ``s`` (spec section 1;
  the integer logits share one scale, so the argmax / ranking needs no dequantization at all);
* windows of ``SEQ_LEN = 128`` from a zero state, batches of ``BATCH = 32`` (the reference protocol);
* ``SUBSET_WINDOWS = 512`` evenly spaced test windows (``bpc(max_windows=512)``, 65,536 scored
  characters, ~17 % of the test split) is the fixed subset of the main job and of the ablation;
* ``SLICE_WINDOWS = 16`` evenly spaced test windows is the slice of the fast test.
"""
from __future__ import annotations

import io
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNS = HERE / "runs"                       # git-ignored: checkpoints, logs, intermediate models
MODEL_DIR = HERE / "model"                 # shipped (committed) files
SHIPPED_QPT = MODEL_DIR / "charlm_qat.qpt"
SHIPPED_VOCAB = MODEL_DIR / "charlm.vocab.json"
SHIPPED_METRICS = MODEL_DIR / "metrics.json"
FP_CKPT = RUNS / "fp.pt"
PTQ_QPT = RUNS / "charlm_ptq.qpt"
QAT_QPT = RUNS / "charlm_qat.qpt"

SEQ_LEN = 128
BATCH = 32
SUBSET_WINDOWS = 512
SLICE_WINDOWS = 16
CALIB_BATCHES, CALIB_BATCH, CALIB_SEED = 8, 16, 1234


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def calib_batches(train: np.ndarray, n: int = CALIB_BATCHES, batch: int = CALIB_BATCH,
                  seq_len: int = SEQ_LEN, seed: int = CALIB_SEED) -> list[torch.Tensor]:
    """``n`` int64 batches ``[batch, seq_len]`` of train windows at fixed random starts."""
    rng = np.random.default_rng(seed)
    ar = np.arange(seq_len)
    return [torch.from_numpy(train[rng.integers(0, train.size - seq_len - 1, batch)[:, None] + ar])
            for _ in range(n)]


def host_target() -> str:
    """The TVM target of this machine (tvm_intlstm's "host" preset: LLVM's triple and -mcpu)."""
    from tvm_intlstm.target import parse_target, target_to_string
    return target_to_string(parse_target("host"))


def compile_host(qmodel, verbose: bool = False):
    """Compile a QuantizedModel for this machine. One module serves every batch size and length."""
    import tvm_intlstm as til
    return til.compile(qmodel, target="host", example_inputs=(torch.zeros(1, SEQ_LEN, dtype=torch.int64),),
                       verbose=verbose)


def logits_scale(model) -> float:
    """The single scale of the int32 logits (QuantizedModel or CompiledModule)."""
    s = model.output_scales
    while isinstance(s, (tuple, list)):
        (s,) = s
    return float(s)


def dequantized_fn(int_fn, scale: float):
    """Callable for :func:`bpc`: int64 ids ``[B, T]`` -> float32 logits ``float32(q) * scale``."""
    s = np.float32(scale)

    def fn(x):
        y = int_fn(x)
        y = y.numpy() if torch.is_tensor(y) else np.asarray(y)
        return y.astype(np.float32) * s
    return fn


def eval_windows(ids: np.ndarray, n_windows: int | None, seq_len: int = SEQ_LEN) -> np.ndarray:
    """The window starts :func:`bpc` scores with ``max_windows=n_windows`` (same selection rule)."""
    n_all = (ids.size - 1) // seq_len
    win = np.arange(n_all)
    if n_windows is not None and n_windows < n_all:
        win = np.unique(np.linspace(0, n_all - 1, int(n_windows)).round().astype(np.int64))
    return win * seq_len


def window_batch(ids: np.ndarray, starts, seq_len: int = SEQ_LEN) -> np.ndarray:
    return ids[np.asarray(starts)[:, None] + np.arange(seq_len)[None, :]]


def check_bitexact(cm, qmodel, x: np.ndarray) -> tuple[bool, np.ndarray]:
    """Compiled module vs the numpy reference (til.reference) on ids ``x``: (equal bit for bit, cm logits)."""
    import tvm_intlstm as til
    y_cm = cm(x)
    y_ref = til.reference(qmodel)(x)
    return bool(y_cm.dtype == y_ref.dtype and y_cm.shape == y_ref.shape and np.array_equal(y_cm, y_ref)), y_cm


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` (the usual FP32 checkpoint of the weights)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def dequantized_fp32_model(qmodel):
    """A float32 ``CharLM`` whose weights are the shipped int8 weights times their scales.

    Used only where an FP32 PyTorch model of the same architecture is needed without shipping FP
    weights (latency, state-dict size): dense FP32 latency does not depend on the weight values.
    Per-row weight scales are recovered from the requantization multipliers
    (``M 2^-s = s_in s_w / 2^-12``, spec section 8), so the result is close to (not equal to) the FP model.
    """
    from tvm_intlstm.nn import intmodules as im

    from .model import CharLM

    mods = {n.target: qmodel.gm.get_submodule(n.target) for n in qmodel.gm.graph.nodes if n.op == "call_module"}
    emb = next(m for m in mods.values() if isinstance(m, im.IntEmbedding))
    lstm = next(m for m in mods.values() if isinstance(m, im.IntLSTM))
    head = next(m for m in mods.values() if isinstance(m, im.IntLinear) and m.final)
    V, E = emb.table.shape
    H = lstm.direction_params(0, 0)["w_h"].shape[1]
    model = CharLM(V, E, H, lstm.num_layers)

    def f64(t):
        return t.detach().to(torch.float64)

    with torch.no_grad():
        model.embed.weight.copy_(f64(emb.table) * emb.out_scale)
        s_x = emb.out_scale
        for li in range(lstm.num_layers):
            p = lstm.direction_params(li, 0)
            s_h = lstm.layer_scales[li]
            r_x = f64(p["mx"]) * torch.pow(2.0, -f64(p["sx"])) * 2.0**-12  # = s_x * s_wx[r]
            r_h = f64(p["mh"]) * torch.pow(2.0, -f64(p["sh"])) * 2.0**-12  # = s_h * s_wh[r]
            getattr(model.lstm, f"weight_ih_l{li}").copy_(f64(p["w_x"]) * (r_x / s_x)[:, None])
            getattr(model.lstm, f"weight_hh_l{li}").copy_(f64(p["w_h"]) * (r_h / s_h)[:, None])
            getattr(model.lstm, f"bias_ih_l{li}").copy_(f64(p["bias"]) * r_x)
            getattr(model.lstm, f"bias_hh_l{li}").zero_()
            s_x = s_h
        model.head.weight.copy_(f64(head.w) * (head.out_scale / s_x))
        model.head.bias.copy_(f64(head.b) * head.out_scale)
    return model.eval()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def write_json(path: Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def rel_gap(x: float, ref: float) -> float:
    """Relative gap of ``x`` over ``ref`` in percent."""
    return 100.0 * (x - ref) / ref if ref and math.isfinite(ref) else float("nan")
