"""The LN-LSTM kernels (norm.layer_norm16, ln_lstm.ln_lstm_recurrent) against the numpy reference of
spec 8b / 10b bit for bit: random and extreme inputs, states, both directions."""
import numpy as np
import pytest

from tvm_intlstm import kernels as K
from tvm_intlstm.quant.fixed_point import quantize_multiplier15
from tvm_intlstm.reference import ops

from test_kernels import run
from test_ln_lstm_reference import _float_and_int, exact_layer_norm16

TARGET = K.host_target()
rng = np.random.default_rng(515)




@pytest.mark.parametrize("G,D,eps", [(1, 1, 0), (4, 13, 7), (1, 256, 2**40), (2, 9, 2**46 - 1)])
def test_layer_norm16_kernel(G, D, eps):
    Ml, sl = quantize_multiplier15(rng.uniform(1e-5, 1e-3))
    k = K.build_kernel(K.layer_norm16(G, D, Ml, sl, eps), TARGET)
    gamma = rng.integers(-32768, 32768, (G, D)).astype(np.int16)
    beta = rng.integers(-2**40, 2**40, (G, D)).astype(np.int64)
    x = rng.integers(-32768, 32768, (6, G, D)).astype(np.int16)
    x[1] = 77                                          # constant rows
    x[2, :, ::2], x[2, :, 1::2] = -32768, 32767        # largest spread
    x[3] = -32768
    got = run(k, [x, gamma, beta], [(x.shape, "int16")])
    want = ops.layer_norm16(x, gamma, beta, Ml, sl, eps)
    np.testing.assert_array_equal(got, want)
    if G == 1:
        np.testing.assert_array_equal(got[:, 0], exact_layer_norm16(x[:, 0], gamma[0], beta[0], Ml, sl, eps))
    with pytest.raises(ValueError, match="4096"):
        K.layer_norm16(1, 4097, Ml, sl)
    with pytest.raises(ValueError, match="2\\^15"):
        K.layer_norm16(1, 8, 2**15, sl)


def _run_ln_lstm(p, gx, h0, c0, reverse, form="natural"):
    """form: "natural" (plain loops over W_h [4H, H]), "packed" (the host family's outer-product
    micro-kernel on the int16 route) or "packed_u8" (its u8 route, where the family has one exact
    for W_h; else the int16 route again)."""
    H = p.hidden
    kw = {}
    if form != "natural":
        kw = dict(target=TARGET, packed=True,
                  w7=form == "packed_u8" and K.weights_fit_u8(p.w_h, K.resolve_isa(TARGET)))
    f = K.ln_lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac,
                            ln_h=(p.ln_h.ml, p.ln_h.sl, p.ln_h.eps),
                            ln_c=(p.ln_c.ml, p.ln_c.sl, p.ln_c.eps),
                            sig_pieces=p.sig.pieces, tanh_pieces=p.tanh.pieces,
                            tanh_c_pieces=p.tanh_c.pieces, reverse=reverse, **kw)
    k = K.build_kernel(f, TARGET)
    T_, B, _ = gx.shape
    wk, _, corr = K.prepare_weights(f, p.w_h)
    ins = [gx, wk, p.mh, p.sh] + ([corr] if K.kernel_convention(f)[0] else []) + [
           p.ln_h.gamma.reshape(4, H), p.ln_h.beta.reshape(4, H),
           p.ln_c.gamma.reshape(1, H), p.ln_c.beta.reshape(1, H), K.pack_pwl(p.sig),
           K.pack_pwl(p.tanh), K.pack_pwl(p.tanh_c), h0, c0]
    return run(k, ins, [((T_, B, H), "int8"), ((B, H), "int8"), ((B, H), "int16")])


@pytest.mark.parametrize("form", ["natural", "packed", "packed_u8"])
@pytest.mark.parametrize("reverse", [False, True])
def test_ln_lstm_recurrent_kernel(reverse, form):
    _, _, x, s_x, p, _ = _float_and_int(I=10, H=12, T=7, B=3, reverse=reverse)
    xq = ops.quantize_input(x.numpy(), np.float32(s_x))
    H, B = p.hidden, xq.shape[1]
    gx = ops.ln_lstm_gates_x(xq, p)
    h0 = rng.integers(-128, 128, (B, H)).astype(np.int8)
    c0 = rng.integers(-32768, 32768, (B, H)).astype(np.int16)
    h0[1], c0[1] = 127, 32767                 # extreme states
    c0[2] = -32768
    for start in ((np.zeros((B, H), np.int8), np.zeros((B, H), np.int16)), (h0, c0)):
        y, hT, cT = _run_ln_lstm(p, gx, *start, reverse, form)
        ry, rh, rc = ops.ln_lstm_direction(xq, p, reverse=reverse, h0=start[0], c0=start[1])
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(hT, rh)
        np.testing.assert_array_equal(cT, rc)
    # extreme gates: gx at the int16 limits
    gxe = np.where(rng.random(gx.shape) < 0.5, -32768, 32767).astype(np.int16)
    y, hT, cT = _run_ln_lstm(p, gxe, h0, c0, reverse, form)
    # (the reference takes x; feed its cell loop the same gx)
    h, c = h0, c0
    ys = np.zeros_like(y)
    for t in (range(gxe.shape[0] - 1, -1, -1) if reverse else range(gxe.shape[0])):
        h, c = ops.ln_lstm_cell(gxe[t], h, c, p)
        ys[t] = h
    np.testing.assert_array_equal(y, ys)
    np.testing.assert_array_equal(cT, c)
