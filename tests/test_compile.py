"""tvm_intlstm.compile: one compiled module per model serves every batch size and sequence length,
bit-exact with the numpy reference, also after export_library + load; VerifyIntegerOnly; errors."""
import numpy as np
import pytest
import torch
from torch import nn
from tvm.script import ir as I, relax as R

import tvm_intlstm as til
from tvm_intlstm.compiler import compile as til_compile, load
from tvm_intlstm.passes import VerifyIntegerOnly


class TokenBiLSTM(nn.Module):
    """embedding -> 2-layer BiLSTM (batch_first) -> residual unidirectional LSTM -> final linear."""

    def __init__(self, V=30, E=12, H=16):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True)
        self.top = nn.LSTM(2 * H, 2 * H, batch_first=True)
        self.head = nn.Linear(2 * H, V)

    def forward(self, ids):
        h, _ = self.lstm(self.embed(ids))
        t, _ = self.top(h)
        return self.head(h + t)


class FeatureLSTM(nn.Module):
    """float features (time-major) -> LSTM -> hidden linear -> final linear."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(10, 24)
        self.mid = nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(self.mid(h))


@pytest.fixture(scope="module")
def token_model():
    torch.manual_seed(0)
    q = til.quantize(TokenBiLSTM().eval(), [torch.randint(0, 30, (3, 9)) for _ in range(3)])
    cm = til_compile(q, "llvm", (torch.randint(0, 30, (2, 5)),), verbose=False)
    return q, cm


def test_token_model_bitexact_many_shapes(token_model):
    q, cm = token_model
    ref = til.reference(q)
    for B, T in ((2, 5), (1, 1), (4, 13), (1, 40)):
        ids = torch.randint(0, 30, (B, T))
        y = cm(ids)
        assert y.dtype == np.int32 and y.shape == (B, T, 30)
        np.testing.assert_array_equal(y, ref(ids.numpy()))
        np.testing.assert_array_equal(y, q(ids).numpy())


def test_export_and_load(token_model, tmp_path):
    q, cm = token_model
    path = cm.export_library(tmp_path / "model.so")
    cm2 = load(path)
    ids = np.random.default_rng(0).integers(0, 30, (3, 8))
    np.testing.assert_array_equal(cm2(ids), til.reference(q)(ids))
    with pytest.raises(IndexError, match="out of range"):
        cm2(np.array([[0, 30]]))


@pytest.fixture(scope="module")
def feature_model():
    torch.manual_seed(1)
    q = til.quantize(FeatureLSTM().eval(), [torch.randn(7, 2, 10) for _ in range(2)])
    return q, til_compile(q, "llvm", (torch.randn(6, 2, 10),), verbose=False)


def test_feature_model_bitexact(feature_model):
    q, cm = feature_model
    for T, B in ((6, 2), (1, 3), (20, 1)):
        x = torch.randn(T, B, 10) * 2
        np.testing.assert_array_equal(cm(x), til.reference(q)(x.numpy()))


def test_inputs_in_any_memory_layout_and_outputs_owned(feature_model):
    """Inputs are passed without a copy when DLPack allows it (C-contiguous, writeable, 64-byte
    aligned) and copied otherwise: misaligned, read-only and strided arrays give the same result.
    Outputs are views of the VM's tensors: a later call must not change an earlier result."""
    q, cm = feature_model
    ref = til.reference(q)
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((9, 3, 10)).astype(np.float32)
    want = ref(x0)

    def at_offset(off):   # a copy of x0 that starts `off` bytes past a 64-byte boundary
        buf = np.zeros(x0.nbytes + 128, np.uint8)
        start = (64 - buf.ctypes.data % 64) % 64 + off
        a = buf[start:start + x0.nbytes].view(np.float32).reshape(x0.shape)
        a[...] = x0
        return a

    x, mis = at_offset(0), at_offset(4)
    ro = x.copy()
    ro.flags.writeable = False
    strided = np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
    for arr in (x, mis, ro, strided, torch.from_numpy(x.copy())):
        np.testing.assert_array_equal(cm(arr), want)
    y1 = cm(x)
    np.testing.assert_array_equal(x, x0)          # the input is only read
    y2 = cm(rng.standard_normal((9, 3, 10)).astype(np.float32) * 3)
    np.testing.assert_array_equal(y1, want)       # still the first result
    assert not np.array_equal(y1, y2) and y1.flags.writeable
    y1[...] = 0
    np.testing.assert_array_equal(cm(x), want)


def test_bad_inputs(token_model):
    q, cm = token_model
    with pytest.raises(TypeError, match="token ids"):
        cm(np.zeros((1, 3), np.float32))
    with pytest.raises(IndexError):
        cm(np.array([[-1, 2]]))
    with pytest.raises(TypeError, match="inputs"):
        cm()
    with pytest.raises(TypeError, match="quantized model"):
        til_compile(TokenBiLSTM(), "llvm", (torch.zeros(1, 2, dtype=torch.long),))
    with pytest.raises(ValueError):
        til_compile(q, "not-a-target -x", (torch.zeros(1, 2, dtype=torch.long),), verbose=False)


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.so")
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a library")
    with pytest.raises(ValueError):
        load(bogus)


def test_verify_integer_only_rejects_float_op():
    @I.ir_module
    class Bad:
        @R.function
        def main(x: R.Tensor((4,), "int8")) -> R.Tensor((4,), "int8"):
            with R.dataflow():
                f = R.astype(x, "float32")
                g = R.multiply(f, f)
                y = R.astype(g, "int8")
                R.output(y)
            return y

    with pytest.raises(RuntimeError, match="floating-point"):  # FloatOpError, re-raised through TVM FFI
        VerifyIntegerOnly()(Bad)

    @I.ir_module
    class Good:
        @R.function
        def main(x: R.Tensor((4,), "int8")) -> R.Tensor((4,), "int8"):
            with R.dataflow():
                y = R.add(x, x)
                R.output(y)
            return y

    assert VerifyIntegerOnly()(Good) is not None


def test_compiled_module_is_integer_only(token_model):
    _, cm = token_model
    VerifyIntegerOnly()(cm.ir_module)  # the lowered module passes (also run inside compile)
    text = cm.ir_module.script(show_meta=False)
    assert "call_dps_packed" not in text and "R.call_tir" in text  # every placeholder was lowered


def test_repeated_calls_do_not_grow_memory(token_model):
    """10,000 calls of one compiled module: resident memory stays flat."""
    import psutil
    _, cm = token_model
    ids = np.random.default_rng(1).integers(0, 30, (1, 4))
    proc = psutil.Process()
    for _ in range(300):  # warm up allocator pools
        cm(ids)
    before = proc.memory_info().rss
    for _ in range(10_000):
        cm(ids)
    grown = proc.memory_info().rss - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 calls"


def test_concurrent_calls_are_correct(token_model):
    import threading
    q, cm = token_model
    rng = np.random.default_rng(2)
    inputs = [rng.integers(0, 30, (2, 3 + i)) for i in range(4)]
    want = [til.reference(q)(x) for x in inputs]
    errors = []

    def worker(k):
        try:
            for _ in range(25):
                np.testing.assert_array_equal(cm(inputs[k]), want[k])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_save_load_quantized_and_cli(token_model, tmp_path):
    from tvm_intlstm import cli
    q, _ = token_model
    p = til.save_quantized(q, tmp_path / "m.qpt")
    blob = torch.load(p, weights_only=True)  # data only, no code
    assert blob["format"].startswith("tvm_intlstm")
    q2 = til.load_quantized(p)
    ids = torch.randint(0, 30, (2, 6))
    np.testing.assert_array_equal(q2(ids).numpy(), q(ids).numpy())
    so = tmp_path / "m.so"
    cli.main(["compile", str(p), "--example-shape", "1,4", "-o", str(so)])
    np.save(tmp_path / "ids.npy", ids.numpy())
    cli.main(["run", str(so), "--input", str(tmp_path / "ids.npy"), "--output", str(tmp_path / "y.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), til.reference(q)(ids.numpy()))
    (tmp_path / "junk.qpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a tvm_intlstm"):
        til.load_quantized(tmp_path / "junk.qpt")


def test_wrong_shapes_are_rejected(token_model):
    _, cm = token_model
    with pytest.raises(ValueError, match="shape"):
        cm(np.zeros((2, 3, 4), np.int64))
    with pytest.raises(ValueError, match="empty"):
        cm(np.zeros((2, 0), np.int64))


class Stacked(nn.Module):
    """Configurable random model: [embedding] -> LSTM stack (1-3 layers, bidir?, batch_first?)
    -> optional residual LSTM -> optional LayerNorm -> final linear."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        V, E, H, L, bi, bf = cfg["V"], cfg["E"], cfg["H"], cfg["layers"], cfg["bidir"], cfg["batch_first"]
        self.embed = nn.Embedding(V, E) if cfg["tokens"] else None
        self.lstm = nn.LSTM(E, H, num_layers=L, bidirectional=bi, batch_first=bf)
        D = H * (2 if bi else 1)
        self.res = nn.LSTM(D, D, batch_first=bf) if cfg["residual"] else None
        self.norm = nn.LayerNorm(D) if cfg["norm"] else None
        self.head = nn.Linear(D, cfg["out"])

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        h, _ = self.lstm(x)
        if self.res is not None:
            r, _ = self.res(h)
            h = h + r
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h)


CONFIGS = [
    dict(tokens=True, V=40, E=8, H=12, layers=1, bidir=False, batch_first=True, residual=False, norm=False, out=40),
    dict(tokens=False, V=0, E=7, H=20, layers=3, bidir=False, batch_first=False, residual=True, norm=True, out=6),
    dict(tokens=True, V=25, E=16, H=9, layers=2, bidir=True, batch_first=False, residual=True, norm=False, out=25),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tok-1L", "feat-3L-res-ln", "tok-2L-bi-res"])
def test_random_models_bitexact(cfg):
    torch.manual_seed(hash(str(cfg)) % 1000)
    m = Stacked(cfg).eval()

    def make(B, T):
        shape = (B, T) if cfg["batch_first"] else (T, B)
        if cfg["tokens"]:
            return torch.randint(0, cfg["V"], shape)
        return torch.randn(*shape, cfg["E"]) * 1.5

    q = til.quantize(m, [make(3, 8) for _ in range(2)])
    cm = til_compile(q, "host", (make(1, 5),), verbose=False)  # this CPU (AVX2 kernels on x86)
    ref = til.reference(q)
    for B, T in ((1, 1), (2, 9), (5, 3)):
        x = make(B, T)
        np.testing.assert_array_equal(cm(x.numpy()), ref(x.numpy()))


def test_passes_lower_their_own_operator_family():
    """Each lowering pass is a module pass of its own: after LowerBoundary + LowerLinear only the
    LSTM placeholders remain, and VerifyIntegerOnly refuses the half-lowered module."""
    from tvm_intlstm.frontend.importer import import_quantized
    from tvm_intlstm.passes import LowerBoundary, LowerLinear, LowerLSTM
    from tvm_intlstm.target import parse_target
    torch.manual_seed(3)
    q = til.quantize(FeatureLSTM().eval(), [torch.randn(5, 2, 10)])
    mod = import_quantized(q, (torch.randn(5, 2, 10),))
    tgt = parse_target("host")
    half = LowerLinear(tgt)(LowerBoundary(tgt)(mod))
    text = half.script(show_meta=False)
    assert "intlstm.lstm_direction" in text
    assert "intlstm.linear_i32" not in text and "intlstm.quantize_input" not in text
    with pytest.raises(RuntimeError, match="not lowered"):
        VerifyIntegerOnly()(half)
    full = LowerLSTM(tgt)(half)
    assert "call_dps_packed" not in full.script(show_meta=False)
    VerifyIntegerOnly()(full)


class LastStep(nn.Module):
    """Negative indices: the last time step h[-1] (symbolic T) and the last layer's state h_n[-1]."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=2)
        self.a = nn.Linear(16, 4)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        h, (h_n, _) = self.lstm(x)
        return self.a(h[-1]), self.b(h_n[-1])


@pytest.mark.parametrize("target", ["llvm", "host"])
def test_negative_indices_bitexact(target):
    """TVM's translator turns x[-1] into take(x, -1, mode="fast"), an out-of-bounds read (a wrong
    answer, not an error); the importer takes such indices with mode="wrap"."""
    torch.manual_seed(19)
    q = til.quantize(LastStep().eval(), [torch.randn(9, 3, 6) * 1.5 for _ in range(2)])
    cm = til_compile(q, target, (torch.randn(5, 1, 6),), verbose=False)
    ref = til.reference(q)
    for T, B in ((1, 1), (3, 2), (8, 3)):
        x = (torch.randn(T, B, 6) * 1.5).numpy()
        for got, want in zip(cm(x), ref(x)):
            np.testing.assert_array_equal(got, want)


def test_weight_route_hint():
    """compile's progress output suggests 7-bit weights for a full-range 8-bit model on AVX2
    only (the u8 x s8 kernels are the faster route there; elsewhere both routes run alike)."""
    from tvm_intlstm.compiler import weight_route_hint

    torch.manual_seed(0)
    calib = [torch.randn(5, 2, 10) for _ in range(2)]
    q8 = til.quantize(FeatureLSTM().eval(), calib)
    q7 = til.quantize(FeatureLSTM().eval(), calib, til.QuantConfig(weight_bits=7))
    hint = weight_route_hint(q8, "llvm -mcpu=znver3")
    assert hint is not None and "weight_bits=7" in hint
    assert weight_route_hint(q7, "llvm -mcpu=znver3") is None
    assert weight_route_hint(q8, "rpi5") is None and weight_route_hint(q8, "llvm") is None
