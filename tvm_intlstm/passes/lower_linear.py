"""LowerLinear(target): linear layers -> int8 GEMM kernels (int32 logits for the final layer,
per-row fixed-point requantization to int8 for hidden layers)."""
from __future__ import annotations

from tvm.relax.expr_functor import mutator

from .. import kernels as K
from ._lowering import OpLowering, _shape, _shifts_hi, _static, lowering_pass, uniform_scale


@mutator
class _LowerLinearMutator(OpLowering):
    def _lower_linear_i32(self, a):
        x, w, b = a.x, a.w, a.b
        O, Kf = (_static(v, "linear size") for v in _shape(w))
        gv, w, b = self._gemm("linear_i32", Kf, O, "int32", w, b, lambda w7, packed: K.linear_i32(
            Kf, O, True, target=self.target, w7=w7, packed=packed))
        return self._call_rows(gv, x, [w, b], O, "int32")

    def _lower_linear_requant(self, a):
        x, w, b, m, s, bits = a.x, a.w, a.b, a.m, a.s, a.out_bits
        O, Kf = (_static(v, "linear size") for v in _shape(w))
        dt = f"int{bits}"
        hi = _shifts_hi(s)
        sc = uniform_scale(m, s)
        gv, w, b = self._gemm("linear_requant" + ("_hi" if hi else ""), Kf, O, dt, w, b,
                              lambda w7, packed: K.linear_requant(
                                  Kf, O, dt, True, target=self.target, w7=w7, packed=packed,
                                  shift_hi=hi, scale=sc), variant=(sc,), scale=sc)
        return self._call_rows(gv, x, [w, b, m, s], O, dt)



LowerLinear = lowering_pass(_LowerLinearMutator, "tvm_intlstm.LowerLinear")
