"""tvm_intlstm: integer-only LSTM models from PyTorch, compiled with Apache TVM.

    qmodel = tvm_intlstm.quantize(float_model, calib_batches)
    y_int  = qmodel(x)                          # exact integer arithmetic (docs/integer_spec.md)
    y_ref  = tvm_intlstm.reference(qmodel)(x)   # numpy oracle, bit for bit equal
    cm     = tvm_intlstm.compile(qmodel, target="llvm -mcpu=znver3", example_inputs=(x,))
    y_tvm  = cm(x)                              # integer-only TVM module, same bits
"""
from .quant import (QuantConfig, quantize, prepare_qat, convert, QuantizedModel, UnsupportedModelError,  # noqa: F401
                    save_quantized, load_quantized)
from .reference.model import reference  # noqa: F401
from .compiler import compile, load, CompiledModule  # noqa: F401,A004
from .tuning._ms import RPCConfig  # noqa: F401  (tune(..., rpc=RPCConfig(...)))



def tune(*args, **kwargs):
    """MetaSchedule tuning of a quantized model's GEMM kernels (see tvm_intlstm.tuning.tune)."""
    from .tuning import tune as _tune
    return _tune(*args, **kwargs)


__version__ = "0.1.0"
