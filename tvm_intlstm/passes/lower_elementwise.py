"""LowerElementwise(target): 8-bit residual adds, rescales and integer layer norm."""
from __future__ import annotations

from tvm.relax.expr_functor import mutator

from .. import kernels as K
from ._lowering import OpLowering, _shape, _static, lowering_pass


@mutator
class _LowerElementwiseMutator(OpLowering):
    def _lower_residual_add(self, a):
        x, y, ma, mb, s = a.a, a.b, a.ma, a.mb, a.s
        F = _static(_shape(x)[-1], "features")
        gv = self._kernel(("residual_add", F, ma, mb, s), lambda: K.residual_add(F, ma, mb, s))
        return self._call_rows(gv, [x, y], [], F, "int8")

    def _lower_rescale(self, a):
        x, m, s = a.x, a.m, a.s
        F = _static(_shape(x)[-1], "features")
        gv = self._kernel(("rescale_8", F, m, s), lambda: K.rescale_8(F, m, s))
        return self._call_rows(gv, x, [], F, "int8")

    def _lower_layer_norm(self, a):
        x, gamma, beta, ml, sl = a.x, a.gamma, a.beta, a.ml, a.sl
        F = _static(_shape(x)[-1], "features")
        gv = self._kernel(("layer_norm", F, ml, sl), lambda: K.layer_norm(F, ml, sl))
        return self._call_rows(gv, x, [gamma, beta], F, "int8")


LowerElementwise = lowering_pass(_LowerElementwiseMutator, "tvm_intlstm.LowerElementwise")
