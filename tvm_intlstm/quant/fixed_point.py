"""Host-side derivation of fixed-point constants (docs/integer_spec.md sections 2, 9, 10).

Real scales are turned into integer (multiplier, shift) pairs here, once, at quantization time.
Nothing here runs inside a compiled model.
"""
from __future__ import annotations

import math

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


class ScaleError(ValueError):
    """A real scale cannot be represented as a fixed-point multiplier and shift."""


def quantize_multiplier(r: float) -> tuple[int, int]:
    """Q31 multiplier and right shift with r ~= M * 2**-s (spec section 2)."""
    r = float(r)
    if not math.isfinite(r) or r < 0:
        raise ScaleError(f"scale ratio must be finite and >= 0, got {r!r}")
    if r == 0.0:
        return 0, 31
    m, e = math.frexp(r)
    M = int(round(m * 2**31))
    if M == 2**31:
        M, e = 2**30, e + 1
    s = 31 - e
    if s > 62:
        return int(round(r * 2**62)), 62
    if s < 1:
        raise ScaleError(
            f"scale ratio {r:g} is too large for a fixed-point multiplier (must be < 2**30); "
            "check the calibration ranges of this layer")
    return M, s


def quantize_multiplier_array(r) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel version: int32 arrays of multipliers and shifts."""
    pairs = [quantize_multiplier(float(v)) for v in np.asarray(r, dtype=np.float64).ravel()]
    M = np.array([p[0] for p in pairs], dtype=np.int32).reshape(np.shape(r))
    s = np.array([p[1] for p in pairs], dtype=np.int32).reshape(np.shape(r))
    return M, s


def quantize_multiplier_pair(ra: float, rb: float) -> tuple[int, int, int]:
    """Two multipliers sharing one shift (residual add, spec section 9)."""
    big = max(float(ra), float(rb))
    _, s = quantize_multiplier(big)
    Ma = int(round(float(ra) * 2**s))
    Mb = int(round(float(rb) * 2**s))
    if max(Ma, Mb) > INT32_MAX:  # rounding up to 2**31: one bit less
        s -= 1
        Ma = int(round(float(ra) * 2**s))
        Mb = int(round(float(rb) * 2**s))
    return Ma, Mb, s


def quantize_multiplier15(r: float) -> tuple[int, int]:
    """15-bit multiplier (2**14 <= M < 2**15) and shift, for wide accumulators (layer norm)."""
    M31, s31 = quantize_multiplier(r)
    if M31 == 0:
        return 0, 31
    # drop 16 bits of the Q31 multiplier, rounding; renormalise on carry
    M = (M31 + (1 << 15)) >> 16
    s = s31 - 16
    if M == 2**15:
        M, s = 2**14, s - 1
    if s < 1:
        raise ScaleError(f"scale ratio {r:g} too large for a 15-bit multiplier")
    return int(M), int(s)


def power_of_two_frac(max_abs: float, bits: int = 16, lo: int = 0, hi: int = 15) -> int:
    """Largest number of fractional bits F so that max_abs fits a signed `bits` integer at 2**-F."""
    if max_abs <= 0 or not math.isfinite(max_abs):
        return hi
    int_bits = math.ceil(math.log2(max_abs * (1 + 1e-9)))  # bits needed left of the point
    F = (bits - 1) - max(int_bits, 0)
    return int(min(max(F, lo), hi))
