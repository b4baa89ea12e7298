"""Linear layers (spec 5): int8 x [N, K] times int8 W [O, K]^T plus int32 bias, int32 accumulation.

- `linear_i32`: the final layer, int32 outputs (the accumulator itself).
- `linear_requant`: per-row requantize_N(acc, M[o], s[o]) to int8 (hidden linear) or int16 (the
  LSTM input projection gx = requantize_16(x W_x^T + b, Mx, sx), run over all T*B rows at once).

The product is `_gemm.gemm_macro` (tiles of 8 weight rows, rows of x in L1-sized blocks): vpmaddwd
on AVX2 targets (x is then sign-extended once into an int16 scratch [N, Kp]), sdot on aarch64
targets with dotprod, plain vectorizable TIR otherwise.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ._common import finish, resolve_isa
from ._gemm import KC, ROW_TILE, gemm_macro, padded_k, x16_source
from ._tir import requantize


def _check_dims(K, O):
    K, O = int(K), int(O)
    if K <= 0 or O <= 0:
        raise ValueError(f"linear sizes must be positive, got K={K}, O={O}")
    if K > 2**16:
        raise ValueError("spec 5 bounds K <= 2^16")
    return K, O


def _sext_macro(K: int):
    KP = padded_k(K)

    @T.macro
    def sext(X, X16, N):
        for n, kc in T.grid(N, KP // KC):
            for kv in T.vectorized(KC):
                X16[n, kc * KC + kv] = T.if_then_else(
                    kc * KC + kv < K, T.Cast("int16", X[n, T.min(kc * KC + kv, K - 1)]),
                    T.int16(0))

    return sext


def linear_i32(in_features: int, out_features: int, bias: bool = True, target=None,
               isa: str | None = None):
    """Final linear layer (spec 5): x int8 [N, K], W int8 [O, K], b int32 [O] -> y int32 [N, O].

    Parameters (destination passing): (x, W, b, y), or (x, W, y) with bias=False."""
    K, O = _check_dims(in_features, out_features)
    isa = resolve_isa(target, isa)
    KP = padded_k(K)
    gemm = gemm_macro(K, O, isa)
    sext = _sext_macro(K)
    wide = x16_source(isa)

    if bias:
        @T.prim_func
        def linear_i32(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            N = T.int64()
            X = T.match_buffer(x_h, (N, K), "int8")
            W = T.match_buffer(w_h, (O, K), "int8")
            Bb = T.match_buffer(b_h, (O,), "int32")
            Y = T.match_buffer(y_h, (N, O), "int32")
            ACC = T.alloc_buffer((ROW_TILE, 8), "int32")
            RED = T.alloc_buffer((ROW_TILE,), "int32")
            if wide:
                XS = T.alloc_buffer((N, KP), "int16")
                sext(X, XS, N)
            else:
                XS = X
            gemm(XS, 0, N, W, ACC, RED,
                 lambda n, o, acc: tirx.BufferStore(Y, acc + Bb[o], [n, o]))
    else:
        @T.prim_func
        def linear_i32(x_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            N = T.int64()
            X = T.match_buffer(x_h, (N, K), "int8")
            W = T.match_buffer(w_h, (O, K), "int8")
            Y = T.match_buffer(y_h, (N, O), "int32")
            ACC = T.alloc_buffer((ROW_TILE, 8), "int32")
            RED = T.alloc_buffer((ROW_TILE,), "int32")
            if wide:
                XS = T.alloc_buffer((N, KP), "int16")
                sext(X, XS, N)
            else:
                XS = X
            gemm(XS, 0, N, W, ACC, RED, lambda n, o, acc: tirx.BufferStore(Y, acc, [n, o]))

    return finish(linear_i32, "linear_i32", isa)


def linear_requant(in_features: int, out_features: int, out_dtype: str = "int8",
                   bias: bool = True, target=None, isa: str | None = None):
    """Hidden linear / LSTM input projection (spec 5, 2): x int8 [N, K], W int8 [O, K],
    b int32 [O], M int32 [O], s int32 [O] -> y = requantize_N(x W^T + b, M, s), N = 8 or 16.

    Parameters (destination passing): (x, W, b, M, s, y), or (x, W, M, s, y) with bias=False."""
    K, O = _check_dims(in_features, out_features)
    if out_dtype not in ("int8", "int16"):
        raise ValueError(f"out_dtype must be int8 or int16, got {out_dtype}")
    bits = int(out_dtype[3:])
    isa = resolve_isa(target, isa)
    KP = padded_k(K)
    gemm = gemm_macro(K, O, isa)
    sext = _sext_macro(K)
    wide = x16_source(isa)

    if bias:
        @T.prim_func
        def linear_requant(x_h: T.handle, w_h: T.handle, b_h: T.handle, m_h: T.handle,
                           s_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            N = T.int64()
            X = T.match_buffer(x_h, (N, K), "int8")
            W = T.match_buffer(w_h, (O, K), "int8")
            Bb = T.match_buffer(b_h, (O,), "int32")
            Mb = T.match_buffer(m_h, (O,), "int32")
            Sb = T.match_buffer(s_h, (O,), "int32")
            Y = T.match_buffer(y_h, (N, O), out_dtype)
            ACC = T.alloc_buffer((ROW_TILE, 8), "int32")
            RED = T.alloc_buffer((ROW_TILE,), "int32")
            if wide:
                XS = T.alloc_buffer((N, KP), "int16")
                sext(X, XS, N)
            else:
                XS = X
            gemm(XS, 0, N, W, ACC, RED, lambda n, o, acc: tirx.BufferStore(
                Y, requantize(acc + Bb[o], Mb[o], Sb[o], bits), [n, o]))
    else:
        @T.prim_func
        def linear_requant(x_h: T.handle, w_h: T.handle, m_h: T.handle, s_h: T.handle,
                           y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            N = T.int64()
            X = T.match_buffer(x_h, (N, K), "int8")
            W = T.match_buffer(w_h, (O, K), "int8")
            Mb = T.match_buffer(m_h, (O,), "int32")
            Sb = T.match_buffer(s_h, (O,), "int32")
            Y = T.match_buffer(y_h, (N, O), out_dtype)
            ACC = T.alloc_buffer((ROW_TILE, 8), "int32")
            RED = T.alloc_buffer((ROW_TILE,), "int32")
            if wide:
                XS = T.alloc_buffer((N, KP), "int16")
                sext(X, XS, N)
            else:
                XS = X
            gemm(XS, 0, N, W, ACC, RED, lambda n, o, acc: tirx.BufferStore(
                Y, requantize(acc, Mb[o], Sb[o], bits), [n, o]))

    return finish(linear_requant, "linear_requant", isa)
