"""Quantization: PTQ (`quantize`), QAT (`prepare_qat`), fixed-point constants, PWL fitting.

The names below load on first use (PEP 562), so that importing one module of the package (e.g.
`tvm_intlstm.quant.fixed_point` from the QAT modules in nn/) does not import the whole quantizer
first, which imports those modules back (the layer registry).
"""
import importlib

_LAZY = {
    "QuantConfig": ".config", "quantize": ".api", "prepare_qat": ".api", "convert": ".api",
    "QATModel": ".api", "add_lstm_states": ".api", "QuantizedModel": ".graph",
    "UnsupportedModelError": ".errors", "save_quantized": ".serialize", "load_quantized": ".serialize",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
