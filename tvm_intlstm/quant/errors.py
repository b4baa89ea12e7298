"""Errors of the quantizer (a leaf module: the layer registry, the graph handling and the state
handling raise them without importing each other)."""


class UnsupportedModelError(ValueError):
    """The float model uses a layer or an operation tvm_intlstm cannot quantize."""
