"""Attention kernels (docs/integer_spec.md section 11): Luong dot scores, Bahdanau additive scores,
multi-head dot scores and the softmax masked by per-row source lengths. (The unmasked softmax and the context are
kernels/norm.py's `softmax` and `attention_context`.)

    generator (static args)                      buffers (B, Q, S, R symbolic)
    attention_dot(D)                             q i8[B,Q,D], k i8[B,S,D] -> z i32[B,Q,S]
    additive_scores(A, tanh_pieces)              qx i16[B,Q,A], kx i16[B,S,A], v i8[A],
                                                 tanh i32[3,n+1] -> z i32[B,Q,S]
    mha_scores(E, num_heads)                     q i8[B,Q,E], k i8[B,S,E] -> z i32[B,H,Q,S]
    masked_softmax(exp_pieces, Mz, sz, len_dtype)
                                                 z i32[B,R,S], lengths [B], exp i32[3,n+1]
                                                 -> p i16[B,R,S]

Single-threaded plain loop nests (the reductions are serial loops over one-element accumulators,
which LLVM keeps in registers and vectorizes): attention is a small part of a decoder step next to
its LSTM and output GEMMs.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ._common import check_multiplier, check_pieces, check_shift, finish, without_params
from ._tir import pwl_index_into, pwl_piece, rshift_round, sat
from .norm import prob16, softmax_exp_into

MAX_FEATURES = 2**16   # spec 11: keeps every score sum inside int32


def _features(n, what):
    n = int(n)
    if not 1 <= n <= MAX_FEATURES:
        raise ValueError(f"attention {what} must be in 1..2^16 (spec 11), got {n}")
    return n


def _scores(name: str, F: int, src_dtype: str, n: int, term):
    """The score kernels: z[b, i, s] = sum over a < F of the int32 term of (q[b, i, a], k[b, s, a]),
    computed by the macro term(QX, KX, VV, TBL, XC, ACC, b, i, s, a) into ACC[0]. Parameters
    (q, k, v, tanh_table, z); with n = 0 (no PWL table) (q, k, z)."""

    @T.prim_func
    def scores(q_h: T.handle, k_h: T.handle, v_h: T.handle, t_h: T.handle, z_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        Q = T.int64()
        S = T.int64()
        QX = T.match_buffer(q_h, (B, Q, F), src_dtype)
        KX = T.match_buffer(k_h, (B, S, F), src_dtype)
        VV = T.match_buffer(v_h, (F,), "int8")
        TBL = T.match_buffer(t_h, (3, n + 1), "int32")
        Z = T.match_buffer(z_h, (B, Q, S), "int32")
        ACC = T.alloc_buffer((1,), "int32")
        if n > 0:
            XC = T.alloc_buffer((2,), "int32")   # [clamped input, piece index]
        for b, i, s in T.grid(B, Q, S):
            ACC[0] = 0
            for a in range(F):
                term(QX, KX, VV, TBL, XC if n > 0 else None, ACC, b, i, s, a)
            Z[b, i, s] = ACC[0]

    return finish(scores if n > 0 else without_params(scores, "VV", "TBL"), name)


def attention_dot(features: int):
    """z[b, i, s] = sum_d q[b, i, d] k[b, s, d] in int32 (spec 11.1). Parameters: (q, k, z)."""
    D = _features(features, "feature size")

    @T.macro
    def product(QB, KB, VV, TBL, XC, ACC, b, i, s, d):
        ACC[0] = ACC[0] + T.Cast("int32", QB[b, i, d]) * T.Cast("int32", KB[b, s, d])

    return _scores("attention_dot", D, "int8", 0, product)


def additive_scores(attn_size: int, tanh_pieces: int):
    """z[b, i, s] = sum_a v[a] sat_8(rshift_round(pwl(tanh, add_sat_16(qx[b, i, a], kx[b, s, a])), 8))
    (spec 11.1), int32 accumulation. Parameters: (qx, kx, v, tanh_table, z)."""
    A = _features(attn_size, "attention size")
    n = check_pieces(tanh_pieces)

    @T.macro
    def additive(QX, KX, VV, TBL, XC, ACC, b, i, s, a):
        # u = add_sat_16(qx, kx), clamped to the table's knots; then its piece index
        pwl_index_into(TBL, n, sat(T.Cast("int32", QX[b, i, a]) + T.Cast("int32", KX[b, s, a]), 16),
                       XC, 0, XC, 1)
        ACC[0] = ACC[0] + T.Cast("int32", VV[a]) * sat(rshift_round(pwl_piece(TBL, XC[1], XC[0]), 8), 8)

    return _scores("additive_scores", A, "int16", n, additive)


def masked_softmax(exp_pieces: int, Mz: int, sz: int, len_dtype: str = "int64"):
    """p[b, r, :] = the softmax of z[b, r, :] over its first clamp(lengths[b], 0, S) positions, 0
    elsewhere and in rows of length 0 (spec 11.2). (Mz, sz) baked; the exp table (in_frac 10) is a
    buffer. Parameters: (z, lengths, exp_table, p)."""
    n = check_pieces(exp_pieces)
    Mz = check_multiplier(Mz)
    sz = check_shift(sz, 1, 62)
    if len_dtype not in ("int32", "int64"):
        raise ValueError(f"attention lengths are int32 or int64, got {len_dtype}")

    # The exponentials go to an int32 row EX and the int16 stores happen in the normalization
    # loop (an int64 division per element, scalar), as in norm.softmax: see the LLVM 22 masked
    # store miscompile described there.
    @T.prim_func
    def masked_softmax(z_h: T.handle, l_h: T.handle, t_h: T.handle, p_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        R = T.int64()
        S = T.int64()
        Z = T.match_buffer(z_h, (B, R, S), "int32")
        LEN = T.match_buffer(l_h, (B,), len_dtype)
        TBL = T.match_buffer(t_h, (3, n + 1), "int32")
        P = T.match_buffer(p_h, (B, R, S), "int16")
        NV = T.alloc_buffer((1,), "int64")    # valid positions of the batch row
        MX = T.alloc_buffer((1,), "int32")
        E = T.alloc_buffer((1,), "int64")
        XC = T.alloc_buffer((2,), "int32")
        EX = T.alloc_buffer((S,), "int32")
        for b in range(B):
            NV[0] = T.max(T.min(T.Cast("int64", LEN[b]), S), T.int64(0))
            for r in range(R):
                if NV[0] > T.int64(0):
                    MX[0] = Z[b, r, 0]
                    for k in range(S):
                        if k < NV[0]:
                            MX[0] = T.max(MX[0], Z[b, r, k])
                    E[0] = T.int64(0)
                    for k in range(S):
                        if k < NV[0]:
                            softmax_exp_into(Z[b, r, k], MX[0], TBL, n, Mz, sz, XC, EX, k, E)
                    # E > 0 for every valid table (spec 11.2); the guard keeps a bad table from
                    # dividing by zero
                    E[0] = T.max(E[0], T.int64(1))
                    for k in range(S):
                        if k < NV[0]:
                            P[b, r, k] = prob16(EX[k], E[0])
                        else:
                            P[b, r, k] = T.int16(0)
                else:
                    for k in range(S):
                        P[b, r, k] = T.int16(0)

    return finish(masked_softmax, "masked_softmax")


def mha_scores(embed_dim: int, num_heads: int):
    """z[b, h, i, s] = sum_{d < dh} q[b, i, h dh + d] k[b, s, h dh + d] in int32 (spec 11.4), dh =
    embed_dim / num_heads: the per-head dot scores of multi-head attention, read from the
    projections' [B, L, E] layout (no head transpose). Parameters: (q, k, z)."""
    E = _features(embed_dim, "embedding size")
    H = int(num_heads)
    if H < 1 or E % H:
        raise ValueError(f"mha_scores: embed_dim {E} must be a multiple of num_heads {H}")
    dh = E // H

    @T.prim_func
    def mha_scores(q_h: T.handle, k_h: T.handle, z_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        Q = T.int64()
        S = T.int64()
        QB = T.match_buffer(q_h, (B, Q, E), "int8")
        KB = T.match_buffer(k_h, (B, S, E), "int8")
        Z = T.match_buffer(z_h, (B, H, Q, S), "int32")
        ACC = T.alloc_buffer((1,), "int32")
        for b, h, i, s in T.grid(B, H, Q, S):
            ACC[0] = 0
            for d in range(dh):
                ACC[0] = ACC[0] + T.Cast("int32", QB[b, i, h * dh + d]) * T.Cast("int32", KB[b, s, h * dh + d])
            Z[b, h, i, s] = ACC[0]

    return finish(mha_scores, "mha_scores")
