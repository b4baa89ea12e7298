"""numpy integer reference (the oracle). `reference(qmodel)` runs a whole quantized model.

`tvm_intlstm.reference` is this package and is also callable: `tvm_intlstm.reference(qmodel)` is
`tvm_intlstm.quant.oracle.reference(qmodel)` (the graph walker, which needs torch; `ops` needs only
numpy).
"""
import sys
import types

from . import ops  # noqa: F401
from .ops import PWLTable, LSTMDirectionParams  # noqa: F401


class _CallablePackage(types.ModuleType):
    def __call__(self, qmodel):
        from ..quant.oracle import reference  # pylint: disable=import-outside-toplevel
        return reference(qmodel)


sys.modules[__name__].__class__ = _CallablePackage
