"""LowerBoundary(target): the model inputs. Float features -> int8 (the one kernel allowed to
read floats, tagged `intlstm.boundary`), token ids -> int8 embedding rows."""
from __future__ import annotations

from tvm import relax
from tvm.relax.expr_functor import mutator

from .. import kernels as K
from ._lowering import OpLowering, _shape, _static, lowering_pass


@mutator
class _LowerBoundaryMutator(OpLowering):
    def _lower_quantize_input(self, a):
        x, scale = a.x, a.scale
        F = _static(_shape(x)[-1], "input features")
        gv = self._kernel(("quantize_input", F, scale), lambda: K.quantize_input(F, scale).with_attr("intlstm.boundary", 1))
        return self._call_rows(gv, x, [], F, "int8")

    def _lower_embedding(self, a):
        ids, table = a.ids, a.table
        V, D = (_static(v, "embedding size") for v in _shape(table))
        idt = ids.ty.dtype
        gv = self._kernel(("embedding", V, D, idt), lambda: K.embedding(V, D, idt))
        shp = _shape(ids)
        n = 1
        for d in shp:
            n = n * d
        flat = self.builder_.emit(relax.op.reshape(ids, [n]))
        y = self.builder_.emit(relax.call_tir(gv, [flat, table], relax.TensorType([n, D], "int8")))
        return self.builder_.emit(relax.op.reshape(y, shp + [D]))



LowerBoundary = lowering_pass(_LowerBoundaryMutator, "tvm_intlstm.LowerBoundary")
