"""Integer layer norm (spec 10, and 10b for int16 values), softmax and attention context (spec 11).

Row reductions are written as serial loops over one-element stack accumulators, which LLVM
promotes to registers and vectorizes (sums, max); element-wise parts use `T.vectorized` where
the extent is static. The integer square root is `_tir.isqrt_into`, the fixed 31-round binary
digit-by-digit loop of the reference (`reference.ops.isqrt`).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ._common import check_multiplier, check_pieces, check_shift, finish, vec_split
from ..spec import LN16_MAX_EPS, LN_FRAC, PROB_FRAC
from ._tir import isqrt_into, pwl_index_into, pwl_piece, requantize, rshift_round, sat_cast


def _check_ln(features: int, Ml: int, sl: int, spec: str) -> tuple[int, int, int]:
    """D, Ml, sl of a layer norm (spec 10 / 10b), checked."""
    D = int(features)
    if not 1 <= D <= 4096:
        raise ValueError(f"integer layer norm supports 1 <= D <= 4096, got {D}")
    Ml = check_multiplier(Ml)
    if Ml >= 2**15:
        raise ValueError(f"layer norm multiplier must be below 2^15 (spec {spec}), got {Ml}")
    return D, Ml, check_shift(sl, 1, 62)


def layer_norm(features: int, Ml: int, sl: int):
    """x int8 [N, D], gamma int16 [D], beta int64 [D] -> int8 [N, D] (spec 10, int64 arithmetic).

    (Ml, sl) is the 15-bit multiplier of spec 10 (2^14 <= Ml < 2^15, 1 <= sl <= 62), baked in."""
    D, Ml, sl = _check_ln(features, Ml, sl, "10")

    @T.prim_func
    def layer_norm(x_h: T.handle, g_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X = T.match_buffer(x_h, (N, D), "int8")
        GAM = T.match_buffer(g_h, (D,), "int16")
        BET = T.match_buffer(b_h, (D,), "int64")
        Y = T.match_buffer(y_h, (N, D), "int8")
        S = T.alloc_buffer((1,), "int64")
        V = T.alloc_buffer((1,), "int64")
        ISQ = T.alloc_buffer((2,), "int64")   # [remaining value, result]
        for n in range(N):
            S[0] = T.int64(0)
            for k in range(D):
                S[0] = S[0] + T.Cast("int64", X[n, k])
            V[0] = T.int64(0)
            for k in range(D):
                V[0] = V[0] + (T.int64(D) * T.Cast("int64", X[n, k]) - S[0]) * (
                    T.int64(D) * T.Cast("int64", X[n, k]) - S[0])
            isqrt_into(ISQ, T.floordiv(V[0], T.int64(D)))
            ISQ[1] = T.max(ISQ[1], T.int64(1))
            for k in range(D):
                Y[n, k] = sat_cast(rshift_round(
                    (T.floordiv(
                        T.int64(2 << LN_FRAC) * (T.int64(D) * T.Cast("int64", X[n, k]) - S[0])
                        + ISQ[1], T.int64(2) * ISQ[1]) * T.Cast("int64", GAM[k]) + BET[k])
                    * T.int64(Ml), sl), 8)

    return finish(layer_norm, "layer_norm")


# The per-element division of spec 10b, floor((2^(F+1) d + isq) / (2 isq)) with d = x - mean
# (|d| <= 65535) and isq >= 1, as a multiply and a shift: exact by Granlund and Montgomery's
# theorem (1994, 4.2): for 0 <= n' < 2^31 and a divisor V with 2^(l-1) < V <= 2^l,
# floor(n' / V) = (n' m) >> (31 + l) with m = ceil(2^(31+l) / V) <= 2^32 (n' m < 2^63: int64).
# n' = n + 2^29 is the numerator shifted to non-negative (2^(F+1) |d| < 2^29) and below 2^31
# since isq < 2^30 (asserted below from check_ln16's bounds), and
# floor(n / V) = floor(n' / V) - floor(2^29 / V) - [n' mod V < 2^29 mod V]. Row constants (one
# division per row instead of one per element) in ACC[3:8]: V, the shift 31 + l, m,
# floor(2^29 / V) and 2^29 mod V.
LN_DIV_SHIFT = 29           # n' = n + 2^29 >= 0
assert 65535 * (2 << LN_FRAC) < 2**LN_DIV_SHIFT, "spec 10b bounds of the exact division"
# isq = isqrt(V // D + E) with V // D <= 65535^2 < 2^32: isq < 2^30, so n' < 2^29 + 2^29 + 2^30
assert (2**32 + LN16_MAX_EPS) < 2**60, "spec 10b: isq < 2^30 for the exact division"


def ln_quotient(num, ACC):
    """floor((num - 2^29) / V) for the shifted numerator num = n' in [0, 2^31) and the row
    constants in ACC (ln16_row)."""
    q1 = (num * ACC[5]) >> ACC[4]
    return q1 - ACC[6] - tirx.Cast("int64", num - q1 * ACC[3] < ACC[7])


def ln16_elem(X, Y, GAM, BET, n, g, k, Ml, sl, ACC, ISQ):
    """Element k of a spec-10b row, once ln16_row's row constants are in ACC / ISQ."""
    return tirx.BufferStore(Y, sat_cast(rshift_round(
        (ln_quotient(tirx.const(2 << LN_FRAC, "int64") * (tirx.Cast("int64", X[n, g, k]) - ACC[1])
                     + ISQ[1] + tirx.const(1 << LN_DIV_SHIFT, "int64"), ACC)
         * tirx.Cast("int64", GAM[g, k]) + BET[g, k]) * tirx.const(Ml, "int64"), sl), 16), [n, g, k])


@T.macro
def ln16_row(X, Y, GAM, BET, n, g, D, Ml, sl, eps, ACC, ISQ):
    """spec 10b over X[n, g, 0:D] (int16) into Y[n, g, 0:D] (int16 Q3.12), gamma GAM[g, :] int16,
    beta BET[g, :] int64; D, Ml, sl, eps Python ints (baked). ACC int64 [8] and ISQ int64 [2] are
    scratch ([sum, mean, squared deviations, the division's row constants]; `_tir.isqrt_into`)."""
    ACC[0] = T.int64(0)
    for k in range(D):
        ACC[0] = ACC[0] + T.Cast("int64", X[n, g, k])
    ACC[1] = T.floordiv(T.int64(2) * ACC[0] + T.int64(D), T.int64(2 * D))
    ACC[2] = T.int64(0)
    for k in range(D):
        ACC[2] = ACC[2] + (T.Cast("int64", X[n, g, k]) - ACC[1]) * (T.Cast("int64", X[n, g, k]) - ACC[1])
    isqrt_into(ISQ, T.floordiv(ACC[2], T.int64(D)) + T.int64(eps))
    ISQ[1] = T.max(ISQ[1], T.int64(1))
    # the division's row constants (see above): V = 2 isq, l = ceil(log2 V), m, q2, r2
    ACC[3] = T.int64(2) * ISQ[1]
    ACC[4] = T.int64(31)
    for b in range(1, 32):
        if (T.int64(1) << T.int64(b - 1)) < ACC[3]:
            ACC[4] = T.int64(31 + b)
    ACC[5] = T.floordiv((T.int64(1) << ACC[4]) + ACC[3] - T.int64(1), ACC[3])
    ACC[6] = T.floordiv(T.int64(1 << LN_DIV_SHIFT), ACC[3])
    ACC[7] = T.int64(1 << LN_DIV_SHIFT) - ACC[6] * ACC[3]
    # vectors of 8 and a scalar tail written out here: left to LLVM, the loop over D was
    # vectorized with a masked tail that wrote past the row's end on skylake-avx512 /
    # icelake-server builds (tests/test_guarded_buffers.py, layer_norm16_4x13)
    for k0 in range(D // 8):
        for kv in T.vectorized(8):
            ln16_elem(X, Y, GAM, BET, n, g, k0 * 8 + kv, Ml, sl, ACC, ISQ)
    for k in T.unroll(D % 8):
        ln16_elem(X, Y, GAM, BET, n, g, D // 8 * 8 + k, Ml, sl, ACC, ISQ)


def check_ln16(features: int, Ml: int, sl: int, eps: int) -> tuple[int, int, int, int]:
    """The baked constants of a spec-10b layer norm, checked (clear errors instead of wrong code)."""
    D, Ml, sl = _check_ln(features, Ml, sl, "10b")
    eps = int(eps)
    if not 0 <= eps < LN16_MAX_EPS:
        raise ValueError(f"layer norm epsilon E must be in [0, 2^46), got {eps}")
    return D, Ml, sl, eps


def layer_norm16(groups: int, features: int, Ml: int, sl: int, eps: int = 0):
    """x int16 [N, G, D], gamma int16 [G, D], beta int64 [G, D] -> int16 [N, G, D] Q3.12 (spec 10b):
    each of the G groups of D values normalized on its own with its own gamma / beta (G = 4 for
    the LN-LSTM's gate blocks, 1 for a plain layer norm). Ml, sl and the epsilon E are baked."""
    G = int(groups)
    if G < 1:
        raise ValueError(f"groups must be >= 1, got {G}")
    D, Ml, sl, eps = check_ln16(features, Ml, sl, eps)

    @T.prim_func
    def layer_norm16(x_h: T.handle, g_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X = T.match_buffer(x_h, (N, G, D), "int16")
        GAM = T.match_buffer(g_h, (G, D), "int16")
        BET = T.match_buffer(b_h, (G, D), "int64")
        Y = T.match_buffer(y_h, (N, G, D), "int16")
        ACC = T.alloc_buffer((8,), "int64")
        ISQ = T.alloc_buffer((2,), "int64")
        for n, g in T.grid(N, G):
            ln16_row(X, Y, GAM, BET, n, g, D, Ml, sl, eps, ACC, ISQ)

    return finish(layer_norm16, "layer_norm16")


@T.macro
def softmax_exp_into(z, zmax, TBL, n, Mz, sz, XC, EX, k, E):
    """One exponential of a softmax row (spec 11): d = requantize_16(max(z - zmax, -2^31), Mz, sz),
    then e = pwl(exp, d) into EX[k] (int32, holding an int16 value), added to the row sum E[0]
    (int64). XC: int32 [2] scratch (clamped input, piece index)."""
    pwl_index_into(TBL, n, T.Cast("int32", requantize(T.Cast("int32", T.max(
        T.Cast("int64", z) - T.Cast("int64", zmax), T.int64(-(2**31)))), Mz, sz, 16)),
        XC, 0, XC, 1)
    EX[k] = pwl_piece(TBL, XC[1], XC[0])
    E[0] = E[0] + T.Cast("int64", EX[k])


def prob16(ex, e):
    """A softmax probability (spec 11): min(floor((ex 2^PROB_FRAC + e / 2) / e), 32767) as int16,
    from the exponential ex (int32) and the row sum e (int64, > 0)."""
    return T.Cast("int16", T.min(T.floordiv(
        T.Cast("int64", ex) * T.int64(1 << PROB_FRAC) + T.floordiv(e, T.int64(2)), e),
        T.int64(32767)))


def softmax(exp_pieces: int, Mz: int, sz: int, length: int | None = None):
    """z int32 [R, K] -> p int16 [R, K] (spec 11): probabilities over the last axis.

    The exp table is int32 [3, exp_pieces + 1] (`lstm.pack_pwl` format, in_frac 10), a buffer;
    (Mz, sz) are baked. `length` fixes K statically; None (default) makes it symbolic, so one
    build serves every source length. Parameters: (z, exp_table, p)."""
    n = check_pieces(exp_pieces)
    Mz = check_multiplier(Mz)
    sz = check_shift(sz, 1, 62)
    static_k = length is not None
    # K: the static length, or a symbolic one (the buffers bind it; rows of length 0 are skipped)
    K = int(length) if static_k else tirx.Var("K", "int64")
    if static_k and K <= 0:
        raise ValueError("softmax length must be positive")

    # The exponentials go to an int32 row EX, not straight into the int16 output: a workaround for
    # an LLVM 22 x86 miscompile. With a static length LLVM's loop vectorizer folds the tail of
    # the exp loop into a masked vector store (e.g. L = 5 at 4 lanes: lanes <1, 0, 0, 0> in the
    # second iteration); on AVX-512 (BW/VL) the int32 -> int16 narrowing is folded into that store
    # (a truncating masked store, vpmovdw {k}), and when only one lane is enabled the X86 backend
    # turns it into a plain scalar store of the *untruncated* int32 lane (`vmovd`): 4 bytes for
    # a 2-byte element, one int16 written past the row (past the buffer on the last row).
    # Seen on skylake-avx512 / icelake-server (L = 5, 9, 13) and znver4 (L = 9); the issue's
    # L = 7 and 33 on sapphirerapids are the same pattern at other vector widths.
    # (llvm/llvm-project#179489, fixed upstream by #179853.) An int32 store has nothing to
    # truncate, and the int16 stores happen in the normalization loop, which has an int64
    # division per element and stays scalar. tests/test_guarded_buffers.py checks every length.

    @T.prim_func
    def softmax(z_h: T.handle, t_h: T.handle, p_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        Z = T.match_buffer(z_h, (R, K), "int32")
        TBL = T.match_buffer(t_h, (3, n + 1), "int32")
        P = T.match_buffer(p_h, (R, K), "int16")
        MX = T.alloc_buffer((1,), "int32")
        E = T.alloc_buffer((1,), "int64")
        XC = T.alloc_buffer((2,), "int32")
        EX = T.alloc_buffer((K,), "int32")
        if K > 0:
            for r in range(R):
                MX[0] = Z[r, 0]
                for k in range(K):
                    MX[0] = T.max(MX[0], Z[r, k])
                E[0] = T.int64(0)
                for k in range(K):
                    softmax_exp_into(Z[r, k], MX[0], TBL, n, Mz, sz, XC, EX, k, E)
                # E > 0 for every valid table (spec 11); the guard only keeps a bad table from
                # dividing by zero
                E[0] = T.max(E[0], T.int64(1))
                for k in range(K):
                    P[r, k] = prob16(EX[k], E[0])

    return finish(softmax, "softmax")


def attention_context(features: int, Mc: int, sc: int):
    """p int16 [B, Q, K], v int8 [B, K, D] -> ctx int8 [B, Q, D] (spec 11):
    ctx[b, q, d] = requantize_8(sum_k p[b, q, k] * v[b, k, d], Mc, sc), int32 accumulation.

    B, Q, K symbolic, D static; (Mc, sc) baked. Parameters: (p, v, ctx)."""
    D = int(features)
    if D <= 0:
        raise ValueError("attention feature size must be positive")
    Mc = check_multiplier(Mc)
    sc = check_shift(sc, 1, 62)
    DO, DV = vec_split(D, 8)

    @T.prim_func
    def attention_context(p_h: T.handle, v_h: T.handle, c_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        Q = T.int64()
        K = T.int64()
        P = T.match_buffer(p_h, (B, Q, K), "int16")
        V = T.match_buffer(v_h, (B, K, D), "int8")
        C = T.match_buffer(c_h, (B, Q, D), "int8")
        ACC = T.alloc_buffer((D,), "int32")
        for b, q in T.grid(B, Q):
            for do in range(DO):
                for dv in T.vectorized(DV):
                    ACC[do * DV + dv] = 0
            for k in range(K):
                for do in range(DO):
                    for dv in T.vectorized(DV):
                        ACC[do * DV + dv] = ACC[do * DV + dv] + T.Cast("int32", P[b, q, k]) * T.Cast(
                            "int32", V[b, k, do * DV + dv])
            for do in range(DO):
                for dv in T.vectorized(DV):
                    C[b, q, do * DV + dv] = requantize(ACC[do * DV + dv], Mc, sc, 8)

    return finish(attention_context, "attention_context")
