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
    weight_bits: 8 (weights in [-127, 127], the default) or 7 (in [-63, 63]) for the matrices of
        linear and LSTM layers (embeddings stay 8-bit). The arithmetic is the same int8 spec either
        way; 7-bit weights let the x86 AVX2 kernels use vpmaddubsw on unsigned activations, exact
        because |u0 w0 + u1 w1| <= 2 * 255 * 64 fits int16 (about 1.3-1.9x faster GEMMs), at the
        accuracy cost of one weight bit (docs/integer_spec.md section 4, BENCHMARKS.md).
    qat_lstm: how QAT (train-mode) LSTM layers run their time loop: 'fused' (the default: one compiled
        C++ forward and backward per layer direction, built at first use, tvm_intlstm/nn/qat_fast.py)
        or 'loop' (the Python loop over time steps, the reference the fused path is tested against;
        also the fallback when the extension cannot be built). Same forward values bit for bit either
        way, gradients equal to float rounding.
    """

    pwl_pieces: int = 16
    pwl_method: str = "adaptive"
    cell_frac: Optional[int] = None
    qat_observe_batches: int = 8
    weight_bits: int = 8
    qat_lstm: str = "fused"

    def __post_init__(self):
        if not 2 <= self.pwl_pieces <= 64:
            raise ValueError(f"pwl_pieces must be in 2..64, got {self.pwl_pieces}")
        if self.pwl_method not in ("adaptive", "uniform"):
            raise ValueError(f"pwl_method must be 'adaptive' or 'uniform', got {self.pwl_method!r}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {self.weight_bits}")
        if self.qat_lstm not in ("fused", "loop"):
            raise ValueError(f"qat_lstm must be 'fused' or 'loop', got {self.qat_lstm!r}")
        if self.cell_frac is not None and not 0 <= self.cell_frac <= 15:
            raise ValueError(f"cell_frac must be in 0..15, got {self.cell_frac}")
