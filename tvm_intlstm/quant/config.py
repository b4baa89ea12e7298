"""Quantization configuration (small frozen dataclass, in the style of torchao's configs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class QuantConfig:
    """How a float model is quantized.

    pwl_pieces: pieces of the sigmoid/tanh PWL tables (2..64).
    pwl_method: 'adaptive' (greedy minimax knots, the default) or 'uniform' (the baseline).
    cell_frac: fixed fractional bits of the int16 cell state; None derives it per layer from calibration.
    qat_observe_batches: for prepare_qat without calibration data, how many training batches run in
        float to record activation ranges before fake quantization starts.
    """

    pwl_pieces: int = 16
    pwl_method: str = "adaptive"
    cell_frac: Optional[int] = None
    qat_observe_batches: int = 8

    def __post_init__(self):
        if not 2 <= self.pwl_pieces <= 64:
            raise ValueError(f"pwl_pieces must be in 2..64, got {self.pwl_pieces}")
        if self.pwl_method not in ("adaptive", "uniform"):
            raise ValueError(f"pwl_method must be 'adaptive' or 'uniform', got {self.pwl_method!r}")
        if self.cell_frac is not None and not 0 <= self.cell_frac <= 15:
            raise ValueError(f"cell_frac must be in 0..15, got {self.cell_frac}")
