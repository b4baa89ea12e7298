"""Relax passes, one per file, composed by `integer_pipeline`:

    LowerBoundary -> LowerLinear -> LowerLSTM -> LowerLNLSTM -> LowerElementwise -> LowerAttention
    -> VerifyIntegerOnly
"""
import tvm

from .lower_attention import LowerAttention
from .lower_boundary import LowerBoundary
from .lower_elementwise import LowerElementwise
from .lower_linear import LowerLinear
from .lower_ln_lstm import LowerLNLSTM
from .lower_lstm import LowerLSTM
from .verify_integer_only import FloatOpError, VerifyIntegerOnly


def integer_pipeline(target, tuned=None, threads: bool = False) -> tvm.transform.Pass:
    """Quantized graph (intlstm.* placeholders) -> TIR kernels, then the integer-only check.
    `tuned` (tvm_intlstm.tuning.apply_tuning_logs) supplies MetaSchedule-tuned GEMM kernels;
    threads=True lets LowerLSTM pick the kernels that use TVM's thread pool (docs/compiler.md)."""
    return tvm.transform.Sequential(
        [LowerBoundary(target), LowerLinear(target, tuned), LowerLSTM(target, tuned, threads),
         LowerLNLSTM(target, tuned),
         LowerElementwise(target), LowerAttention(target),
         VerifyIntegerOnly()], name="tvm_intlstm.integer_pipeline")


__all__ = ["LowerBoundary", "LowerLinear", "LowerLSTM", "LowerLNLSTM", "LowerElementwise", "LowerAttention",
           "VerifyIntegerOnly",
           "FloatOpError", "integer_pipeline"]
