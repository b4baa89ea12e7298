"""tvm_intlstm: integer-only LSTM models from PyTorch, compiled with Apache TVM.

    qmodel = tvm_intlstm.quantize(float_model, calib_batches)
    y_int  = qmodel(x)                          # exact integer arithmetic (docs/integer_spec.md)
    y_ref  = tvm_intlstm.reference(qmodel)(x)   # numpy oracle, bit for bit equal
"""
from .quant import QuantConfig, quantize, prepare_qat, convert, QuantizedModel, UnsupportedModelError  # noqa: F401
from .reference.model import reference  # noqa: F401

__version__ = "0.1.0"
