"""Linear layers (spec 5): int8 x [N, K] times int8 W [O, K]^T plus int32 bias, int32 accumulation.

- `linear_i32`: the final layer, int32 outputs (the accumulator itself).
- `linear_requant`: per-row requantize_N(acc, M[o], s[o]) to int8 (hidden linear) or int16 (the
  LSTM input projection gx = requantize_16(x W_x^T + b, Mx, sx), run over all T*B rows at once).

The product is `_gemm.gemm_macro` (tiles of 8 weight rows, rows of x in L1-sized blocks): vpmaddwd
on x86 targets (x is then sign-extended once into an int16 scratch [N, Kp]), sdot on aarch64
targets with dotprod, plain vectorizable TIR otherwise; with packed weights, the outer-product
form on x86 (AVX2 vpmaddwd / vpmaddubsw, VNNI vpdpbusd: the family's step, kernels/isa/) and the
smmla form on aarch64 with i8mm (`_gemm.gemm_mmla_macro`).
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from . import isa as _isa
from ._common import finish, requantizer, resolve_isa, without_params
from ._gemm import with_convention as conv  # noqa: E402
from ._gemm import (AMX_NR, KC, MMLA_CP, MMLA_RP, ROW_TILE, amx_kp, amx_shape, amx_source_macro,
                    gemm_amx_macro, gemm_macro, gemm_mmla_macro, gemm_outer_macro, mmla_kp,
                    mmla_source_macro, outer_shape, padded_k, u8_source_macro, uses_u8, x16_source)
from ._tir import add_i32

LIN_NR, LIN_OV = 4, 2      # register tile of the packed linear kernels: 4 rows x 2 x 8 channels


def lin_tile(isa: str, packed: bool) -> tuple[int, int]:
    """(rows, 8-channel vectors) of the packed linear kernels' register tile: the family's
    `lin_tile` (more registers, a larger tile), else LIN_NR x LIN_OV."""
    fam = _isa.family(isa)
    return fam.lin_tile if (packed and fam.lin_tile) else (LIN_NR, LIN_OV)


def _check_dims(K, O):
    K, O = int(K), int(O)
    if K <= 0 or O <= 0:
        raise ValueError(f"linear sizes must be positive, got K={K}, O={O}")
    if K > 2**16:
        raise ValueError("spec 5 bounds K <= 2^16")
    return K, O


def _sext_macro(K: int, KP: int | None = None):
    """X16[n, k] = int16(X[n, k]) for k < K, 0 for K <= k < KP (KP: any width >= K)."""
    KP = padded_k(K) if KP is None else KP
    KF = KP // KC * KC     # vectorized part

    @T.macro
    def sext(X, X16, N):
        for n, kc in T.grid(N, KF // KC):
            for kv in T.vectorized(KC):
                X16[n, kc * KC + kv] = T.if_then_else(
                    kc * KC + kv < K, T.Cast("int16", X[n, T.min(kc * KC + kv, K - 1)]),
                    T.int16(0))
        for n, kr in T.grid(N, KP - KF):
            X16[n, KF + kr] = T.if_then_else(
                KF + kr < K, T.Cast("int16", X[n, T.min(KF + kr, K - 1)]), T.int16(0))

    return sext


def uses_mmla(target, isa: str, packed: bool) -> bool:
    """Packed linear kernels for aarch64 targets with i8mm take the smmla form (`_gemm.gemm_mmla_macro`)."""
    return bool(packed) and _isa.family(isa).mmla(target)


def uses_tiles(isa: str, packed: bool) -> bool:
    """Packed linear kernels of a family with AMX tiles (kernels/isa/amx.py) take the tile form
    (`_gemm.gemm_amx_macro`: s8 x s8, so w7 changes nothing there and no correction is added)."""
    return bool(packed) and _isa.family(isa).tiles


def product(K: int, O: int, isa: str, w7: bool, packed: bool, bias: bool, mmla: bool = False,
            parallel: bool = False):
    """The GEMM of a linear kernel: (W shape, source dtype or None, source width, fill macro,
    gemm macro, extra source rows). See _gemm for the micro-kernels, the u8 route (w7) and packed
    weights; parallel: the packed AVX2 form splits its channel groups among the thread pool."""
    if uses_tiles(isa, packed):
        # an int8 copy of x zero padded to KP columns and to a multiple of 32 rows (N + 31 rows
        # allocated: the fill zeroes those below the next multiple of 32)
        return amx_shape(K, O), "int8", amx_kp(K), amx_source_macro(K), \
            gemm_amx_macro(K, O, parallel, _isa.family(isa).tiles_emulated), AMX_NR - 1
    if mmla:
        # x interleaved in row pairs into an int8 scratch with one spare row (odd N)
        return ((O + 1) // 2, mmla_kp(K) // 8, 2, 8), "int8", mmla_kp(K), mmla_source_macro(K), \
            gemm_mmla_macro(K, O), 1
    u8 = uses_u8(isa, w7, packed)
    if u8 and not bias:
        raise ValueError("the u8 kernel (w7=True) needs a bias input: pass "
                         "bias + _gemm.u8_correction(W) (zeros + correction without a bias)")
    if packed and _isa.family(isa).outer:
        # many rows (T*B for an input projection): the outer-product form, 4 rows x 16 channels
        NR, OV = lin_tile(isa, packed)
        wshape = outer_shape(K, O, u8, OV)
        KP = wshape[1] * wshape[3]
        fill = u8_source_macro(K, KP) if u8 else _sext_macro(K, KP)
        return wshape, ("uint8" if u8 else "int16"), KP, fill, gemm_outer_macro(
            K, O, isa, u8, NR=NR, OV=OV, parallel=parallel), 0
    gemm = gemm_macro(K, O, isa)
    if x16_source(isa):
        return (O, K), "int16", padded_k(K), _sext_macro(K), gemm, 0
    return (O, K), None, K, None, gemm, 0


def _linear(name: str, K: int, O: int, out_dtype: str, bias: bool, requant: bool, target, isa,
            w7: bool, packed: bool, parallel: bool, epilogue):
    """The PrimFunc of both linear kernels: parameters (x, W, b, M, s, y), without b if not bias and
    without M, s if not requant. epilogue(acc, o, Bb, Mb, Sb): the value stored for channel o."""
    isa = resolve_isa(target, isa)
    mmla = uses_mmla(target, isa, packed)
    WS, src_dt, KP, sext, gemm, XR = product(K, O, isa, w7, packed, bias, mmla, parallel)
    wide = src_dt is not None
    ACC_ROWS = lin_tile(isa, packed)[0] * lin_tile(isa, packed)[1]

    @T.prim_func
    def linear(x_h: T.handle, w_h: T.handle, b_h: T.handle, m_h: T.handle, s_h: T.handle,
               y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        X = T.match_buffer(x_h, (N, K), "int8")
        W = T.match_buffer(w_h, WS, "int8")
        Bb = T.match_buffer(b_h, (O,), "int32")
        Mb = T.match_buffer(m_h, (O,), "int32")
        Sb = T.match_buffer(s_h, (O,), "int32")
        Y = T.match_buffer(y_h, (N, O), out_dtype)
        ACC = T.alloc_buffer((max(ROW_TILE, ACC_ROWS, MMLA_RP * MMLA_CP), 8), "int32")
        RED = T.alloc_buffer((ROW_TILE,), "int32")
        if wide:
            XS = T.alloc_buffer((N + XR, KP), src_dt)
            sext(X, XS, N)
        else:
            XS = X
        gemm(XS, 0, N, W, ACC, RED,
             lambda n, o, acc: tirx.BufferStore(Y, epilogue(acc, o, Bb, Mb, Sb), [n, o]))

    unused = (() if bias else ("Bb",)) + (() if requant else ("Mb", "Sb"))
    return conv(finish(without_params(linear, *unused), name, isa), isa, w7, packed,
                lin_tile(isa, packed)[1], mmla=mmla, tiles=uses_tiles(isa, packed))


def linear_i32(in_features: int, out_features: int, bias: bool = True, target=None,
               isa: str | None = None, w7: bool = False, packed: bool = False,
               parallel: bool = False):
    """Final linear layer (spec 5): x int8 [N, K], W int8 [O, K], b int32 [O] -> y int32 [N, O].

    Parameters (destination passing): (x, W, b, y), or (x, W, y) with bias=False.
    w7=True promises the family's u8 x s8 micro-kernel is exact for W (`weights_fit_u8(W, isa)`:
    |W| <= 64 on AVX2, any W with VNNI; the caller checks it): packed kernels then take the u8 route
    and b must be the bias plus `_gemm.u8_correction(W)`. packed=True: on x86, W is taken
    pre-packed (`kernels.prepare_weights`, `_gemm.pack_outer`); elsewhere it changes nothing.
    parallel=True (packed AVX2 only): the output channels are split among the worker threads of
    TVM's pool (one parallel launch per call: for GEMMs with many rows, e.g. an LSTM input
    projection over T*B rows; a launch costs more than it saves on a few rows)."""
    K, O = _check_dims(in_features, out_features)
    return _linear("linear_i32", K, O, "int32", bias, False, target, isa, w7, packed, parallel,
                   lambda acc, o, Bb, Mb, Sb: (acc + Bb[o]) if bias else acc)


def linear_requant(in_features: int, out_features: int, out_dtype: str = "int8",
                   bias: bool = True, target=None, isa: str | None = None, w7: bool = False,
                   packed: bool = False, shift_hi: bool = False, scale: tuple | None = None,
                   parallel: bool = False):
    """Hidden linear / LSTM input projection (spec 5, 2): x int8 [N, K], W int8 [O, K],
    b int32 [O], M int32 [O], s int32 [O] -> y = requantize_N(x W^T + b, M, s), N = 8 or 16.

    Parameters (destination passing): (x, W, b, M, s, y), or (x, W, M, s, y) with bias=False.
    w7, packed: as for linear_i32 (b then includes `_gemm.u8_correction(W)`).
    shift_hi=True promises every shift s[o] is in [32, 62] (`_tir.requantize_hi`, cheaper on AVX2).
    scale=(M, s): every M[o] is M and every s[o] is s (per-tensor quantization): both are baked in as
    immediates (no per-channel loads and 64-bit conversions in the epilogue) and the M / s buffers,
    still parameters, are not read. scale=(None, s): only the shift is one per tensor (what the
    quantizer produces: per-channel multipliers, one shift): the shift and its rounding constant
    become immediates, M is read per channel. parallel: as for linear_i32."""
    rq = requantizer(shift_hi, scale)
    K, O = _check_dims(in_features, out_features)
    if out_dtype not in ("int8", "int16"):
        raise ValueError(f"out_dtype must be int8 or int16, got {out_dtype}")
    bits = int(out_dtype[3:])
    return _linear("linear_requant", K, O, out_dtype, bias, True, target, isa, w7, packed, parallel,
                   lambda acc, o, Bb, Mb, Sb: rq(add_i32(acc, Bb[o]) if bias else acc, Mb[o], Sb[o],
                                                 bits))
