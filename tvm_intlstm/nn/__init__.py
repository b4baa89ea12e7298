"""PyTorch side: integer ops (torch.ops.intlstm), integer modules, quantization-aware modules."""
from . import intops  # noqa: F401
from .ln_lstm import LayerNormLSTM  # noqa: F401
