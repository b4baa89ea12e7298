"""Fitting of integer piecewise-linear activation tables (docs/integer_spec.md section 7).

Host-side (float allowed). The adaptive method is the iRNN paper's greedy knot placement, made
exact for a target piece count: for an error bound eps, pieces are grown left to right as long as
the best (minimax) line stays within eps; a bisection on eps finds the smallest bound that needs at
most `pieces` pieces. Every piece's line is the minimax line (secant slope, offset by half the
residual spread), then rounded to the integer table. Uniform knots are the baseline.
"""
from __future__ import annotations

import functools

import numpy as np

from ..reference.ops import PWL_FRAC, PWLTable, pwl, validate_table

FUNCTIONS = {
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "exp": np.exp,
}


def _domain(func: str, in_frac: int) -> tuple[int, int]:
    if func == "exp":  # softmax exponent: inputs are <= 0
        return -32768, 0
    return -32768, 32767


def _target(func: str, in_frac: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = _domain(func, in_frac)
    xi = np.arange(lo, hi + 1, dtype=np.int64)
    y = FUNCTIONS[func](xi / float(2**in_frac)) * 2.0**15
    return xi, np.minimum(y, 32767.0)


def _piece_fit(y: np.ndarray, a: int, b: int, lo: int, stride: int = 1):
    """Minimax-ish line over integer inputs [a, b]: (value at a, slope per LSB, max error in LSB).

    The line stays inside the function's output range at both ends (a sigmoid gate never goes
    negative), which costs a little error on the flat outer pieces."""
    ya, yb = y[a - lo], y[b - lo]
    m = (yb - ya) / max(b - a, 1)
    xs = np.arange(a, b + 1, stride)
    if xs[-1] != b:
        xs = np.append(xs, b)
    r = y[xs - lo] - (ya + m * (xs - a))
    off = 0.5 * (r.max() + r.min())
    ymin, ymax = (0.0, 32767.0) if y.min() >= 0 else (-32767.0, 32767.0)
    lo_end = min(ya, yb) + off
    hi_end = max(ya, yb) + off
    if lo_end < ymin:
        off += ymin - lo_end
    elif hi_end > ymax:
        off -= hi_end - ymax
    return ya + off, m, float(np.max(np.abs(r - off)))


def _greedy(y, lo, hi, eps, max_pieces, stride):
    knots = [lo]
    a = lo
    while a < hi:
        if len(knots) > max_pieces:
            return None
        # largest b with error <= eps (error grows with b); at least one step
        lo_b, hi_b = a + 1, hi
        if _piece_fit(y, a, hi_b, lo, stride)[2] <= eps:
            lo_b = hi_b
        else:
            while hi_b - lo_b > 1:
                mid = (lo_b + hi_b) // 2
                if _piece_fit(y, a, mid, lo, stride)[2] <= eps:
                    lo_b = mid
                else:
                    hi_b = mid
        knots.append(lo_b)
        a = lo_b
    return knots if len(knots) - 1 <= max_pieces else None


def _table_from_knots(func, in_frac, knots, y, lo, name) -> PWLTable:
    n = len(knots) - 1
    base = np.zeros(n, np.int64)
    slope = np.zeros(n, np.int64)
    for i in range(n):
        a, b = knots[i], knots[i + 1]
        v, m, _ = _piece_fit(y, a, b, lo)
        base[i] = int(round(v))
        slope[i] = int(round(m * 2**PWL_FRAC))
    t = PWLTable(np.asarray(knots, np.int16), base.astype(np.int32), slope.astype(np.int32),
                 int(in_frac), name)
    validate_table(t)
    return t


@functools.lru_cache(maxsize=256)
def fit_pwl(func: str, pieces: int = 16, in_frac: int = 12, method: str = "adaptive") -> PWLTable:
    """Integer PWL table approximating `func` ('sigmoid', 'tanh', 'exp') with at most `pieces` pieces.

    Inputs are int16 with scale 2^-in_frac, outputs int16 Q0.15. method: 'adaptive' | 'uniform'.
    """
    if func not in FUNCTIONS:
        raise ValueError(f"no PWL fit for {func!r}; known: {sorted(FUNCTIONS)}")
    if not 2 <= pieces <= 64:
        raise ValueError(f"pieces must be in 2..64, got {pieces}")
    if not 0 <= in_frac <= 15:
        raise ValueError(f"in_frac must be in 0..15, got {in_frac}")
    lo, hi = _domain(func, in_frac)
    _, y = _target(func, in_frac)
    name = f"{func}{pieces}_{method}_f{in_frac}"
    if method == "uniform":
        knots = sorted(set(int(round(k)) for k in np.linspace(lo, hi, pieces + 1)))
        return _table_from_knots(func, in_frac, knots, y, lo, name)
    if method != "adaptive":
        raise ValueError(f"method must be 'adaptive' or 'uniform', got {method!r}")
    stride = 4
    e_lo, e_hi = 0.0, float(_piece_fit(y, lo, hi, lo, stride)[2]) + 1.0
    best = _greedy(y, lo, hi, e_hi, pieces, stride)
    for _ in range(30):  # bisection on the error bound
        mid = 0.5 * (e_lo + e_hi)
        k = _greedy(y, lo, hi, mid, pieces, stride)
        if k is None:
            e_lo = mid
        else:
            e_hi, best = mid, k
        if e_hi - e_lo < 0.05:
            break
    return _table_from_knots(func, in_frac, best, y, lo, name)


def table_error(t: PWLTable, func: str) -> float:
    """Max abs error (real units) of the integer table against the float function on all int16 inputs."""
    lo, hi = _domain(func, t.in_frac)
    xi = np.arange(lo, hi + 1, dtype=np.int64)
    got = pwl(xi.astype(np.int16), t).astype(np.float64) / 2**15
    want = FUNCTIONS[func](xi / float(2**t.in_frac))
    return float(np.max(np.abs(got - want)))


def table_to_float(t: PWLTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knots (real input units), base values and slopes (real units) for the float/QAT simulation."""
    k = t.knots.astype(np.float64) / 2**t.in_frac
    v = t.base.astype(np.float64) / 2**15
    a = t.slope.astype(np.float64) / 2**PWL_FRAC * 2**t.in_frac / 2**15
    return k, v, a
