"""Element-wise boundary and 8-bit kernels: quantize_input (spec 1), embedding (spec 6),
rescale_8 (spec 2) and residual_add (spec 9).

All take a symbolic number of rows N (T.int64 var) and a static feature size; scalar constants
(scales, multipliers, shifts) are baked into the PrimFunc, arrays are buffers.
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from ._tir import pwl_piece, requantize, rshift_round, sat_cast
from ._common import check_multiplier, check_pieces, check_shift, finish, vec_split, without_params


def _map_rows(name: str, features: int, in_dtype: str, value, binary: bool = False):
    """y int8 [N, D] = value(a, b) element by element of a (and b) [N, D], N symbolic, the feature
    axis vectorized. Parameters (a, b, y), or (a, y) when not binary (value's b is then unused)."""
    D = int(features)
    DO, DV = vec_split(D, 16)

    @T.prim_func
    def rows(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        A = T.match_buffer(a_h, (N, D), in_dtype)
        B = T.match_buffer(b_h, (N, D), in_dtype)
        Y = T.match_buffer(y_h, (N, D), "int8")
        for n, do in T.grid(N, DO):
            for dv in T.vectorized(DV):
                Y[n, do * DV + dv] = value(A[n, do * DV + dv], B[n, do * DV + dv])

    return finish(rows if binary else without_params(rows, "B"), name)


def quantize_input(features: int, scale: float):
    """float32 [N, K] -> int8 [N, K]: sat_8(floor(float32(x / s) + 0.5f)) (spec 1).

    `scale` is rounded to float32 and baked in. The division is a true IEEE division (TVM's
    LLVM codegen sets no fast-math flags by default; `build_kernel` refuses fast-math targets),
    so the result is the correctly rounded float32 quotient, as numpy computes it. NaN inputs
    (rejected by the runtime wrapper, spec 1) give 0."""
    s32 = float(np.float32(scale))
    if not (np.isfinite(s32) and s32 > 0):
        raise ValueError(f"quantize scale must be a positive finite float32, got {scale!r}")

    def quantize(x, _):
        # NaN (rejected by the runtime wrapper) -> 0 rather than an undefined conversion
        return T.if_then_else(tirx.NE(x, x), T.int8(0), T.Cast("int8", T.max(T.min(
            T.floor(x / T.float32(s32) + T.float32(0.5)), T.float32(127.0)), T.float32(-128.0))))

    return _map_rows("quantize_input", features, "float32", quantize)


def embedding(vocab: int, dim: int, id_dtype: str = "int64"):
    """ids [N] (int64 or int32) + table int8 [V, D] -> int8 [N, D] (spec 6).

    Ids are validated by the runtime wrapper (out-of-range ids are an error, never clamped by the
    spec); the kernel still clamps the row index to [0, V-1] so that a bad id can never read
    outside the table (memory-safety guard only)."""
    V, D = int(vocab), int(dim)
    if id_dtype not in ("int32", "int64"):
        raise ValueError(f"id_dtype must be int32 or int64, got {id_dtype}")
    DO, DV = vec_split(D, 32)

    @T.prim_func
    def embedding(ids_h: T.handle, table_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        IDS = T.match_buffer(ids_h, (N,), id_dtype)
        E = T.match_buffer(table_h, (V, D), "int8")
        Y = T.match_buffer(out_h, (N, D), "int8")
        for n in range(N):
            row = T.Bind(T.Cast("int64", T.max(T.min(IDS[n], T.Cast(id_dtype, V - 1)),
                                               T.Cast(id_dtype, 0))))
            for do in range(DO):
                for dv in T.vectorized(DV):
                    Y[n, do * DV + dv] = E[row, do * DV + dv]

    return finish(embedding, "embedding")


def rescale_8(features: int, M: int, s: int):
    """int8 [N, D] -> int8 [N, D]: requantize_8(q, M, s) (spec 2), M and s baked."""
    M, s = check_multiplier(M), check_shift(s)
    return _map_rows("rescale_8", features, "int8", lambda x, _: requantize(x, M, s, 8))


def residual_add(features: int, Ma: int, Mb: int, s: int):
    """int8 a, b [N, D] -> int8: sat_8(rshift_round(a*Ma + b*Mb, s)) in int64 (spec 9)."""
    Ma, Mb, s = check_multiplier(Ma), check_multiplier(Mb), check_shift(s)
    return _map_rows("residual_add", features, "int8", lambda a, b: sat_cast(rshift_round(
        T.Cast("int64", a) * T.int64(Ma) + T.Cast("int64", b) * T.int64(Mb), s), 8), binary=True)


def pwl_activation(pieces: int):
    """Stand-alone PWL activation (spec 7): x int16 [N] -> y int16 [N] with an int32 [3, n+1]
    table (`lstm.pack_pwl`). The LSTM and softmax kernels inline the same evaluation; this one
    serves other activations and exhaustive testing. Parameters: (x, table, y)."""
    n = check_pieces(pieces)
    V = 8

    @T.macro
    def chunk(X, TBL, Y, XC, IDX, base, lanes):
        for v in T.vectorized(lanes):
            XC[v] = T.max(T.min(T.Cast("int32", X[base + v]), TBL[0, n]), TBL[0, 0])
            IDX[v] = 0
        for q in T.unroll(1, n):
            for v in T.vectorized(lanes):
                IDX[v] = IDX[v] + T.Cast("int32", XC[v] >= TBL[0, q])
        for v in T.vectorized(lanes):
            Y[base + v] = T.Cast("int16", pwl_piece(TBL, IDX[v], XC[v]))

    @T.prim_func
    def pwl_activation(x_h: T.handle, t_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X = T.match_buffer(x_h, (N,), "int16")
        TBL = T.match_buffer(t_h, (3, n + 1), "int32")
        Y = T.match_buffer(y_h, (N,), "int16")
        XC = T.alloc_buffer((V,), "int32")
        IDX = T.alloc_buffer((V,), "int32")
        for no in range(N // V):
            chunk(X, TBL, Y, XC, IDX, no * V, V)
        for nt in range(N - N // V * V):
            chunk(X, TBL, Y, XC, IDX, N // V * V + nt, 1)

    return finish(pwl_activation, "pwl_activation")


__all__ = ["quantize_input", "embedding", "rescale_8", "residual_add", "pwl_activation"]
