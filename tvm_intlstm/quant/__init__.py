"""Quantization: PTQ (`quantize`), QAT (`prepare_qat`), fixed-point constants, PWL fitting."""
from .config import QuantConfig  # noqa: F401
from .api import quantize, prepare_qat, convert, QATModel  # noqa: F401
from .graph import QuantizedModel, UnsupportedModelError  # noqa: F401
from .serialize import save_quantized, load_quantized  # noqa: F401
