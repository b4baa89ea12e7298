"""PyTorch side: integer ops (torch.ops.intlstm), integer modules, quantization-aware modules."""
from . import intops  # noqa: F401
from .ln_lstm import LayerNormLSTM  # noqa: F401
from .attention import BahdanauAttention, LuongAttention, MultiheadAttention  # noqa: F401  (issue 18: attention)
