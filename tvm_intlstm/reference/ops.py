"""numpy reference of docs/integer_spec.md: the oracle every other implementation is tested against.

Rules: integer dtypes only (int64 intermediates, exact), no float past the input boundary
(`quantize_input` is the one place a float is read). Each function cites its spec section.
Speed is not a goal; clarity and exactness are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..spec import (GATE_FRAC, INT8, INT16, INT32, LN_FRAC, PROB_FRAC, PWL_FRAC,  # noqa: F401
                    LN16_MAX_EPS, SOFTMAX_IN_FRAC)


def _i64(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"reference ops take integer arrays, got dtype {a.dtype}")
    return a.astype(np.int64)


def sat(v, bits: int) -> np.ndarray:
    """sat_N (spec 0): clamp to the signed `bits` range."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(_i64(v), lo, hi)


def rshift_round(v, n) -> np.ndarray:
    """(v + 2^(n-1)) >> n, ties toward +inf (spec 0). `n` may be an array (per channel)."""
    v = _i64(v)
    n = _i64(n)
    if np.any(n < 0) or np.any(n > 62):
        raise ValueError("shift out of range [0, 62]")
    half = np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0)
    return np.right_shift(v + half, n)


def _cast(v, bits):
    return v.astype({8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}[bits])


def requantize(acc, M, s, bits: int) -> np.ndarray:
    """requantize_N (spec 2): sat_N(rshift_round(int64(acc) * M, s)). M, s broadcast (per channel)."""
    acc = _i64(acc)
    if np.any(acc < INT32[0]) or np.any(acc > INT32[1]):
        raise OverflowError("requantize input is not int32")
    return _cast(sat(rshift_round(acc * _i64(M), s), bits), bits)


def add_sat16(a, b) -> np.ndarray:
    """add_sat_16 (spec 3)."""
    return sat(_i64(a) + _i64(b), 16).astype(np.int16)


def quantize_input(x, scale) -> np.ndarray:
    """Boundary quantization (spec 1): sat_8(floor(float32(x / s) + 0.5f)), float32 throughout."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"float inputs must be float32, got {x.dtype}")
    if np.isnan(x).any():
        raise ValueError("input contains NaN")
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.floor(x / np.float32(scale) + np.float32(0.5))
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize(q, scale) -> np.ndarray:
    return np.asarray(q).astype(np.float32) * np.float32(scale)


def linear_acc(x, W, b=None) -> np.ndarray:
    """int32 accumulator of a linear layer (spec 5): sum_k W[o,k] x[...,k] + b[o]."""
    acc = _i64(x) @ _i64(W).T
    if b is not None:
        acc = acc + _i64(b)
    if np.any(acc < INT32[0]) or np.any(acc > INT32[1]):
        raise OverflowError("linear accumulator overflows int32 (spec 5 bound violated)")
    return acc.astype(np.int32)


def linear(x, W, b=None, M=None, s=None) -> np.ndarray:
    """Hidden linear (int8 out, per-row M/s) or final linear (M is None: int32 logits)."""
    acc = linear_acc(x, W, b)
    if M is None:
        return acc
    return requantize(acc, M, s, 8)


def embedding(ids, table) -> np.ndarray:
    """Embedding lookup (spec 6); out-of-range ids raise IndexError."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    V = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise IndexError(f"token id out of range [0, {V}): min {ids.min()}, max {ids.max()}")
    return np.asarray(table, dtype=np.int8)[ids]


@dataclass(frozen=True)
class PWLTable:
    """Integer PWL table (spec 7). knots: int16 [n+1]; base, slope: int32 [n]; in_frac: input scale 2^-in_frac."""

    knots: np.ndarray
    base: np.ndarray
    slope: np.ndarray
    in_frac: int
    name: str = ""

    @property
    def pieces(self) -> int:
        return int(len(self.base))


def validate_table(t: PWLTable) -> None:
    k, v, a = _i64(t.knots), _i64(t.base), _i64(t.slope)
    n = len(v)
    if not (2 <= n <= 64) and n != 1:
        raise ValueError(f"PWL table must have 1..64 pieces, got {n}")
    if len(k) != n + 1 or len(a) != n:
        raise ValueError("PWL table arrays have inconsistent lengths")
    if np.any(np.diff(k) <= 0) or k.min() < INT16[0] or k.max() > INT16[1]:
        raise ValueError("PWL knots must be strictly increasing int16 values")
    if np.any(np.abs(a) * np.diff(k) + 2**13 > INT32[1]) or np.any(np.abs(v) > 2**20):
        raise ValueError("PWL table violates the int32 bounds of spec section 7")
    if not 0 <= t.in_frac <= 15:
        raise ValueError("PWL in_frac must be in 0..15")


def pwl(x, t: PWLTable) -> np.ndarray:
    """PWL activation (spec 7): int16 in (scale 2^-in_frac), int16 Q0.15 out."""
    k, v, a = _i64(t.knots), _i64(t.base), _i64(t.slope)
    n = len(v)
    xc = np.clip(_i64(x), k[0], k[n])
    idx = np.zeros(xc.shape, dtype=np.int64)
    for j in range(1, n):
        idx += (xc >= k[j])
    prod = a[idx] * (xc - k[idx])
    assert np.all(np.abs(prod) + 2**13 <= INT32[1]), "PWL product exceeds int32"
    return sat(v[idx] + rshift_round(prod, PWL_FRAC), 16).astype(np.int16)


@dataclass(frozen=True)
class LSTMDirectionParams:
    """Integer parameters of one LSTM direction (spec 8)."""

    w_x: np.ndarray   # int8 [4H, I]
    w_h: np.ndarray   # int8 [4H, H]
    bias: np.ndarray  # int32 [4H]
    mx: np.ndarray    # int32 [4H]
    sx: np.ndarray    # int32 [4H]
    mh: np.ndarray    # int32 [4H]
    sh: np.ndarray    # int32 [4H]
    mo: int
    so: int
    cell_frac: int
    sig: PWLTable
    tanh: PWLTable
    tanh_c: PWLTable

    @property
    def hidden(self) -> int:
        return int(self.w_h.shape[1])


def lstm_gates_x(x, p: LSTMDirectionParams) -> np.ndarray:
    """gx for all steps at once: requantize_16(W_x x + b) -> int16 [..., 4H]."""
    return requantize(linear_acc(x, p.w_x, p.bias), p.mx, p.sx, 16)


def gates_and_cell(z, c, p):
    """The gates of z [B, 4H] (i, f, g, o by PWL) and the new cell (spec 8, shared by 8b): (o as
    int64, c_new int16)."""
    H = p.hidden
    i = _i64(pwl(z[:, 0:H], p.sig))
    f = _i64(pwl(z[:, H:2 * H], p.sig))
    g = _i64(pwl(z[:, 2 * H:3 * H], p.tanh))
    o = _i64(pwl(z[:, 3 * H:4 * H], p.sig))
    c_new = sat(rshift_round(f * _i64(c), 15) + rshift_round(i * g, 30 - p.cell_frac), 16).astype(np.int16)
    return o, c_new


def run_direction(x, p, gates_x, cell, reverse: bool = False, h0=None, c0=None):
    """The time loop of one (LN-)LSTM direction: gx = gates_x(x, p) for all steps, then
    (h, c) = cell(gx[t], h, c, p) step by step from (h0, c0) (zeros by default). x: int8 [T, B, I].

    Returns (y int8 [T, B, H], h_T int8 [B, H], c_T int16 [B, H])."""
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise TypeError(f"LSTM input must be int8, got {x.dtype}")
    T, B, _ = x.shape
    H = p.hidden
    h = np.zeros((B, H), np.int8) if h0 is None else np.asarray(h0, np.int8)
    c = np.zeros((B, H), np.int16) if c0 is None else np.asarray(c0, np.int16)
    gx = gates_x(x, p)
    y = np.zeros((T, B, H), np.int8)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h, c = cell(gx[t], h, c, p)
        y[t] = h
    return y, h, c


def lstm_cell(gx_t, h, c, p: LSTMDirectionParams):
    """One LSTM step (spec 8) given the precomputed input gates gx_t [B, 4H]. Returns (h int8, c int16)."""
    gh = requantize(linear_acc(h, p.w_h), p.mh, p.sh, 16)
    o, c_new = gates_and_cell(add_sat16(gx_t, gh), c, p)
    tc = _i64(pwl(c_new, p.tanh_c))
    h_new = requantize(o * tc, p.mo, p.so, 8)
    return h_new, c_new


def lstm_direction(x, p: LSTMDirectionParams, reverse: bool = False, h0=None, c0=None):
    """One LSTM direction over a sequence (spec 8). x: int8 [T, B, I] (time major).

    Returns (y int8 [T, B, H], h_T int8 [B, H], c_T int16 [B, H])."""
    return run_direction(x, p, lstm_gates_x, lstm_cell, reverse, h0, c0)


def residual_add(a, b, Ma: int, Mb: int, s: int) -> np.ndarray:
    """8-bit residual add (spec 9)."""
    return sat(rshift_round(_i64(a) * Ma + _i64(b) * Mb, s), 8).astype(np.int8)


def isqrt(v) -> np.ndarray:
    """Exact floor(sqrt(v)) for 0 <= v < 2^62, element-wise: the binary digit-by-digit method
    (31 fixed rounds; the same loop the TIR kernels use)."""
    v = _i64(v).copy()
    if np.any(v < 0) or np.any(v >= 2**62):
        raise ValueError("isqrt takes 0 <= v < 2^62")
    res = np.zeros_like(v)
    for k in range(30, -1, -1):
        bit = np.int64(1) << np.int64(2 * k)
        take = v >= res + bit
        v = np.where(take, v - (res + bit), v)
        res = np.where(take, (res >> 1) + bit, res >> 1)
    return res


def layer_norm(x, gamma, beta, Ml: int, sl: int) -> np.ndarray:
    """Integer layer norm over the last axis (spec 10). x int8, gamma int16, beta int64."""
    x = _i64(x)
    D = x.shape[-1]
    if D > 4096:
        raise ValueError("integer layer norm supports D <= 4096")
    S = x.sum(axis=-1, keepdims=True)
    d = D * x - S
    V = (d * d).sum(axis=-1, keepdims=True)
    r = np.maximum(1, isqrt(V // D))
    n = (2 * d * (1 << LN_FRAC) + r) // (2 * r)
    acc = n * _i64(gamma) + _i64(beta)
    return sat(rshift_round(acc * np.int64(Ml), sl), 8).astype(np.int8)


def softmax(z, Mz: int, sz: int, exp_table: PWLTable) -> np.ndarray:
    """Integer softmax over the last axis (spec 11): int32 scores -> int16 Q0.15 probabilities."""
    z = _i64(z)
    m = z.max(axis=-1, keepdims=True)
    d = np.maximum(z - m, INT32[0])
    d16 = requantize(d, Mz, sz, 16)
    e = _i64(pwl(d16, exp_table))
    E = e.sum(axis=-1, keepdims=True)
    assert np.all(E > 0)
    p = np.minimum((e * (1 << PROB_FRAC) + E // 2) // E, INT16[1])
    return p.astype(np.int16)


def attention_context(p, v, Mc: int, sc: int) -> np.ndarray:
    """Context = requantize_8(sum_k p_k v_k) (spec 11). p int16 [..., K], v int8 [..., K, D]."""
    acc = np.einsum("...k,...kd->...d", _i64(p), _i64(v))
    return requantize(acc, Mc, sc, 8)


def layer_norm16(x, gamma, beta, Ml: int, sl: int, eps: int = 0) -> np.ndarray:
    """Layer norm of int16 values over the last axis to int16 Q3.12 (spec 10b). gamma int16,
    beta int64 broadcast against x's last axis; eps the epsilon E in input units squared."""
    x = np.asarray(x)
    if x.dtype != np.int16:
        raise TypeError(f"layer_norm16 takes int16 values, got {x.dtype}")
    x = _i64(x)
    D = x.shape[-1]
    if not 1 <= D <= 4096:
        raise ValueError(f"integer layer norm supports 1 <= D <= 4096, got {D}")
    if not 0 <= int(eps) < LN16_MAX_EPS:
        raise ValueError(f"layer norm epsilon E must be in [0, 2^46), got {eps}")
    S = x.sum(axis=-1, keepdims=True)
    mu = (2 * S + D) // (2 * D)
    d = x - mu
    V = (d * d).sum(axis=-1, keepdims=True)
    r = np.maximum(1, isqrt(V // D + np.int64(eps)))
    n = (2 * d * (1 << LN_FRAC) + r) // (2 * r)
    acc = n * _i64(gamma) + _i64(beta)
    return sat(rshift_round(acc * np.int64(Ml), sl), 16).astype(np.int16)


@dataclass(frozen=True)
class LayerNorm16Params:
    """gamma int16 [D], beta int64 [D], the 15-bit (Ml, sl) and the epsilon E of one spec-10b
    layer norm."""

    gamma: np.ndarray
    beta: np.ndarray
    ml: int
    sl: int
    eps: int = 0

    def __call__(self, x) -> np.ndarray:
        return layer_norm16(x, self.gamma, self.beta, self.ml, self.sl, self.eps)


@dataclass(frozen=True)
class LNLSTMDirectionParams:
    """Integer parameters of one layer-norm LSTM direction (spec 8b). ln_x and ln_h have gamma /
    beta of length 4H (normalized per gate block of H), ln_c of length H; tanh_c reads the
    normalized cell (in_frac 12)."""

    w_x: np.ndarray   # int8 [4H, I]
    w_h: np.ndarray   # int8 [4H, H]
    mx: np.ndarray    # int32 [4H]: s_x s_wx[r] / s_ax
    sx: np.ndarray
    mh: np.ndarray    # int32 [4H]: s_h s_wh[r] / s_ah
    sh: np.ndarray
    ln_x: LayerNorm16Params
    ln_h: LayerNorm16Params
    ln_c: LayerNorm16Params
    mo: int
    so: int
    cell_frac: int
    sig: PWLTable
    tanh: PWLTable
    tanh_c: PWLTable

    @property
    def hidden(self) -> int:
        return int(self.w_h.shape[1])


def _ln_gates(a, ln: LayerNorm16Params, H: int) -> np.ndarray:
    """spec 10b over each gate block (H entries) of a [..., 4H] int16, gamma / beta [4H]."""
    blocks = a.reshape(a.shape[:-1] + (4, H))
    y = layer_norm16(blocks, _i64(ln.gamma).reshape(4, H), _i64(ln.beta).reshape(4, H), ln.ml, ln.sl,
                     ln.eps)
    return y.reshape(a.shape)


def ln_lstm_gates_x(x, p: LNLSTMDirectionParams) -> np.ndarray:
    """gx for all steps at once (spec 8b): LN_x(requantize_16(W_x x)) per gate block, int16 Q3.12."""
    ax = requantize(linear_acc(x, p.w_x), p.mx, p.sx, 16)
    return _ln_gates(ax, p.ln_x, p.hidden)


def ln_lstm_cell(gx_t, h, c, p: LNLSTMDirectionParams):
    """One layer-norm LSTM step (spec 8b) given gx_t [B, 4H]. Returns (h int8, c int16)."""
    H = p.hidden
    ah = requantize(linear_acc(h, p.w_h), p.mh, p.sh, 16)
    o, c_new = gates_and_cell(add_sat16(gx_t, _ln_gates(ah, p.ln_h, H)), c, p)
    tc = _i64(pwl(p.ln_c(c_new), p.tanh_c))
    h_new = requantize(o * tc, p.mo, p.so, 8)
    return h_new, c_new


def ln_lstm_direction(x, p: LNLSTMDirectionParams, reverse: bool = False, h0=None, c0=None):
    """One layer-norm LSTM direction over a sequence (spec 8b). x: int8 [T, B, I] (time major).

    Returns (y int8 [T, B, H], h_T int8 [B, H], c_T int16 [B, H])."""
    return run_direction(x, p, ln_lstm_gates_x, ln_lstm_cell, reverse, h0, c0)


# ---------------------------------------------------------------------------------------------
# op forms: the reference of each operator declared in tvm_intlstm/opdefs.py whose function above
# takes other arguments, called like the torch op (PWL tables packed int32 [3, n+1], the LSTM's
# parameters one by one); `tvm_intlstm.opdefs.reference_function(name)` finds them.


def unpack_table(packed, in_frac: int, name: str = "") -> PWLTable:
    """int32 [3, n+1] (knots; bases padded; slopes padded), the form kernels take -> PWLTable."""
    a = np.asarray(packed, dtype=np.int64)
    n = a.shape[1] - 1
    return PWLTable(a[0].astype(np.int16), a[1, :n].astype(np.int32), a[2, :n].astype(np.int32), int(in_frac), name)


def linear_requant(x, w, b, m, s, out_bits: int) -> np.ndarray:
    """Hidden linear layer (spec 5): requantize_N(W x + b), per-row m, s."""
    return requantize(linear_acc(x, w, b), m, s, out_bits)


def rescale_8(x, m: int, s: int) -> np.ndarray:
    """int8 -> int8 at another scale (spec 2)."""
    return requantize(x, m, s, 8)


def lstm_direction_op(x, w_x, w_h, bias, mx, sx, mh, sh, sig, tanh, tanh_c, mo: int, so: int,
                      cell_frac: int, reverse: bool, h0=None, c0=None):
    """`lstm_direction` with the torch op's arguments."""
    p = LSTMDirectionParams(w_x=np.asarray(w_x), w_h=np.asarray(w_h), bias=np.asarray(bias), mx=np.asarray(mx),
                            sx=np.asarray(sx), mh=np.asarray(mh), sh=np.asarray(sh), mo=int(mo), so=int(so),
                            cell_frac=int(cell_frac), sig=unpack_table(sig, GATE_FRAC),
                            tanh=unpack_table(tanh, GATE_FRAC), tanh_c=unpack_table(tanh_c, cell_frac))
    return lstm_direction(x, p, bool(reverse), h0, c0)


def softmax_op(z, mz: int, sz: int, exp_table) -> np.ndarray:
    """`softmax` with the exp table packed as the torch op takes it."""
    return softmax(z, mz, sz, unpack_table(exp_table, SOFTMAX_IN_FRAC))


def ln_lstm_direction_op(x, w_x, w_h, mx, sx, mh, sh, gamma_x, beta_x, gamma_h, beta_h, gamma_c, beta_c,
                         sig, tanh, tanh_c, mo: int, so: int, cell_frac: int, reverse: bool,
                         ml_x: int, sl_x: int, eps_x: int, ml_h: int, sl_h: int, eps_h: int,
                         ml_c: int, sl_c: int, eps_c: int, h0=None, c0=None):
    """`ln_lstm_direction` (spec 8b) with the torch op's arguments (all three tables in_frac 12)."""
    a = np.asarray
    p = LNLSTMDirectionParams(
        w_x=a(w_x), w_h=a(w_h), mx=a(mx), sx=a(sx), mh=a(mh), sh=a(sh),
        ln_x=LayerNorm16Params(a(gamma_x), a(beta_x), int(ml_x), int(sl_x), int(eps_x)),
        ln_h=LayerNorm16Params(a(gamma_h), a(beta_h), int(ml_h), int(sl_h), int(eps_h)),
        ln_c=LayerNorm16Params(a(gamma_c), a(beta_c), int(ml_c), int(sl_c), int(eps_c)),
        mo=int(mo), so=int(so), cell_frac=int(cell_frac), sig=unpack_table(sig, GATE_FRAC),
        tanh=unpack_table(tanh, GATE_FRAC), tanh_c=unpack_table(tanh_c, GATE_FRAC))
    return ln_lstm_direction(x, p, bool(reverse), h0, c0)


# ---------------------------------------------------------------------------------------------
# attention (issue 18 item 3): scores and the masked softmax of spec 11 (`softmax` and
# `attention_context` above are the rest)

ATTENTION_MAX_FEATURES = 2**16   # spec 11: D, A <= 2^16 keep every score sum inside int32


def _int_array(x, dtype, what):
    a = np.asarray(x)
    if a.dtype != dtype:
        raise TypeError(f"{what} must be {np.dtype(dtype).name}, got {a.dtype}")
    return a


def attention_dot(q, k) -> np.ndarray:
    """Luong dot scores (spec 11.1): q int8 [B, Q, D], k int8 [B, S, D] -> int32 [B, Q, S]."""
    q, k = _int_array(q, np.int8, "attention query"), _int_array(k, np.int8, "attention keys")
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention_dot takes q [B, Q, D] and k [B, S, D], got {q.shape} and {k.shape}")
    if q.shape[2] > ATTENTION_MAX_FEATURES:
        raise ValueError(f"attention feature size {q.shape[2]} exceeds 2^16 (spec 11 bound)")
    return np.einsum("bid,bsd->bis", _i64(q), _i64(k)).astype(np.int32)


def additive_scores(qx, kx, v, tanh_table) -> np.ndarray:
    """Bahdanau scores (spec 11.1): z[b, i, s] = sum_a v[a] sat_8(rshift_round(pwl(tanh,
    add_sat_16(qx[b, i, a], kx[b, s, a])), 8)). qx int16 [B, Q, A], kx int16 [B, S, A] (Q3.12),
    v int8 [A], tanh table packed (in_frac 12) -> int32 [B, Q, S]."""
    qx, kx = _int_array(qx, np.int16, "query projection"), _int_array(kx, np.int16, "key projection")
    v = _int_array(v, np.int8, "score vector v")
    if qx.ndim != 3 or kx.ndim != 3 or qx.shape[0] != kx.shape[0] or not (
            qx.shape[2] == kx.shape[2] == v.shape[-1]) or v.ndim != 1:
        raise ValueError(f"additive_scores takes qx [B, Q, A], kx [B, S, A], v [A], got {qx.shape}, "
                         f"{kx.shape}, {v.shape}")
    if v.shape[0] > ATTENTION_MAX_FEATURES:
        raise ValueError(f"attention size {v.shape[0]} exceeds 2^16 (spec 11 bound)")
    t = pwl(add_sat16(qx[:, :, None, :], kx[:, None, :, :]), unpack_table(tanh_table, GATE_FRAC))
    t8 = sat(rshift_round(t, 8), 8)
    return (t8 * _i64(v)).sum(axis=-1).astype(np.int32)


def masked_softmax(z, lengths, Mz: int, sz: int, exp_table: PWLTable) -> np.ndarray:
    """Softmax over the last axis of z int32 [B, ..., S] restricted to the first
    clamp(lengths[b], 0, S) positions of batch row b (spec 11.2); 0 elsewhere and in empty rows."""
    z = _int_array(z, np.int32, "scores")
    lengths = np.asarray(lengths)
    if lengths.dtype not in (np.int32, np.int64):
        raise TypeError(f"attention lengths must be int32/int64, got {lengths.dtype}")
    if z.ndim < 2 or lengths.shape != (z.shape[0],):
        raise ValueError(f"masked_softmax takes z [B, ..., S] and lengths [B], got {z.shape} and {lengths.shape}")
    S = z.shape[-1]
    n = np.clip(_i64(lengths), 0, S).reshape((-1,) + (1,) * (z.ndim - 1))
    valid = np.arange(S) < n
    zi = _i64(z)
    m = np.where(valid, zi, INT32[0]).max(axis=-1, keepdims=True)
    d = np.where(valid, np.maximum(zi - m, INT32[0]), 0)
    e = np.where(valid, _i64(pwl(requantize(d, Mz, sz, 16), exp_table)), 0)
    E = e.sum(axis=-1, keepdims=True)
    Ed = np.maximum(E, 1)     # E > 0 in every row with a valid position; empty rows give p = 0
    p = np.where(valid, np.minimum((e * (1 << PROB_FRAC) + Ed // 2) // Ed, INT16[1]), 0)
    return p.astype(np.int16)


def masked_softmax_op(z, lengths, mz: int, sz: int, exp_table) -> np.ndarray:
    """`masked_softmax` with the exp table packed as the torch op takes it."""
    return masked_softmax(z, lengths, mz, sz, unpack_table(exp_table, SOFTMAX_IN_FRAC))


def mha_scores(q, k, num_heads: int) -> np.ndarray:
    """Multi-head dot scores (spec 11.4): z[b, h, i, s] = sum_{d < dh} q[b, i, h dh + d] k[b, s, h dh + d]
    for q int8 [B, Q, E], k int8 [B, S, E], E = num_heads * dh -> int32 [B, num_heads, Q, S]."""
    q, k = _int_array(q, np.int8, "attention query"), _int_array(k, np.int8, "attention keys")
    H = int(num_heads)
    if q.ndim != 3 or k.ndim != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"mha_scores takes q [B, Q, E] and k [B, S, E], got {q.shape} and {k.shape}")
    if H < 1 or q.shape[2] % H:
        raise ValueError(f"mha_scores: E = {q.shape[2]} is not a multiple of num_heads = {H}")
    dh = q.shape[2] // H
    if dh > ATTENTION_MAX_FEATURES:
        raise ValueError(f"attention head size {dh} exceeds 2^16 (spec 11 bound)")
    qh = _i64(q).reshape(q.shape[0], q.shape[1], H, dh)
    kh = _i64(k).reshape(k.shape[0], k.shape[1], H, dh)
    return np.einsum("bihd,bshd->bhis", qh, kh).astype(np.int32)
