"""Reference ops (spec sections 5-11) against float semantics, and the torch integer ops against the
reference bit for bit, on random and extreme inputs."""
import numpy as np
import pytest
import torch

from tvm_intlstm.nn import intops
from tvm_intlstm.quant import fixed_point as fp
from tvm_intlstm.quant.pwl import fit_pwl
from tvm_intlstm.reference import ops

OPS = torch.ops.intlstm
rng = np.random.default_rng(1234)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def test_linear_matches_float_and_torch():
    x = rng.integers(-128, 128, size=(9, 33)).astype(np.int8)
    W = rng.integers(-127, 128, size=(17, 33)).astype(np.int8)
    b = rng.integers(-(2**20), 2**20, size=17).astype(np.int32)
    acc = ops.linear(x, W, b)
    np.testing.assert_array_equal(acc, x.astype(np.int64) @ W.astype(np.int64).T + b)
    np.testing.assert_array_equal(acc, OPS.linear_i32(t(x), t(W), t(b)).numpy())
    M, s = fp.quantize_multiplier_array(rng.uniform(1e-5, 1e-3, size=17))
    r = ops.linear(x, W, b, M, s)
    assert r.dtype == np.int8
    np.testing.assert_array_equal(r, OPS.linear_requant(t(x), t(W), t(b), t(M), t(s), 8).numpy())
    r16 = ops.requantize(acc, M, s, 16)
    np.testing.assert_array_equal(r16, OPS.linear_requant(t(x), t(W), t(b), t(M), t(s), 16).numpy())


def test_linear_extremes():
    K = 4096
    x = np.full((2, K), -128, np.int8)
    W = np.full((3, K), 127, np.int8)
    W[1] = -127
    b = np.array([2**30, -(2**30), 0], np.int32)
    acc = ops.linear(x, W, b)
    assert acc[0, 0] == -128 * 127 * K + 2**30
    np.testing.assert_array_equal(acc, OPS.linear_i32(t(x), t(W), t(b)).numpy())


def test_embedding_range_check():
    table = rng.integers(-127, 128, size=(10, 4)).astype(np.int8)
    ids = np.array([[0, 9, 3]])
    np.testing.assert_array_equal(ops.embedding(ids, table), table[ids])
    np.testing.assert_array_equal(OPS.embedding(t(ids), t(table)).numpy(), table[ids])
    for bad in ([[10]], [[-1]]):
        with pytest.raises(IndexError):
            ops.embedding(np.array(bad), table)
        with pytest.raises(IndexError):
            OPS.embedding(t(np.array(bad)), t(table))


def test_isqrt_exact():
    v = np.concatenate([np.arange(0, 2000), rng.integers(0, 2**62, size=2000),
                        np.array([2**62 - 1, 2**52, 2**52 - 1])]).astype(np.int64)
    r = ops.isqrt(v)
    import math
    assert all(int(a) == math.isqrt(int(b)) for a, b in zip(r, v))
    np.testing.assert_array_equal(r, intops.isqrt(t(v)).numpy())


def _ln_params(D, gamma, beta, s_y):
    s_g = float(np.abs(gamma).max()) / 32767
    gq = np.round(gamma / s_g).astype(np.int16)
    bq = np.round(beta / (s_g * 2**-12)).astype(np.int64)
    ml, sl = fp.quantize_multiplier15(s_g * 2**-12 / s_y)
    return gq, bq, ml, sl


@pytest.mark.parametrize("D", [8, 64, 512])
def test_layer_norm_vs_float(D):
    x = rng.integers(-128, 128, size=(20, D)).astype(np.int8)
    x[0] = 5                          # constant row: n = 0 -> beta
    x[1] = -128
    x[1, 0] = 127                     # one outlier
    gamma = rng.uniform(0.5, 1.5, D)
    beta = rng.uniform(-0.2, 0.2, D)
    s_y = 4.0 / 127
    gq, bq, ml, sl = _ln_params(D, gamma, beta, s_y)
    y = ops.layer_norm(x, gq, bq, ml, sl)
    xf = x.astype(np.float64)
    mu, sd = xf.mean(-1, keepdims=True), xf.std(-1, keepdims=True)
    ref = np.where(sd > 0, (xf - mu) / np.where(sd > 0, sd, 1), 0) * gamma + beta
    want = np.clip(np.round(ref / s_y), -128, 127)
    assert np.max(np.abs(y - want)) <= 1
    np.testing.assert_array_equal(y, OPS.layer_norm(t(x), t(gq), t(bq), ml, sl).numpy())


def test_softmax_and_context_vs_float():
    exp_t = fit_pwl("exp", 16, 10)
    s_z = 0.003
    mz, sz = fp.quantize_multiplier(s_z / 2**-10)
    z = rng.integers(-3000, 3000, size=(6, 37)).astype(np.int32)
    z[0] = 0                        # uniform
    z[1, 0] = 2**31 - 1             # extreme spread
    z[1, 1:] = -(2**31)
    p = ops.softmax(z, mz, sz, exp_t)
    pf = torch.softmax(torch.from_numpy(z.astype(np.float64) * s_z), -1).numpy()
    assert np.max(np.abs(p / 2**15 - pf)) < 0.01
    assert p[1, 0] == 32767 and p[1, 1:].max() == 0
    np.testing.assert_array_equal(p, OPS.softmax(t(z), mz, sz, intops.pack_table(exp_t)).numpy())
    v = rng.integers(-128, 128, size=(6, 37, 5)).astype(np.int8)
    s_v, s_c = 0.05, 0.05
    mc, sc = fp.quantize_multiplier(2**-15 * s_v / s_c)
    ctx = ops.attention_context(p, v, mc, sc)
    cf = np.einsum("bk,bkd->bd", p / 2**15, v * s_v)
    assert np.max(np.abs(ctx * s_c - cf)) <= s_c * 1.01
    np.testing.assert_array_equal(ctx, OPS.attention_context(t(p), t(v), mc, sc).numpy())


def _random_lstm_params(I, H, cell_frac=11, pieces=16, scale=0.2, seed=0):
    r = np.random.default_rng(seed)
    w_ih = r.normal(0, scale, (4 * H, I))
    w_hh = r.normal(0, scale, (4 * H, H))
    b = r.normal(0, 0.1, 4 * H)
    s_x, s_h = 3.0 / 127, 1.0 / 127
    swx = np.abs(w_ih).max(1) / 127
    swh = np.abs(w_hh).max(1) / 127
    mx, sx = fp.quantize_multiplier_array(s_x * swx / 2**-12)
    mh, sh = fp.quantize_multiplier_array(s_h * swh / 2**-12)
    mo, so = fp.quantize_multiplier(2**-30 / s_h)
    p = ops.LSTMDirectionParams(
        w_x=np.round(w_ih / swx[:, None]).astype(np.int8), w_h=np.round(w_hh / swh[:, None]).astype(np.int8),
        bias=np.round(b / (s_x * swx)).astype(np.int32), mx=mx, sx=sx, mh=mh, sh=sh, mo=mo, so=so,
        cell_frac=cell_frac, sig=fit_pwl("sigmoid", pieces, 12), tanh=fit_pwl("tanh", pieces, 12),
        tanh_c=fit_pwl("tanh", pieces, cell_frac))
    return p, (w_ih, w_hh, b, s_x, s_h)


def _torch_lstm_direction(x, p, reverse):
    return OPS.lstm_direction(t(x), t(p.w_x), t(p.w_h), t(p.bias), t(p.mx), t(p.sx), t(p.mh), t(p.sh),
                              intops.pack_table(p.sig), intops.pack_table(p.tanh), intops.pack_table(p.tanh_c),
                              p.mo, p.so, p.cell_frac, reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell_frac,pieces", [(11, 16), (13, 4), (9, 64)])
def test_lstm_direction_torch_equals_reference(reverse, cell_frac, pieces):
    p, _ = _random_lstm_params(12, 24, cell_frac, pieces, scale=0.5, seed=cell_frac)
    x = rng.integers(-128, 128, size=(15, 3, 12)).astype(np.int8)
    y, h, c = ops.lstm_direction(x, p, reverse=reverse)
    yt, ht, ct = _torch_lstm_direction(x, p, reverse)
    np.testing.assert_array_equal(y, yt.numpy())
    np.testing.assert_array_equal(h, ht.numpy())
    np.testing.assert_array_equal(c, ct.numpy())
    assert (y[0] if reverse else y[-1]).tolist() == h.tolist()


def test_lstm_direction_saturation():
    """Huge weights drive every gate and the cell state into saturation: still identical."""
    p, _ = _random_lstm_params(8, 16, 11, 16, scale=5.0, seed=7)
    x = np.full((20, 2, 8), 127, np.int8)
    x[:, 1] = -128
    y, h, c = ops.lstm_direction(x, p)
    yt, ht, ct = _torch_lstm_direction(x, p, False)
    np.testing.assert_array_equal(y, yt.numpy())
    np.testing.assert_array_equal(c, ct.numpy())
    assert np.abs(c.astype(np.int64)).max() >= 2**14  # really saturating


def test_lstm_direction_close_to_float():
    I, H = 16, 32
    p, (w_ih, w_hh, b, s_x, s_h) = _random_lstm_params(I, H, 11, 16)
    xf = rng.uniform(-2.5, 2.5, size=(30, 2, I)).astype(np.float32)
    xq = ops.quantize_input(xf, s_x)
    y, _, _ = ops.lstm_direction(xq, p)
    lstm = torch.nn.LSTM(I, H, bias=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(w_ih))
        lstm.weight_hh_l0.copy_(torch.from_numpy(w_hh))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b))
        lstm.bias_hh_l0.zero_()
        yf, _ = lstm(torch.from_numpy(xq.astype(np.float32) * s_x))
    err = np.abs(y * s_h - yf.numpy()).max()
    assert err < 0.03, err
