"""tvm_intlstm.nn.LayerNormLSTM end to end (spec 8b): PTQ and QAT, the integer model against the numpy
reference and the float model, save / load, and the compiled module bit for bit (host target, and
an rpi5 build under qemu)."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.nn import LayerNormLSTM


class TokenLNLM(nn.Module):
    def __init__(self, V=20, E=8, H=12, layers=2, bidirectional=True, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, E)
        self.lstm = LayerNormLSTM(E, H, num_layers=layers, bidirectional=bidirectional,
                                  batch_first=batch_first)
        self.fc = nn.Linear(H * (2 if bidirectional else 1), V)

    def forward(self, ids):
        y, _ = self.lstm(self.emb(ids))
        return self.fc(y)


class FeatureLN(nn.Module):
    """float features -> one LN-LSTM layer -> the last step's h (the states as outputs too)."""

    def __init__(self, I=6, H=16):
        super().__init__()
        self.lstm = LayerNormLSTM(I, H)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return y, h, c


def _ids(rng, T, B, V=20):
    return torch.from_numpy(rng.integers(0, V, (T, B)))


@pytest.fixture(scope="module")
def token_model():
    torch.manual_seed(0)
    m = TokenLNLM().eval()
    rng = np.random.default_rng(1)
    q = til.quantize(m, [_ids(rng, 7, 3) for _ in range(3)])
    return m, q


def test_integer_model_equals_reference_and_tracks_float(token_model):
    m, q = token_model
    rng = np.random.default_rng(2)
    ids = _ids(rng, 9, 2)
    out = q(ids)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), til.reference(q)(ids.numpy()))
    with torch.no_grad():
        f = m(ids).numpy()
    scale = q.output_scales
    err = np.abs(out.numpy() * scale - f).max() / np.abs(f).max()
    print(f"LN-LSTM LM: max |logit error| / max |logit| = {err:.3f}")
    assert err < 0.1


def test_compiled_equals_reference(token_model, tmp_path):
    _, q = token_model
    rng = np.random.default_rng(3)
    cm = til.compile(q, "host", (_ids(rng, 5, 2),), verbose=False)
    ref = til.reference(q)
    for T, B in ((9, 2), (1, 1), (4, 3)):
        x = _ids(rng, T, B).numpy()
        np.testing.assert_array_equal(cm(x), ref(x))
    # the exported library reloads and agrees
    lib = cm.export_library(str(tmp_path / "ln.so"))
    x = _ids(rng, 6, 2).numpy()
    np.testing.assert_array_equal(til.load(lib)(x), ref(x))
    # save / load of the quantized model (the model file's allow-list knows IntLNLSTM)
    til.save_quantized(q, tmp_path / "ln.qpt")
    np.testing.assert_array_equal(til.load_quantized(tmp_path / "ln.qpt")(torch.from_numpy(x)).numpy(),
                                  ref(x))


def test_feature_model_states_out_and_extremes():
    torch.manual_seed(4)
    m = FeatureLN().eval()
    xs = [torch.randn(6, 3, 6) for _ in range(3)]
    q = til.quantize(m, xs)
    cm = til.compile(q, "host", (xs[0],), verbose=False)
    ref = til.reference(q)
    big = torch.randn(5, 2, 6) * 100                 # saturates the input quantizer: x = -128 / 127
    for x in (xs[1], big, torch.zeros(3, 1, 6)):     # zeros: constant rows in every layer norm
        got, want = cm(x.numpy()), ref(x.numpy())
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_qat_trains_and_converts_bit_exact():
    torch.manual_seed(5)
    m = TokenLNLM(layers=1, bidirectional=False, batch_first=True)
    rng = np.random.default_rng(6)
    calib = [torch.from_numpy(rng.integers(0, 20, (3, 7))) for _ in range(2)]
    qat = til.prepare_qat(m, calib_data=calib)
    opt = torch.optim.Adam(qat.parameters(), 1e-2)
    losses = []
    for _ in range(8):
        ids = torch.from_numpy(rng.integers(0, 20, (4, 8)))
        logits = qat(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 20), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    # gradients reach the LN-LSTM's recurrent weights and layer norms (straight through the grids)
    grads = {n: p.grad for n, p in qat.named_parameters() if "weight_hh" in n or "gamma_c" in n}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    q = qat.eval().convert() if hasattr(qat, "convert") else til.convert(qat)
    x = torch.from_numpy(rng.integers(0, 20, (2, 5)))
    cm = til.compile(q, "host", (x,), verbose=False)
    np.testing.assert_array_equal(cm(x.numpy()), til.reference(q)(x.numpy()))


def test_states_in_are_refused_clearly():
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = LayerNormLSTM(4, 8)

        def forward(self, x, h0, c0):
            return self.lstm(x, (h0, c0))[0]

    m = WithState().eval()
    with pytest.raises(Exception, match="not supported yet"):
        til.quantize(m, [(torch.randn(3, 2, 4), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))])


@pytest.mark.skipif(not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")),
                    reason="needs the aarch64 toolchain and qemu (.ci/install_apt.sh installs them)")
def test_rpi5_build_under_qemu(token_model, tmp_path):
    from tvm_intlstm.runtime.emulate import run_emulated
    _, q = token_model
    rng = np.random.default_rng(7)
    lib = til.compile(q, "rpi5", (_ids(rng, 5, 2),), verbose=False).export_library(tmp_path / "ln_rpi5.so")
    x = _ids(rng, 6, 2).numpy()
    (got,) = run_emulated(lib, [x], cpu="cortex-a76", verbose=False)   # (one output)
    np.testing.assert_array_equal(got, til.reference(q)(x))


def test_tuning_sees_the_projection(token_model):
    from tvm_intlstm.tuning import extract_tasks
    _, q = token_model
    tasks = extract_tasks(q, (_ids(np.random.default_rng(8), 7, 3),))
    # the LN-LSTM input projections (8 -> 48 in layer 0, 24 -> 48 in layer 1) next to the head
    keys = {(t.K, t.O, t.out_dtype) for t in tasks}
    assert {(8, 48, "int16"), (24, 48, "int16"), (24, 20, "int32")} <= keys


class _FloatLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = LayerNormLSTM(6, 8)

    def forward(self, x):
        return self.lstm(x)[0]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")),
                    reason="needs the aarch64 toolchain and qemu (.ci/install_apt.sh installs them)")
def test_zero_variance_and_saturated_rows_under_qemu(tmp_path):
    """Layer norms of constant rows (a zero input: W_x x = 0 in every gate block, and W_h h = 0 at
    the first step) and of saturated inputs: the compiled module equals the reference on the host
    and, built for rpi5, under qemu."""
    from tvm_intlstm.runtime.emulate import run_emulated
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    q = til.quantize(_FloatLN().eval(), [torch.randn(5, 3, 6, generator=g) for _ in range(4)])
    ex = (torch.randn(5, 3, 6, generator=g),)
    host = til.compile(q, "host", example_inputs=ex, verbose=False)
    lib = til.compile(q, "rpi5", example_inputs=ex, verbose=False).export_library(tmp_path / "ln_extremes.so")
    zero = np.zeros((4, 2, 6), np.float32)
    huge = np.random.default_rng(3).standard_normal((4, 2, 6)).astype(np.float32)
    huge[1] = 1e4
    huge[2, 0] = -1e4
    for x in (zero, huge):
        want = til.reference(q)(x)
        np.testing.assert_array_equal(host(x), want)
        (got,) = run_emulated(lib, [x], cpu="cortex-a76", verbose=False)
        np.testing.assert_array_equal(got, want)
