"""LowerLNLSTM(target, tuned=None): one layer-norm LSTM direction (docs/integer_spec.md 8b) ->

1. the input projection of all T*B rows: the int8 GEMM requantized to int16 (no bias: the layer
   norm's beta holds it), the same linear_requant kernels (and tuning records) as every GEMM;
2. its layer norm per gate block, `kernels.layer_norm16` over a [T*B, 4, H] view;
3. the recurrence, `kernels.ln_lstm_recurrent` (the recurrent product, its layer norm, the PWL gates,
   the cell and its layer norm, h), with the initial states given or zeros; a constant W_h (always,
   from the quantizer) is packed for the target's kernel family (its outer-product micro-kernel,
   on the u8 route where the family has one exact for W_h).
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.expr_functor import mutator

from .. import kernels as K
from ._lowering import (OpLowering, _shape, _shifts_hi, _static, const_numpy, lowering_pass,
                        u8_route, uniform_scale)


def _const_gamma_beta(gamma, beta, groups: int, H: int):
    """gamma / beta [groups * H] as the [groups, H] constants the layer-norm kernels take."""
    g, b = const_numpy(gamma), const_numpy(beta)
    if g is None or b is None:
        raise NotImplementedError("a LayerNormLSTM's layer-norm parameters must be constants (they are, "
                                  "from the quantizer)")
    return (relax.const(g.reshape(groups, H).astype(np.int16), "int16"),
            relax.const(b.reshape(groups, H).astype(np.int64), "int64"))


@mutator
class _LowerLNLSTMMutator(OpLowering):
    def _lower_ln_lstm_direction(self, a):
        G, I = (_static(v, "LSTM size") for v in _shape(a.w_x))
        H = G // 4
        T_, B_ = _shape(a.x)[:2]
        if (a.h0 is None) != (a.c0 is None):
            raise NotImplementedError("a LayerNormLSTM direction with only one of h0 / c0 cannot be "
                                      "compiled: pass both")
        pieces = [_static(_shape(t)[1], "PWL table") - 1 for t in (a.sig, a.tanh, a.tanh_c)]
        # 1. the projection: requantize_16(W_x x) per row, a zero bias
        zero_bias = relax.const(np.zeros(G, np.int32), "int32")
        hx, scx = _shifts_hi(a.sx), uniform_scale(a.mx, a.sx)
        gvx, w_x, bias = self._gemm("linear_requant" + ("_hi" if hx else ""), I, G, "int16", a.w_x,
                                    zero_bias, lambda w7, packed: K.linear_requant(
                                        I, G, "int16", True, target=self.target, w7=w7,
                                        packed=packed, shift_hi=hx, scale=scx), variant=(scx,),
                                    scale=scx)
        ax = self._call_rows(gvx, a.x, [w_x, bias, a.mx, a.sx], G, "int16")
        # 2. its layer norm per gate block
        gam_x, bet_x = _const_gamma_beta(a.gamma_x, a.beta_x, 4, H)
        gv_ln = self._kernel(("layer_norm16", 4, H, a.ml_x, a.sl_x, a.eps_x, str(self.target)),
                             lambda: K.layer_norm16(4, H, a.ml_x, a.sl_x, a.eps_x))
        blocks = self.builder_.emit(relax.op.reshape(ax, [T_ * B_, 4, H]))
        gxb = self.builder_.emit(relax.call_tir(gv_ln, [blocks, gam_x, bet_x],
                                                relax.TensorType([T_ * B_, 4, H], "int16")))
        gx = self.builder_.emit(relax.op.reshape(gxb, [T_, B_, G]))
        # 3. the recurrence
        gam_h, bet_h = _const_gamma_beta(a.gamma_h, a.beta_h, 4, H)
        gam_c, bet_c = _const_gamma_beta(a.gamma_c, a.beta_c, 1, H)
        ln_h, ln_c = (a.ml_h, a.sl_h, a.eps_h), (a.ml_c, a.sl_c, a.eps_c)
        W = const_numpy(a.w_h)
        packed = W is not None
        isa = K.resolve_isa(self.target)
        w7 = u8_route(W, None, isa)
        key = ("ln_lstm_recurrent", H, a.mo, a.so, a.cell_frac, ln_h, ln_c, *pieces,
               bool(a.reverse), w7, packed, str(self.target))
        gv = self._kernel(key, lambda: K.ln_lstm_recurrent(
            H, mo=a.mo, so=a.so, cell_frac=a.cell_frac, ln_h=ln_h, ln_c=ln_c,
            sig_pieces=pieces[0], tanh_pieces=pieces[1], tanh_c_pieces=pieces[2],
            reverse=bool(a.reverse), target=self.target, w7=w7, packed=packed))
        func = self.cache[("func",) + key]
        if packed:   # (the u8 route's kernel also takes its correction after sh)
            wk, _, corr = K.prepare_weights(func, W)
            weight = [relax.const(wk, "int8"), a.mh, a.sh] + (
                [relax.const(corr, "int32")] if K.kernel_convention(func)[0] else [])
        else:
            weight = [a.w_h, a.mh, a.sh]
        if a.h0 is None:
            state = [self.builder_.emit(relax.op.zeros(relax.ShapeExpr([B_, H]), dt))
                     for dt in ("int8", "int16")]
        else:
            state = [a.h0, a.c0]
        out_ty = [relax.TensorType([T_, B_, H], "int8"), relax.TensorType([B_, H], "int8"),
                  relax.TensorType([B_, H], "int16")]
        return self.builder_.emit(relax.call_tir(
            gv, [gx] + weight + [gam_h, bet_h, gam_c, bet_c, a.sig, a.tanh, a.tanh_c] + state,
            out_ty))


LowerLNLSTM = lowering_pass(_LowerLNLSTMMutator, "tvm_intlstm.LowerLNLSTM")
