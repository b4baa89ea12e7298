"""numpy integer reference (the oracle). `reference(qmodel)` runs a whole quantized model."""
from . import ops  # noqa: F401
from .ops import PWLTable, LSTMDirectionParams  # noqa: F401
