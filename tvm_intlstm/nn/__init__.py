"""PyTorch side: integer ops (torch.ops.intlstm), integer modules, quantization-aware modules."""
from . import intops  # noqa: F401
