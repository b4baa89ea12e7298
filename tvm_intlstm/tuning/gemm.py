"""Block-form (s_tir) int8 GEMM kernels and their MetaSchedule design space.

`gemm_blocks(K, O, out_dtype, n_rows=None)` returns a PrimFunc with the same interface and the same
arithmetic as `tvm_intlstm.kernels.linear_requant` / `linear_i32` (bias=True), written as s_tir
blocks so that MetaSchedule can schedule it:

    x16[n, k]  = int16(x[n, k])  for k < K, 0 for K <= k < KP          (KP = K rounded up to 2)
    w16[o, k]  = int16(W[o, k])  for o < O, k < K, else 0               (OP = O rounded up to 8)
    acc[n, o]  = sum_k int32(x16[n, k]) * int32(w16[o, k])              (exact int32, spec 5)
    y[n, o]    = requantize_N(acc[n, o] + b[o], M[o], s[o])  (int8/int16)   or  acc + b  (int32)

The padding rows/columns are zeros, so they add nothing: the result is bit-exact with
tvm_intlstm.reference.ops.linear_acc / requantize (docs/integer_spec.md sections 2 and 5).
Rows are padded to a multiple of ROW_PAD (x16 has zero rows past N; they are never stored).

Two weight forms. `packed=False`: W int8 [O, K] as the default kernels take it; the schedule
sign-extends and packs one panel of it per call (w16 block). `packed=True` (what tuning uses): W is
passed pre-packed, int8 [OP/8, KP/2, 8, 2] = pack_weights(W) — for the constant weights of a model
the compiler packs once at compile time — and the vpmaddwd step sign-extends 16 bytes of it
(vpmovsxbw). Packing per call cost ~250-500 us on the 256 x 2048 weights, more than the whole
default kernel at small N: pre-packing is what makes the tuned kernel pay.

The design space (`schedule_gemm`, used as a MetaSchedule ScheduleFn space) makes these choices:

- n (rows): a register tile of `nt` rows, `sample_categorical` over NT_CHOICES. The decision does
  not depend on the row count, so a trace tuned on a static N (e.g. T*B = 64) replays on the
  symbolic-N kernel (`split(n, [None, nt])` then carries a predicate for the row tail).
- o (output channels): `sample_perfect_tile` of OP/8 into (panel, vectors per register tile);
  the innermost 8 channels are one int32x8 vector.
- k: pairs (the int16 pair of vpmaddwd), then `sample_perfect_tile` of KP/2 into (k0, k1).
- weights: pre-packed [OP/8, KP/2, 8, 2] (the 8 x 2 weights of one step are 16 contiguous
  bytes), or (packed=False) one panel sign-extended into such a scratch per o0 (`compute_at` +
  `transform_layout`, two loop orders = two designs, see design_spaces);
- on AVX2 targets the (8 channels x 2 k) step is tensorized with INTRIN_AVX2_PMADDWD:
  one vpmaddwd of the broadcast int16 pair of x against 8 packed weight pairs (exact for every
  int16 input but (-32768)^2 * 2, which int8-extended data never reach). vpmaddubsw is NOT used
  (it saturates with full-range int8 operands, kernels/isa/avx2.py). Elsewhere the 8 lanes are vectorized;
- the epilogue (bias, requantize) is computed per row tile from the accumulator tile
  (`reverse_compute_at`), vectorized by 8 over the output channels;
- `pragma_auto_unroll_max_step` sampled from UNROLL_CHOICES on the gemm block.

AVX-512 machines (x86_wide.py): `gemm_blocks_for_isa(isa, ...)`, `prepare_weights(isa, W, bias)`
and `design_spaces(sch, isa, O)` dispatch on the design-space names of `x86_wide.x86_isa(target)`
(names of tuning spaces, not of the kernel families of kernels/isa/, which they are derived from).
For "avx512_vnni" and "avx512" the kernel is x86_wide.gemm_blocks_wide: the same call interface,
a u8 source block (x + 128), weights packed [OP/16, KP/4, 16, 4] (layout "o16k4") and the +128
correction folded into the bias by prepare_weights (bias - 128 * rowsum(W)); the 16 x 4 step is
vpdpbusd (VNNI) or an exact two-vpmaddwd zmm sequence (AVX-512BW). For every other isa nothing
changes: gemm_blocks(packed=True), pack_weights(W) and the bias as it is.
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, tirx
from tvm.script import tirx as T

from ._blocks import (NT_CHOICES, ROW_PAD, UNROLL_CHOICES,  # noqa: F401  (re-exported)
                      check_linear, dot_desc, dot_intrin, finish_tiles, gemm_block_kernel,
                      sample_tiles)

KPAIR = 2          # k per vpmaddwd lane
OVEC = 8           # output channels per int32x8 vector
INTRIN_AVX2_PMADDWD = "tvm_intlstm_avx2_pmaddwd_8x2_i16i16i32"        # int16 weights (packed per call)
INTRIN_AVX2_PMADDWD_I8W = "tvm_intlstm_avx2_pmaddwd_8x2_i16i8i32"      # int8 pre-packed weights


def padded(K: int, O: int) -> tuple[int, int]:
    return (K + KPAIR - 1) // KPAIR * KPAIR, (O + OVEC - 1) // OVEC * OVEC


def gemm_blocks(in_features: int, out_features: int, out_dtype: str = "int8",
                n_rows: int | None = None, name: str | None = None,
                packed: bool = False, scale: tuple | None = None) -> tirx.PrimFunc:
    """Block-form linear kernel: (x, W, b, M, s, y) for out_dtype int8/int16, (x, W, b, y) for
    int32 (the final linear layer). n_rows: a static row count (the tuning specialization);
    None gives the symbolic-N kernel the compiler calls. packed: W is passed pre-packed, int8
    [OP/8, KP/2, 8, 2] = pack_weights(W) (done once, at compile time, for constant weights),
    instead of int8 [O, K] packed on every call. scale: as for kernels.linear_requant ((M, s) or
    (None, s): a per-tensor multiplier and/or shift baked into the epilogue, which is then as cheap
    as the default kernel's; the M / s buffers stay parameters). It changes no block or loop, so
    a trace tuned on one epilogue replays on another."""
    K, O = check_linear(in_features, out_features, out_dtype)
    KP, OP = padded(K, O)

    def wread(W, W16, o, k):
        if packed:
            return tirx.Cast("int32", W[o // OVEC, k // KPAIR, o % OVEC, k % KPAIR])
        return tirx.Cast("int32", W16[o, k])

    def wext(W, o, k):
        if OP == O and KP == K:   # no padding: a plain sign extension (vectorizes)
            return tirx.Cast("int16", W[o, k])
        return tirx.if_then_else(tirx.all(o < O, k < K), tirx.Cast(
            "int16", W[tirx.min(o, O - 1), tirx.min(k, K - 1)]), tirx.const(0, "int16"))

    func = gemm_block_kernel(
        K, O, KP, OP, out_dtype, n_rows,
        (OP // OVEC, KP // KPAIR, OVEC, KPAIR) if packed else (O, K),
        ("x16", "int16", lambda x: T.Cast("int16", x), T.int16(0)), wread,
        w16=((1, 1), None) if packed else ((OP, KP), wext), scale=scale)
    default_name = "linear_requant" if out_dtype != "int32" else "linear_i32"
    func = func.with_attr("global_symbol", name or default_name)
    return func.with_attr("intlstm.weight_layout", "o8k2" if packed else "ok")


def pack_weights(W: np.ndarray) -> np.ndarray:
    """int8 W [O, K] -> the packed layout of gemm_blocks(packed=True): int8 [OP/8, KP/2, 8, 2],
    P[a, b, i, j] = W[8a + i, 2b + j] (zeros in the padding)."""
    W = np.asarray(W)
    if W.dtype != np.int8 or W.ndim != 2:
        raise TypeError(f"pack_weights takes an int8 [O, K] array, got {W.dtype} {W.shape}")
    O, K = W.shape
    KP, OP = padded(K, O)
    Wp = np.zeros((OP, KP), np.int8)
    Wp[:O, :K] = W
    return np.ascontiguousarray(
        Wp.reshape(OP // OVEC, OVEC, KP // KPAIR, KPAIR).transpose(0, 2, 1, 3))


# --- the AVX2 tensor intrinsic --------------------------------------------------------------------
def _pmaddwd_impl(w_dtype: str):
    """One vpmaddwd of the broadcast int16 pair of A against 8 weight pairs (int16, or int8
    sign-extended by vpmovsxbw)."""
    def weights(B):
        if w_dtype == "int16":
            return B.vload([0, 0], dtype="int16x16")
        return T.Cast("int16x16", B.vload([0, 0], dtype="int8x16"))

    @T.macro
    def step(A, B, C):
        a_pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a_b = T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a_b, weights(B), dtype="int32x8")

    return dot_intrin(8, KPAIR, "int16", w_dtype, step,
                      "_pmaddwd_impl" if w_dtype == "int16" else "_pmaddwd_i8w_impl")


def register_intrinsics() -> None:
    """Register INTRIN_AVX2_PMADDWD and INTRIN_AVX2_PMADDWD_I8W, and the AVX-512 ones of
    x86_wide (register_wide_intrinsics), once per process: a tuned trace replays only where the
    intrinsics it tensorizes with are registered."""
    from tvm.s_tir import TensorIntrin  # pylint: disable=import-outside-toplevel

    from .x86_wide import register_wide_intrinsics  # pylint: disable=import-outside-toplevel

    if TensorIntrin.get(INTRIN_AVX2_PMADDWD, allow_missing=True) is None:
        TensorIntrin.register(INTRIN_AVX2_PMADDWD,
                              dot_desc(8, KPAIR, "int16", "int16", "_pmaddwd_desc"),
                              _pmaddwd_impl("int16"))
    if TensorIntrin.get(INTRIN_AVX2_PMADDWD_I8W, allow_missing=True) is None:
        TensorIntrin.register(INTRIN_AVX2_PMADDWD_I8W,
                              dot_desc(8, KPAIR, "int16", "int8", "_pmaddwd_i8w_desc"),
                              _pmaddwd_impl("int8"))
    register_wide_intrinsics()


# --- the design space ------------------------------------------------------------------------------
def schedule_gemm(sch: s_tir.Schedule, isa: str = "avx2", O: int | None = None,
                  decisions: dict | None = None) -> None:
    """Apply the design space to a Schedule of `gemm_blocks(...)` (sampling every decision).

    isa: "avx2" tensorizes with vpmaddwd, anything else vectorizes the 8 output lanes.
    O: the real output channel count (vectorizes the epilogue when O % 8 == 0).
    decisions: fix some decisions instead of sampling them: {"nt": rows, "o_tile": [panels,
    vectors], "k_tile": [k0, k1], "unroll": max_step, "pack": 0 or 1 (not sampled)} (used by tests and by hand experiments)."""
    dec = decisions or {}
    gemm = sch.get_sblock("gemm")
    epi = sch.get_sblock("epilogue")
    packed = str(sch.mod["main"].attrs.get("intlstm.weight_layout", "ok")) == "o8k2"
    n0, n1, o0, o1, o8, k0, k1, kp = sample_tiles(sch, gemm, dec, OVEC, 8, KPAIR)
    if isa == "avx2":
        sch.reorder(o0, n0, k0, k1, n1, o1, o8, kp)
    else:
        sch.reorder(o0, n0, k0, k1, n1, o1, kp, o8)
    if not packed:
        _pack_per_call(sch, o0, int(dec.get("pack", 0)))
    # epilogue per row tile, straight from the accumulator tile
    sch.reverse_compute_at(epi, n0, preserve_unit_loops=True)
    # vectorize before decompose_reduction: TVM refuses to vectorize a reduction block that has
    # lost its init ("neither a local complete block nor a local reduction block")
    if isa != "avx2":
        sch.vectorize(o8)
    sch.decompose_reduction(gemm, k0)
    if isa == "avx2":
        sch.tensorize(o8, INTRIN_AVX2_PMADDWD_I8W if packed else INTRIN_AVX2_PMADDWD)
    else:
        sch.unroll(kp)
    finish_tiles(sch, epi, n0, n1, o1, OVEC if O is not None and O % OVEC == 0 else None, dec)


def _pack_per_call(sch, o0, order):
    """Unpacked variant: sign-extend and pack one panel of weights ([o/8, k/2, 8, 2]) per o0;
    loop order 0 = as W is read (rows of k), 1 = as the panel is written (8 x 2 groups)."""
    w16 = sch.get_sblock("w16")
    gemm = sch.get_sblock("gemm")
    sch.compute_at(w16, o0, preserve_unit_loops=True)
    sch.transform_layout(gemm, ("read", 1),
                         tirx.IndexMap.from_func(lambda a, b: (a // OVEC, b // KPAIR, a % OVEC,
                                                               b % KPAIR), index_dtype="int32"))
    po, pk = sch.get_loops(w16)[-2:]
    if order == 1:
        po0, po1 = sch.split(po, [None, OVEC])
        pk0, pk1 = sch.split(pk, [None, KPAIR])
        sch.reorder(po0, pk0, po1, pk1)
        sch.unroll(po1)
        sch.unroll(pk1)
    else:
        _, pk1 = sch.split(pk, [None, KPAIR])
        sch.unroll(pk1)


PACK_ORDERS = (0, 1)


def design_spaces(sch: s_tir.Schedule, isa: str = "avx2", O: int | None = None) -> list:
    """The MetaSchedule space: one design per packing loop order (a Python-level choice cannot be
    a sampled decision: MetaSchedule re-samples decisions by replaying the design's trace).

    A kernel of x86_wide.gemm_blocks_wide (layout o16k4/o8k4) gets x86_wide's space (tensorized
    with vpdpbusd for "avx512_vnni", the exact vpmaddwd zmm step for "avx512"). A gemm_blocks
    kernel with isa "avx512_vnni"/"avx512" is scheduled as for "avx2" (those CPUs have AVX2)."""
    from . import x86_wide  # pylint: disable=import-outside-toplevel

    layout = str(sch.mod["main"].attrs.get("intlstm.weight_layout", "ok"))
    if layout in x86_wide.LAYOUT_LANES:
        return x86_wide.design_spaces_wide(sch, isa, O)
    if isa in x86_wide.WIDE_ISAS:
        isa = "avx2"
    if layout == "o8k2":
        schedule_gemm(sch, isa, O)
        return [sch]
    out = []
    for pack in PACK_ORDERS:
        s = sch.copy()
        schedule_gemm(s, isa, O, {"pack": pack})
        out.append(s)
    return out


# --- per-isa entry points (the AVX-512 kernels live in x86_wide.py) -------------------------------
def gemm_blocks_for_isa(isa: str, in_features: int, out_features: int, out_dtype: str = "int8",
                        n_rows: int | None = None, name: str | None = None) -> tirx.PrimFunc:
    """The pre-packed block-form kernel tuned for `isa`: x86_wide.gemm_blocks_wide (u8, o16k4,
    corrected bias) for "avx512_vnni"/"avx512", else gemm_blocks(packed=True) (o8k2). Call it with
    the weights and bias of `prepare_weights(isa, W, bias)`."""
    from . import x86_wide  # pylint: disable=import-outside-toplevel

    if isa in x86_wide.WIDE_ISAS:
        return x86_wide.gemm_blocks_wide(in_features, out_features, out_dtype, n_rows, name)
    return gemm_blocks(in_features, out_features, out_dtype, n_rows, name, packed=True)


def prepare_weights(isa: str, W: np.ndarray, bias=None) -> tuple[np.ndarray, np.ndarray]:
    """(packed W, bias for the kernel) of `gemm_blocks_for_isa(isa, ...)`, from int8 W [O, K] and
    int32 bias [O] (None: zeros). "avx512_vnni"/"avx512": (pack_weights_vnni(W) [OP/16, KP/4, 16,
    4], bias - 128 * rowsum(W)), the u8 correction of x86_wide; any other isa: (pack_weights(W),
    bias unchanged)."""
    from . import x86_wide  # pylint: disable=import-outside-toplevel

    if isa in x86_wide.WIDE_ISAS:
        return x86_wide.prepare_weights_wide(isa, W, bias)
    Wp = pack_weights(W)
    O = np.asarray(W).shape[0]
    if bias is None:
        return Wp, np.zeros(O, np.int32)
    b = np.asarray(bias)
    if b.dtype.kind not in "iu" or b.shape != (O,):
        raise TypeError(f"bias must be an integer array of shape ({O},), got {b.dtype} {b.shape}")
    if b.size and (b.min() < -(2**31) or b.max() > 2**31 - 1):
        raise OverflowError("bias does not fit int32")
    return Wp, b.astype(np.int32)
