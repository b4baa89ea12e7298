"""Layer-norm LSTM (spec 8b) and the int16 layer norm (spec 10b): the numpy reference against exact
and float semantics, extreme inputs, and the PTQ parameters of a float LayerNormLSTM against it."""
import math

import numpy as np
import pytest
import torch

from tvm_intlstm.nn.ln_lstm import LayerNormLSTM
from tvm_intlstm.quant.fixed_point import quantize_multiplier15
from tvm_intlstm.quant.ln_lstm import ln_lstm_ranges, quantize_ln_lstm_direction
from tvm_intlstm.reference import ops

rng = np.random.default_rng(88)


def exact_layer_norm16(x, gamma, beta, Ml, sl, eps=0):
    """spec 10b with Python integers (no int64 limits) row by row: the bound claims of the spec are
    checked on the way."""
    out = []
    for row in np.asarray(x, dtype=object).reshape(-1, x.shape[-1]):
        D = len(row)
        S = sum(int(v) for v in row)
        mu = (2 * S + D) // (2 * D)
        d = [int(v) - mu for v in row]
        V = sum(v * v for v in d)
        assert V < 2**46
        r = max(1, math.isqrt(V // D + eps))
        n = [(2 * v * 2**12 + r) // (2 * r) for v in d]
        assert max(abs(v) for v in n) < 2**20
        ys = []
        for k in range(D):
            acc = (n[k] * int(gamma[k]) + int(beta[k])) * Ml
            assert abs(acc) < 2**63
            y = (acc + (1 << (sl - 1))) >> sl
            ys.append(min(max(y, -32768), 32767))
        out.append(ys)
    return np.array(out, dtype=np.int16).reshape(x.shape)


def random_ln(D, gmax=32767, bmax=2**40):
    gamma = rng.integers(-gmax, gmax + 1, D).astype(np.int16)
    beta = rng.integers(-bmax, bmax + 1, D).astype(np.int64)
    Ml, sl = quantize_multiplier15(rng.uniform(1e-5, 1e-3))
    return gamma, beta, Ml, sl


@pytest.mark.parametrize("D,eps", [(1, 0), (2, 5), (7, 0), (64, 2**40), (4096, 671)])
def test_layer_norm16_equals_exact_integers(D, eps):
    x = rng.integers(-32768, 32768, (5, D)).astype(np.int16)
    x[1] = 1234                               # a constant row: n = 0, y = beta requantized
    x[2] = 0
    x[2, 0] = 32767                           # one huge entry
    x[3] = np.where(np.arange(D) % 2, -32768, 32767)   # largest spread
    g, b, Ml, sl = random_ln(D)
    np.testing.assert_array_equal(ops.layer_norm16(x, g, b, Ml, sl, eps),
                                  exact_layer_norm16(x, g, b, Ml, sl, eps))


def test_layer_norm16_close_to_float():
    D = 96
    x = (rng.normal(0, 3000, (20, D)) + rng.normal(0, 5000, (20, 1))).clip(-32768, 32767).astype(np.int16)
    gamma_f = rng.uniform(0.5, 1.5, D)
    beta_f = rng.uniform(-0.5, 0.5, D)
    s_g = gamma_f.max() / 32767
    g = np.round(gamma_f / s_g).astype(np.int16)
    b = np.round(beta_f / (s_g * 2.0**-12)).astype(np.int64)
    Ml, sl = quantize_multiplier15(s_g)
    y = ops.layer_norm16(x, g, b, Ml, sl) / 2**12
    xf = x.astype(np.float64)
    ref = (xf - xf.mean(-1, keepdims=True)) / xf.std(-1, keepdims=True) * gamma_f + beta_f
    assert np.abs(y - ref).max() < 2e-3          # a few Q3.12 units


def test_layer_norm16_rejects_bad_input():
    g, b, Ml, sl = random_ln(4)
    with pytest.raises(TypeError, match="int16"):
        ops.layer_norm16(np.zeros((2, 4), np.int8), g, b, Ml, sl)
    with pytest.raises(ValueError, match="4096"):
        ops.layer_norm16(np.zeros((1, 4097), np.int16), *random_ln(4097))
    with pytest.raises(ValueError, match="epsilon"):
        ops.layer_norm16(np.zeros((1, 4), np.int16), g, b, Ml, sl, -1)


def _float_and_int(I=12, H=16, T=9, B=3, seed=0, reverse=False):
    torch.manual_seed(seed)
    m = LayerNormLSTM(I, H, bidirectional=reverse)
    with torch.no_grad():               # non-trivial affine parameters
        for d in m.directions:
            d.gamma_ih.uniform_(0.5, 1.5)
            d.gamma_hh.uniform_(0.5, 1.5)
            d.gamma_c.uniform_(0.5, 1.5)
            d.beta_c.uniform_(-0.3, 0.3)
    x = torch.randn(T, B, I)
    s_x = float(x.abs().max()) / 127
    direction = m.directions[1 if reverse else 0]
    ranges = ln_lstm_ranges(direction, [x], reverse=reverse)
    p = quantize_ln_lstm_direction(direction, s_x, ranges)
    return m, direction, x, s_x, p, ranges


@pytest.mark.parametrize("reverse", [False, True])
def test_ln_lstm_reference_close_to_float(reverse):
    m, direction, x, s_x, p, ranges = _float_and_int(reverse=reverse)
    xq = ops.quantize_input(x.numpy(), np.float32(s_x))
    y, hT, cT = ops.ln_lstm_direction(xq, p, reverse=reverse)
    assert y.dtype == np.int8 and hT.dtype == np.int8 and cT.dtype == np.int16
    with torch.no_grad():   # the float model on the same (dequantized) input
        B, H = x.shape[1], direction.hidden_size
        xd = torch.from_numpy(xq.astype(np.float32) * np.float32(s_x))
        yf, hf, cf = direction(xd, torch.zeros(B, H), torch.zeros(B, H), reverse=reverse)
    s_h = max(ranges.h, 1e-12) / 127
    err = np.abs(y * s_h - yf.numpy()).max()
    print(f"LN-LSTM integer vs float, max |h| error {err:.4f} (|h| < 1)")
    # Looser than the plain LSTM's 0.06 (spec 13): the recurrent layer norm rescales W_h h to unit
    # variance, so the int8 rounding of a small h is amplified (errors shrink as |h| grows; with
    # 64-piece tables they drop by about a third, so half of it is the 16-piece PWL)
    assert err < 0.1
    np.testing.assert_array_equal(y[0 if reverse else -1], hT)
    assert np.abs(cT / 2**p.cell_frac - cf.numpy()).max() < 0.08


def test_ln_lstm_module_interface():
    torch.manual_seed(1)
    m = LayerNormLSTM(5, 8, num_layers=2, batch_first=True, bidirectional=True)
    x = torch.randn(3, 7, 5)
    y, (h, c) = m(x)
    assert y.shape == (3, 7, 16) and h.shape == (4, 3, 8) and c.shape == (4, 3, 8)
    # a state carried over two chunks equals one run (unidirectional)
    u = LayerNormLSTM(5, 8, num_layers=2)
    xs = torch.randn(10, 2, 5)
    y_all, (h_all, c_all) = u(xs)
    y1, s1 = u(xs[:4])
    y2, (h2, c2) = u(xs[4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2]), y_all)
    torch.testing.assert_close(h2, h_all)
    with pytest.raises(ValueError, match="3-d"):
        m(torch.randn(7, 5))


def test_ln_lstm_reference_state_chunks_and_extremes():
    _, _, x, s_x, p, _ = _float_and_int(T=12)
    xq = ops.quantize_input(x.numpy(), np.float32(s_x))
    y, hT, cT = ops.ln_lstm_direction(xq, p)
    y1, h1, c1 = ops.ln_lstm_direction(xq[:5], p)
    y2, h2, c2 = ops.ln_lstm_direction(xq[5:], p, h0=h1, c0=c1)
    np.testing.assert_array_equal(np.concatenate([y1, y2]), y)
    np.testing.assert_array_equal(h2, hT)
    np.testing.assert_array_equal(c2, cT)
    # extreme inputs and states: every intermediate stays in its spec range (the reference asserts
    # int32 requantize inputs and PWL products), outputs are in range
    B, H = 3, p.hidden
    xe = np.full((4, B, xq.shape[2]), -128, np.int8)
    xe[:, 1] = 127
    h0 = np.full((B, H), 127, np.int8)
    h0[2] = -128
    c0 = np.full((B, H), 32767, np.int16)
    c0[1] = -32768
    c0[2, ::2] = 0                         # constant (zero-variance) rows and mixed rows
    y, hT, cT = ops.ln_lstm_direction(xe, p, h0=h0, c0=c0)
    assert y.dtype == np.int8 and cT.dtype == np.int16
