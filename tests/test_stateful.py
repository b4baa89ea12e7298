"""Stateful LSTM steps (docs/stateful.md): models that pass (h0, c0) to nn.LSTM quantize, run and
compile with int8 h / int16 c state inputs; the compiled module equals the numpy reference and the
PyTorch integer simulation bit for bit, and a sequence run in chunks with the state carried equals
one run over the whole sequence (host target, and an rpi5 build under qemu)."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.compiler import compile as til_compile, load
from tvm_intlstm.quant import add_lstm_states
from tvm_intlstm.quant.state_format import StateError

SEQ = 70      # longer than the largest chunk (64), and not a multiple of any chunk size


class FeatureStep(nn.Module):
    """1-layer unidirectional LSTM over float features (time-major), 13 units (padded to the x86
    kernels' unit block, so the lowering widens the states), then a final linear layer."""

    def __init__(self, I=6, H=13):
        super().__init__()
        self.lstm = nn.LSTM(I, H)
        self.head = nn.Linear(H, 5)

    def forward(self, x, h0, c0):
        y, (h, c) = self.lstm(x, (h0, c0))
        return self.head(y), h, c


class TokenStep(nn.Module):
    """embedding -> 2-layer LSTM (batch_first) with states -> final linear: the char LM's shape."""

    def __init__(self, V=23, E=10, H=16, L=2, bidirectional=False):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, num_layers=L, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(H * (2 if bidirectional else 1), V)

    def forward(self, ids, h0, c0):
        y, (h, c) = self.lstm(self.embed(ids), (h0, c0))
        return self.head(y), h, c


def _states(rng, rows, B, H, h_scale=0.6, c_scale=1.5):
    return (torch.from_numpy(rng.standard_normal((rows, B, H)).astype(np.float32) * h_scale),
            torch.from_numpy(rng.standard_normal((rows, B, H)).astype(np.float32) * c_scale))


def _feature_batch(rng, T, B):
    return torch.from_numpy(rng.standard_normal((T, B, 6)).astype(np.float32))


def _token_batch(rng, T, B, V=23):
    return torch.from_numpy(rng.integers(0, V, (B, T)))


@pytest.fixture(scope="module")
def feature_step():
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    calib = [(_feature_batch(rng, 9, 4), *_states(rng, 1, 4, 13)) for _ in range(3)]
    q = til.quantize(FeatureStep().eval(), calib)
    x = _feature_batch(rng, 5, 2)
    cm = til_compile(q, "host", (x, *q.zero_state(2)), verbose=False)
    return q, cm, "time"


@pytest.fixture(scope="module")
def token_step():
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    calib = [(_token_batch(rng, 12, 3), *_states(rng, 2, 3, 16)) for _ in range(3)]
    q = til.quantize(TokenStep().eval(), calib)
    cm = til_compile(q, "host", (_token_batch(rng, 5, 2), *q.zero_state(2)), verbose=False)
    return q, cm, "batch"


def _split(x, axis, i, n):
    return x[i:i + n] if axis == "time" else x[:, i:i + n]


def _cat(parts, axis):
    return np.concatenate(parts, axis=0 if axis == "time" else 1)


def _inputs(kind, rng, T, B):
    return _feature_batch(rng, T, B).numpy() if kind == "time" else _token_batch(rng, T, B).numpy()


def _assert_outputs_equal(got, want, what):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype, f"{what}: output {k} dtype {g.dtype} != {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=f"{what}: output {k}")


# ------------------------------------------------------------------------------------------------
# the compiled module with states == reference == PyTorch integer simulation


@pytest.mark.parametrize("model", ["feature_step", "token_step"])
def test_states_bitexact_with_reference_and_torch(model, request):
    q, cm, axis = request.getfixturevalue(model)
    rng = np.random.default_rng(10)
    fmt_h, fmt_c = q.state_formats()
    assert (fmt_h.kind, fmt_c.kind) == ("h", "c") and q.input_kinds[1:] == ["state_h", "state_c"]
    ref = til.reference(q)
    for B, T in ((1, 1), (3, 8), (2, 17)):
        x = _inputs(axis, rng, T, B)
        h0, c0 = q.quantize_state(*_states(rng, fmt_h.rows, B, fmt_h.hidden))
        want = ref(x, h0.numpy(), c0.numpy())
        _assert_outputs_equal([t.numpy() for t in q(torch.from_numpy(x), h0, c0)], want, "torch")
        _assert_outputs_equal(cm(x, h0.numpy(), c0.numpy()), want, f"compiled B={B} T={T}")
        assert want[1].dtype == np.int8 and want[2].dtype == np.int16


def _run_chunked(fn, x, state, axis, chunk):
    T = x.shape[0 if axis == "time" else 1]
    outs = []
    for i in range(0, T, chunk):
        y, h, c = fn(_split(x, axis, i, chunk), *state)
        outs.append(np.asarray(y))
        state = (np.asarray(h), np.asarray(c))
    return _cat(outs, axis), state


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("model", ["feature_step", "token_step"])
def test_chunked_equals_whole_sequence(model, B, request):
    """Chunks of 1, 3 and 64 steps with the state carried give the bits of one run over SEQ steps,
    from the zero state and from a random one; the compiled module's whole run equals the
    reference's."""
    q, cm, axis = request.getfixturevalue(model)
    rng = np.random.default_rng(20 + B)
    fmt = q.state_formats()[0]
    x = _inputs(axis, rng, SEQ, B)
    for start in ("zero", "random"):
        state = (tuple(s.numpy() for s in q.zero_state(B)) if start == "zero" else
                 tuple(s.numpy() for s in q.quantize_state(*_states(rng, fmt.rows, B, fmt.hidden))))
        y, h, c = cm(x, *state)
        _assert_outputs_equal((y, h, c), til.reference(q)(x, *state), f"whole run from the {start} state")
        for chunk in (1, 3, 64):
            yc, (hc, cc) = _run_chunked(cm, x, state, axis, chunk)
            _assert_outputs_equal((yc, hc, cc), (y, h, c), f"chunks of {chunk}, B={B}, {start} state")


def test_zero_state_equals_stateless_model():
    """Zero states give the bits of the same model called without states (nn.LSTM's default)."""
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    m = TokenStep().eval()

    class Stateless(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.lstm, self.head = m.embed, m.lstm, m.head

        def forward(self, ids):
            y, (h, c) = self.lstm(self.embed(ids))
            return self.head(y), h, c

    calib = [_token_batch(rng, 12, 3) for _ in range(2)]
    q0 = til.quantize(Stateless().eval(), calib)
    qs = til.quantize(m, [(ids, *(torch.zeros(2, 3, 16),) * 2) for ids in calib])
    ids = _token_batch(rng, 9, 2)
    _assert_outputs_equal([t.numpy() for t in qs(ids, *qs.zero_state(2))], [t.numpy() for t in q0(ids)],
                          "zero state vs no state")


@pytest.mark.parametrize("model", ["feature_step", "token_step"])
def test_extreme_states(model, request):
    """h all -128 / 127 and c at the int16 limits (and random mixes of the extremes) match the
    reference bit for bit."""
    q, cm, axis = request.getfixturevalue(model)
    rng = np.random.default_rng(30)
    fh = q.state_formats()[0]
    B, shape = 3, (fh.rows, 3, fh.hidden)
    cases = [(np.full(shape, v, np.int8), np.full(shape, w, np.int16))
             for v, w in ((-128, -32768), (127, 32767), (127, -32768), (-128, 32767))]
    cases.append((rng.choice(np.array([-128, 127], np.int8), shape),
                  rng.choice(np.array([-32768, 32767], np.int16), shape)))
    ref = til.reference(q)
    for h0, c0 in cases:
        x = _inputs(axis, rng, 6, B)
        want = ref(x, h0, c0)
        _assert_outputs_equal(cm(x, h0, c0), want, f"compiled, h0 {h0.flat[0]}, c0 {c0.flat[0]}")
        _assert_outputs_equal([t.numpy() for t in q(torch.from_numpy(x), torch.from_numpy(h0),
                                                      torch.from_numpy(c0))], want, "torch")


def test_bidirectional_states_in():
    """Bidirectional layers take states (the reverse direction's row starts at the sequence end); the
    compiled module equals the reference. (Chunking is exact for unidirectional models only.)"""
    torch.manual_seed(6)
    rng = np.random.default_rng(6)
    calib = [(_token_batch(rng, 10, 3), *_states(rng, 4, 3, 16)) for _ in range(2)]
    q = til.quantize(TokenStep(bidirectional=True).eval(), calib)
    fh, fc = q.state_formats()
    assert fh.rows == 4 and fh.num_directions == 2
    assert fh.scales[0] == fh.scales[1] and fc.cell_fracs[2] == fc.cell_fracs[3]  # shared per layer
    cm = til_compile(q, "host", (_token_batch(rng, 5, 2), *q.zero_state(2)), verbose=False)
    for B, T in ((1, 4), (3, 9)):
        ids = _token_batch(rng, T, B).numpy()
        h0, c0 = (s.numpy() for s in q.quantize_state(*_states(rng, 4, B, 16)))
        _assert_outputs_equal(cm(ids, h0, c0), til.reference(q)(ids, h0, c0), f"bidirectional B={B}")


# ------------------------------------------------------------------------------------------------
# formats, conversions, calibration, files


def test_state_formats_and_conversions(token_step):
    q, cm, _ = token_step
    fh, fc = q.state_formats()
    lstm = q.gm.get_submodule("lstm")
    assert fh.scales == tuple(lstm.layer_scales) and fc.cell_fracs == tuple(lstm.cell_fracs)
    assert fc.scales == tuple(2.0 ** -f for f in lstm.cell_fracs)
    h, c = q.zero_state(4)
    assert h.dtype == torch.int8 and c.dtype == torch.int16 and h.shape == c.shape == (2, 4, 16) and not h.any()
    # the states a run returns are in exactly the input formats: h_n / c_n output infos
    out_h, out_c = q.output_info[1], q.output_info[2]
    assert [i.scale for i in out_h.items] == list(fh.scales)
    assert [i.scale for i in out_c.items] == list(fc.cell_fracs)
    # quantize: spec 1's rule per row (ties up), saturating; dequantize: q * s
    units = torch.tensor([0.5, 1.49, -2.25, 1000.0]).repeat(4)          # in units of each row's scale
    fl = torch.tensor(fh.scales, dtype=torch.float32).view(2, 1, 1) * units.view(1, 1, 16)
    qh = fh.quantize(fl)
    assert qh.dtype == torch.int8 and qh[:, 0, :4].tolist() == [[1, 1, -2, 127]] * 2
    deq_h, deq_c = q.dequantize_state(*q.quantize_state(torch.full((2, 1, 16), 0.25), torch.full((2, 1, 16), -1.0)))
    assert torch.allclose(deq_h, torch.full((2, 1, 16), 0.25), atol=max(fh.scales) / 2)
    assert torch.equal(deq_c, torch.full((2, 1, 16), -1.0))
    # the compiled module has the same helpers (numpy)
    zh, zc = cm.zero_state(2)
    assert zh.dtype == np.int8 and zc.dtype == np.int16 and zh.shape == (2, 2, 16)
    assert [f.to_data() for f in cm.state_formats()] == [f.to_data() for f in q.state_formats()]


def test_calibration_observes_states():
    """Given states widen the observed ranges: a model calibrated with large states gets an h scale
    that covers them (so quantize_state does not saturate them)."""
    torch.manual_seed(7)
    rng = np.random.default_rng(7)
    x = _feature_batch(rng, 6, 2)
    small = til.quantize(FeatureStep().eval(), [(x, *_states(rng, 1, 2, 13, 0.01, 0.01))])
    torch.manual_seed(7)
    big = til.quantize(FeatureStep().eval(), [(x, torch.full((1, 2, 13), 3.0), torch.full((1, 2, 13), 20.0))])
    assert big.state_formats()[0].scales[0] >= 3.0 / 127 > small.state_formats()[0].scales[0]
    assert big.state_formats()[1].cell_fracs[0] < small.state_formats()[1].cell_fracs[0]  # |c| <= 20 fits


def test_export_and_load_keep_state_formats(feature_step, tmp_path):
    q, cm, _ = feature_step
    cm2 = load(cm.export_library(tmp_path / "step.so"))
    assert [f.to_data() for f in cm2.state_formats()] == [f.to_data() for f in q.state_formats()]
    rng = np.random.default_rng(8)
    x = _feature_batch(rng, 7, 3).numpy()
    h0, c0 = cm2.quantize_state(*_states(rng, 1, 3, 13))
    _assert_outputs_equal(cm2(x, h0, c0), til.reference(q)(x, h0, c0), "loaded module")
    with pytest.raises(StateError, match="batch size"):
        cm2(x, *cm2.zero_state(2))


def test_save_load_quantized_stateful(token_step, tmp_path):
    q, _, _ = token_step
    q2 = til.load_quantized(til.save_quantized(q, tmp_path / "step.qpt"))
    assert q2.input_kinds == q.input_kinds
    ids = _token_batch(np.random.default_rng(9), 5, 2)
    _assert_outputs_equal([t.numpy() for t in q2(ids, *q2.zero_state(2))],
                          [t.numpy() for t in q(ids, *q.zero_state(2))], "reloaded model")


# ------------------------------------------------------------------------------------------------
# add_lstm_states: a stateless quantized model (e.g. the shipped char LM) made stateful


def test_add_lstm_states_streams_a_stateless_model():
    torch.manual_seed(12)
    rng = np.random.default_rng(12)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(23, 10)
            self.lstm = nn.LSTM(10, 16, num_layers=2, batch_first=True)
            self.head = nn.Linear(16, 23)

        def forward(self, ids):
            y, _ = self.lstm(self.embed(ids))
            return self.head(y)

    q = til.quantize(LM().eval(), [_token_batch(rng, 12, 3) for _ in range(2)])
    qs = add_lstm_states(q)
    assert qs.input_kinds == ["ids", "state_h", "state_c"] and len(qs.output_info) == 3
    ids = _token_batch(rng, 20, 2)
    y, h, c = qs(ids, *qs.zero_state(2))
    assert torch.equal(y, q(ids))  # same modules, same bits from the zero state
    cm = til_compile(qs, "host", (ids[:, :3], *qs.zero_state(2)), verbose=False)
    yc, (hc, cc) = _run_chunked(cm, ids.numpy(), tuple(s.numpy() for s in qs.zero_state(2)), "batch", 3)
    _assert_outputs_equal((yc, hc, cc), (y.numpy(), h.numpy(), c.numpy()), "streamed in chunks of 3")
    with pytest.raises(ValueError, match="already takes states"):
        add_lstm_states(qs)
    with pytest.raises(ValueError, match="no LSTM named"):
        add_lstm_states(q, layers=["decoder"])


# ------------------------------------------------------------------------------------------------
# misuse: clear errors


def test_wrong_states_are_rejected(token_step):
    q, cm, _ = token_step
    ids = _token_batch(np.random.default_rng(13), 4, 2)
    h, c = q.zero_state(2)
    for fn, conv in ((q, lambda t: t), (cm, lambda t: t.numpy())):
        with pytest.raises((StateError, TypeError), match="int8"):
            fn(conv(ids), conv(h.float()), conv(c))
        with pytest.raises((StateError, TypeError), match="int16"):
            fn(conv(ids), conv(h), conv(c.to(torch.int32)))
        with pytest.raises((StateError, ValueError), match="shape"):
            fn(conv(ids), conv(h[:1]), conv(c[:1]))
        with pytest.raises(StateError, match="batch"):
            fn(conv(ids), *(conv(s) for s in q.zero_state(3)))
        with pytest.raises(TypeError, match="zero_state"):
            fn(conv(ids))
    with pytest.raises(ValueError, match="int8"):
        til.reference(q)(ids.numpy(), h.numpy().astype(np.int16), c.numpy())
    with pytest.raises(StateError, match="float state"):
        q.quantize_state(h, c)


def test_state_given_to_a_model_without_states(feature_step):
    torch.manual_seed(14)
    q = til.quantize(nn.Sequential(nn.Linear(6, 4)).eval(), [torch.randn(3, 6)])
    with pytest.raises(TypeError, match="takes no LSTM states"):
        q(torch.randn(3, 6), torch.zeros(1, 3, 4, dtype=torch.int8), torch.zeros(1, 3, 4, dtype=torch.int16))
    with pytest.raises(StateError, match="takes no LSTM states"):
        q.quantize_state(torch.zeros(1, 3, 4))
    assert q.state_formats() == [] and q.zero_state(2) == ()


def test_unsupported_state_forms_are_rejected():
    class OneValue(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8)

        def forward(self, x, hx):
            return self.lstm(x, hx)[0]

    class Computed(OneValue):
        def forward(self, x, h0, c0):
            return self.lstm(x, (h0 * 2, c0))[0]

    class Shared(OneValue):
        def forward(self, x, h0, c0):
            return self.lstm(x, (h0, c0))[0] + h0

    x, s = torch.randn(3, 2, 4), torch.zeros(1, 2, 8)
    with pytest.raises(til.UnsupportedModelError, match="separate model inputs"):
        til.quantize(OneValue().eval(), [(x, (s, s))])
    with pytest.raises(til.UnsupportedModelError, match="must be a model input"):
        til.quantize(Computed().eval(), [(x, s, s)])
    with pytest.raises(til.UnsupportedModelError, match="one nn.LSTM call only"):
        til.quantize(Shared().eval(), [(x, s, s)])


def test_float_state_shapes_checked_at_calibration():
    x = torch.randn(3, 2, 6)
    with pytest.raises(ValueError, match=r"\[1, B, 13\]"):
        til.quantize(FeatureStep().eval(), [(x, torch.zeros(2, 2, 13), torch.zeros(2, 2, 13))])


# ------------------------------------------------------------------------------------------------
# QAT with states


@pytest.mark.parametrize("qat_lstm", ["loop", "fused"])
def test_qat_with_states(qat_lstm):
    """prepare_qat accepts states on both QAT paths: training steps run and reach the states'
    gradients, eval runs the integer model (which takes integer states)."""
    torch.manual_seed(15)
    rng = np.random.default_rng(15)
    calib = [(_token_batch(rng, 8, 3), *_states(rng, 2, 3, 16)) for _ in range(2)]
    qat = til.prepare_qat(TokenStep().train(), til.QuantConfig(qat_lstm=qat_lstm), calib_data=calib)
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    ids, h0, c0 = calib[0]
    h0, c0 = h0.clone().requires_grad_(), c0.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no fallback to another path
        y, h, c = qat(ids, h0, c0)
    (y.square().mean() + h.square().mean()).backward()
    assert h0.grad.abs().sum() > 0 and c0.grad.abs().sum() > 0
    opt.step()
    qat.eval()
    q = qat.convert()
    hq, cq = q.quantize_state(h0.detach(), c0.detach())
    _assert_outputs_equal([t.numpy() for t in qat(ids, hq, cq)], til.reference(q)(ids.numpy(), hq.numpy(), cq.numpy()),
                          "QAT eval")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_qat_fused_and_loop_agree_with_states(bidirectional):
    """The fused C++ loop started from given states: forward values bit for bit those of the Python
    loop, gradients (weights and both states) to float rounding."""
    from tvm_intlstm.nn import qat_fast
    if not qat_fast.available():
        pytest.skip("fused QAT LSTM extension could not be built")
    torch.manual_seed(16)
    rng = np.random.default_rng(16)
    rows = 4 if bidirectional else 2
    calib = [(_token_batch(rng, 8, 3), *_states(rng, rows, 3, 16)) for _ in range(2)]
    res = {}
    for mode in ("loop", "fused"):
        torch.manual_seed(16)
        qat = til.prepare_qat(TokenStep(bidirectional=bidirectional).train(), til.QuantConfig(qat_lstm=mode),
                              calib_data=calib)
        ids, h0, c0 = calib[1]
        h0, c0 = h0.clone().requires_grad_(), c0.clone().requires_grad_()
        y, h, c = qat(ids, h0, c0)
        (y.square().mean() + (h * torch.linspace(-1, 1, 16)).sum() + 0.1 * c.square().sum()).backward()
        res[mode] = ([t.detach() for t in (y, h, c)],
                     [h0.grad, c0.grad] + [p.grad for p in qat.parameters()])
    for a, b in zip(res["loop"][0], res["fused"][0]):
        assert torch.equal(a, b)
    for a, b in zip(res["loop"][1], res["fused"][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))


# ------------------------------------------------------------------------------------------------
# aarch64 under qemu: an rpi5 build carries state across calls like the host build


@pytest.mark.skipif(not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")),
                    reason="needs the aarch64 tools of .ci/install_arm.sh")
def test_chunked_on_aarch64_under_qemu(token_step, tmp_path):
    from tvm_intlstm.runtime.emulate import run_emulated
    q, _, _ = token_step
    lib = til_compile(q, "rpi5", (_token_batch(np.random.default_rng(0), 5, 2), *q.zero_state(2)),
                      verbose=False).export_library(tmp_path / "step_rpi5.so")
    rng = np.random.default_rng(17)
    B, T = 3, 7
    ids = _token_batch(rng, T, B).numpy()
    state = tuple(s.numpy() for s in q.quantize_state(*_states(rng, 2, B, 16)))
    want = til.reference(q)(ids, *state)
    _assert_outputs_equal(run_emulated(lib, [ids, *state], cpu="cortex-a76", verbose=False), want, "aarch64 whole")

    def step(x, h, c):
        return run_emulated(lib, [np.ascontiguousarray(x), h, c], cpu="cortex-a76", verbose=False)

    y, (h, c) = _run_chunked(step, ids, state, "batch", 3)
    _assert_outputs_equal((y, h, c), want, "aarch64 chunks of 3")
