"""Relax passes, one per file, composed by `integer_pipeline`."""
import tvm

from .lower_integer_ops import LowerIntegerOps
from .verify_integer_only import FloatOpError, VerifyIntegerOnly


def integer_pipeline(target) -> tvm.transform.Pass:
    """Quantized graph (intlstm.* placeholders) -> TIR kernels, then the integer-only check."""
    return tvm.transform.Sequential([LowerIntegerOps(target), VerifyIntegerOnly()],
                                    name="tvm_intlstm.integer_pipeline")


__all__ = ["LowerIntegerOps", "VerifyIntegerOnly", "FloatOpError", "integer_pipeline"]
