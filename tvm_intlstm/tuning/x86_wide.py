"""AVX-512 and AVX-512 VNNI paths of the tuned int8 GEMM (block form, design space, target -> isa).

The spec (docs/integer_spec.md sections 2 and 5) has SIGNED int8 activations x and SIGNED int8
weights W. The x86 u8 x s8 instructions become exact with the shift u = x + 128 (uint8, 0..255):

    sum_k W[o,k] x[n,k] = sum_k W[o,k] u[n,k] - 128 * rowsum(W[o])

and the correction is folded into the bias once, at packing time (`gemm.prepare_weights(isa, W,
bias)`, i.e. `prepare_weights_wide`):
bias'[o] = bias[o] - 128 * sum_k W[o,k] (int32), so the kernel itself needs no extra input:

    u[n, k]   = uint8(x[n, k] + 128)  for k < K, 128 (x = 0) for K <= k < KP   (KP = K rounded to 4)
    P         = pack_weights_vnni(W): int8 [OP/16, KP/4, 16, 4], P[a, b, i, j] = W[16a + i, 4b + j]
                (zeros in the padding; OP = O rounded up to 16)
    acc[n, o] = sum_k int32(u[n, k]) * int32(W[o, k])                          (exact int32)
    y[n, o]   = requantize_N(acc[n, o] + bias'[o], M[o], s[o])  (int8/int16), acc + bias' (int32)

acc + bias' equals spec 5's accumulator exactly, and no intermediate overflows int32 under the
spec's bounds (K <= 2^16, |W| <= 127, |b| <= 2^30): every partial sum of acc is bounded by
K * 255 * 128 < 2^31, |128 * rowsum(W)| <= 127 * 2^23 < 2^30, so |bias'| <= 2^31 - 2^23, and the
final sum is spec 5's int32 accumulator. `corrected_bias` checks that bias' fits int32 (it raises
otherwise, e.g. for a -128 weight row at K = 2^16 with |b| = 2^30).

`gemm_blocks_wide(K, O, out_dtype, n_rows, name)` has the call interface of the packed
`gemm.gemm_blocks` (x int8 [N, K], packed W, bias' int32 [O], M int32 [O], s int32 [O], y), only
the packed weight shape and the bias contents differ. Its weight layout attribute is "o16k4".

The inner 16 x 4 step (16 output channels x 4 k: 16 int32 lanes, 64 weight bytes contiguous):

- isa "avx512_vnni" (cascadelake, icelake-server, sapphirerapids, znver4, ...): one vpdpbusd zmm,
  u8 x s8 products summed by 4 into int32, NOT saturating (vpdpbusds is the saturating one): exact
  on the full int8 range. INTRIN_VNNI is ours, with the description of TVM's `dot_16x4_vnni`
  (tvm/s_tir/tensor_intrin/x86.py) and the same operation, because TVM 0.27's does not build with
  the wheel's LLVM 22: LLVM 22 changed the byte operands of llvm.x86.avx512.vpdpbusd.512 from
  <16 x i32> to <64 x i8> (llvm-project PR 155194) and TVM's body still passes <16 x i32> (LLVM's
  verifier: "Call parameter type does not match function signature"). Ours picks the operand
  types from codegen.llvm_version_major().
- isa "avx512" (AVX-512BW without VNNI, e.g. skylake-avx512): NOT TVM's `dot_16x4_avx512`, which
  is vpmaddubsw (u8 x s8 pair sums SATURATED to int16: u = 255, w = 127 gives 2 * 32385 = 64770 >
  32767) then vpmaddwd by ones: wrong for full-range int8 (kernels/isa/avx2.py).
  Ours, INTRIN_AVX512_U8S8: the 64 weight bytes are read as int16x32 (element 2i = w[i,0] |
  w[i,1] << 8, element 2i+1 = w[i,2] | w[i,3] << 8); (e << 8) >> 8 and e >> 8 (arithmetic, int16)
  sign-extend the even and the odd bytes, and two vpmaddwd zmm against the broadcast int16 pairs
  (u0, u2) and (u1, u3) give u0 w0 + u2 w2 and u1 w1 + u3 w3 per lane: products |u w| <= 255 * 128
  and pair sums < 2^16, exact in vpmaddwd's int32 result (its one inexact case, two
  (-32768)^2 products, cannot occur). Same layout and block form as the VNNI path, so one
  prepare_weights/packing serves both; it costs 3 shifts + 2 vpmaddwd + 2 adds per 16 x 4 step
  where VNNI needs one vpdpbusd (LLVM hoists the weight shifts out of the row tile). Its ymm twin
  below ran 791 us against 589 us for gemm.py's o8k2 AVX2 path on a 64 x 256 x 2048 product on
  Zen3 (best of 12 sampled schedules each). Not measured on AVX-512 hardware; the alternative to
  measure there is gemm.py's AVX2 step widened to zmm (layout o16k2, signed x, no +128:
  vpmovsxbw + one vpmaddwd per 16 x 2).
- the same intrinsic body with 8 lanes (INTRIN_AVX2_U8S8, vpmaddwd ymm, weights [OP/8, KP/4, 8, 4],
  `gemm_blocks_wide(..., lanes=8)`, layout "o8k4") runs on AVX2: the tests use it to check that
  intrinsic body's arithmetic bit for bit on an AVX2 host, which cannot execute AVX-512.
- isa "avx2_w7" (W7_ISA; GEMMs whose weights lie in [-64, 64], QuantConfig(weight_bits=7)):
  INTRIN_AVX2_U8S7, vpmaddubsw of the broadcast u bytes against the 32 weight bytes, then vpmaddwd
  by ones, the instruction pair of the AVX2 kernels' u8 route (kernels/_gemm.py). Exact because
  |w| <= 64 keeps vpmaddubsw's pair sums within int16 (2 * 255 * 64 = 32640); `tune` gives it
  only to such GEMMs (tasks.GemmTask.u8_weights) and measures their trials on 7-bit weights.
- any other isa: the lanes are vectorized (no tensorize): the plain check of the u8 + packed +
  corrected-bias arithmetic on any host.

The design space (`schedule_gemm_wide`, `design_spaces_wide`) has the same decisions as
gemm.schedule_gemm: a row tile `nt` (NT_CHOICES; the rows are padded to ROW_PAD so that every row
tile divides them and tensorize needs no predicate, and a trace tuned at a static N replays on the
symbolic-N kernel), `sample_perfect_tile` of OP/16 into (panel, vectors per register tile; at most
4 zmm-vectors wide: nt * 4 accumulators fill the 32 zmm registers at nt = 8) and of KP/4 into
(k0, k1), the epilogue per row tile from the accumulator tile, and the unroll pragma.

`x86_isa(target)`: "avx512_vnni" | "avx512" | "avx2" | None, from the kernel families' feature object
of the target (`kernels.isa.features`: its mcpu/mattr as LLVM resolves them, so "-mattr=-avx512vnni"
or "+avx512bw" count too). These are tuning design-space names, not kernel family names.
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, tirx
from tvm.script import tirx as T

from ._blocks import (check_linear, dot_desc, dot_intrin, finish_tiles, gemm_block_kernel,
                      sample_tiles)

KQUAD = 4                    # k per step (the 4 bytes of one vpdpbusd lane)
LANES = 16                   # output channels per int32x16 zmm vector
WIDE_ISAS = ("avx512_vnni", "avx512")
U8_SHIFT = 128               # u = x + 128
LAYOUTS = {16: "o16k4", 8: "o8k4"}          # weight_layout attribute -> lanes
LAYOUT_LANES = {v: k for k, v in LAYOUTS.items()}
TVM_INTRIN_VNNI = "dot_16x4_vnni"           # TVM's (tensor_intrin/x86.py): broken on LLVM >= 22
TVM_INTRIN_AVX512 = "dot_16x4_avx512"       # TVM's: vpmaddubsw, saturates, NOT exact (module doc)
INTRIN_VNNI = "tvm_intlstm_avx512_vnni_16x4_u8i8i32"             # ours: vpdpbusd, LLVM 21 or 22
INTRIN_AVX512_U8S8 = "tvm_intlstm_avx512_pmaddwd_16x4_u8i8i32"   # ours, exact (see module doc)
INTRIN_AVX2_U8S8 = "tvm_intlstm_avx2_pmaddwd_8x4_u8i8i32"        # the same body on 8 lanes
INTRIN_AVX2_U8S7 = "tvm_intlstm_avx2_pmaddubsw_8x4_u8s7i32"      # vpmaddubsw, |w| <= 64 only
W7_ISA = "avx2_w7"    # the tuning isa of GEMMs whose weights lie in [-64, 64] (see intrinsic_for)
INTRIN_VNNI256 = "tvm_intlstm_vnni_8x4_u8i8i32"  # vpdpbusd ymm (AVX-VNNI / AVX512-VNNI+VL), any W
VNNI256_ISA = "x86_vnni_u8"   # the tuning isa of the x86_vnni family's u8-route GEMMs (o8k4)
MAX_O_VECTORS = {16: 4, 8: 8}    # vectors per register tile (max_innermost_factor of the o split)


# --- target -> isa --------------------------------------------------------------------------------
def x86_isa(target) -> str | None:
    """The design space of this module a target's GEMMs get: 'avx512_vnni' (AVX-512F/BW +
    AVX512-VNNI), 'avx512' (AVX-512F/BW, no VNNI), 'avx2', or None (not an x86 llvm target, or no
    AVX2). These are design-space names (which block kernel and tensor intrinsic), not kernel
    family names: the answer comes from the families' one feature object, `kernels.isa.features`
    (TargetFeatures), e.g. 'avx512' names a space although no family is called so. `target`: a
    tvm.target.Target, a dict or a target string (classic 'llvm -mcpu=cascadelake' accepted).
    cascadelake, icelake-server, sapphirerapids, znver4 -> avx512_vnni; skylake-avx512 -> avx512;
    znver3, haswell, alderlake (AVX-VNNI is 256-bit only) -> avx2."""
    from ..kernels import isa as _isa  # pylint: disable=import-outside-toplevel

    f = _isa.features(target)
    if f is None or not f.is_x86 or not f.has_avx2:
        return None
    if f.has_avx512:
        return "avx512_vnni" if f.has_vnni else "avx512"
    return "avx2"


# --- weights --------------------------------------------------------------------------------------
def padded_wide(K: int, O: int, lanes: int = LANES) -> tuple[int, int]:
    return (K + KQUAD - 1) // KQUAD * KQUAD, (O + lanes - 1) // lanes * lanes


def pack_weights_vnni(W: np.ndarray, lanes: int = LANES) -> np.ndarray:
    """int8 W [O, K] -> int8 [OP/16, KP/4, 16, 4], P[a, b, i, j] = W[16a + i, 4b + j], zeros in
    the padding: the 16 x 4 weights of one step are 64 contiguous bytes, lane i's 4 k adjacent (the
    [16, 4] B operand of dot_16x4_vnni). lanes=8 gives the [OP/8, KP/4, 8, 4] test layout."""
    W = np.asarray(W)
    if W.dtype != np.int8 or W.ndim != 2:
        raise TypeError(f"pack_weights_vnni takes an int8 [O, K] array, got {W.dtype} {W.shape}")
    if lanes not in LAYOUTS:
        raise ValueError(f"lanes must be one of {tuple(LAYOUTS)}, got {lanes}")
    O, K = W.shape
    KP, OP = padded_wide(K, O, lanes)
    Wp = np.zeros((OP, KP), np.int8)
    Wp[:O, :K] = W
    return np.ascontiguousarray(
        Wp.reshape(OP // lanes, lanes, KP // KQUAD, KQUAD).transpose(0, 2, 1, 3))


def corrected_bias(W: np.ndarray, bias=None) -> np.ndarray:
    """bias' = bias - 128 * rowsum(W) (int32; bias None = zeros). Raises OverflowError when bias'
    leaves int32 (impossible within the spec's bounds, see the module doc)."""
    W = np.asarray(W)
    if W.dtype != np.int8 or W.ndim != 2:
        raise TypeError(f"corrected_bias takes an int8 [O, K] weight, got {W.dtype} {W.shape}")
    b = np.zeros(W.shape[0], np.int64) if bias is None else np.asarray(bias)
    if b.dtype.kind not in "iu" or b.shape != (W.shape[0],):
        raise TypeError(f"bias must be an integer array of shape ({W.shape[0]},), got "
                        f"{b.dtype} {b.shape}")
    bc = b.astype(np.int64) - U8_SHIFT * W.astype(np.int64).sum(axis=1)
    if bc.size and (bc.min() < -(2**31) or bc.max() > 2**31 - 1):
        raise OverflowError("bias - 128 * rowsum(W) does not fit int32 (outside spec 5's bounds)")
    return bc.astype(np.int32)


def prepare_weights_wide(isa: str, W: np.ndarray, bias=None, lanes: int | None = None):
    """(packed W, bias') for the u8 kernels of `gemm_blocks_wide` (any isa in WIDE_ISAS; lanes
    default 16)."""
    if isa not in WIDE_ISAS and lanes is None:
        raise ValueError(f"not a wide x86 isa: {isa!r} (one of {WIDE_ISAS})")
    return pack_weights_vnni(W, lanes or LANES), corrected_bias(W, bias)


# --- the block-form kernel ------------------------------------------------------------------------
def gemm_blocks_wide(in_features: int, out_features: int, out_dtype: str = "int8",
                     n_rows: int | None = None, name: str | None = None,
                     lanes: int = LANES, scale: tuple | None = None) -> tirx.PrimFunc:
    """Block-form u8 linear kernel (see the module doc): (x, Wp, b', M, s, y) for int8/int16
    outputs, (x, Wp, b', y) for int32; Wp, b' = prepare_weights_wide(isa, W, b). n_rows: static
    row count (tuning), None: symbolic N (the compiler's kernel). lanes: 16 (AVX-512) or 8 (AVX2:
    the exact check of the same arithmetic, or with isa W7_ISA the 7-bit vpmaddubsw kernel).
    scale: a baked per-tensor multiplier and/or shift, as for gemm.gemm_blocks."""
    K, O = check_linear(in_features, out_features, out_dtype)
    if lanes not in LAYOUTS:
        raise ValueError(f"lanes must be one of {tuple(LAYOUTS)}, got {lanes}")
    KP, OP = padded_wide(K, O, lanes)

    def wread(W, _W16, o, k):
        return tirx.Cast("int32", W[o // lanes, k // KQUAD, o % lanes, k % KQUAD])

    func = gemm_block_kernel(
        K, O, KP, OP, out_dtype, n_rows, (OP // lanes, KP // KQUAD, lanes, KQUAD),
        ("xu8", "uint8", lambda x: T.Cast("uint8", T.Cast("int32", x) + 128), T.uint8(128)),
        wread, scale=scale)
    default_name = "linear_requant" if out_dtype != "int32" else "linear_i32"
    func = func.with_attr("global_symbol", name or default_name)
    return func.with_attr("intlstm.weight_layout", LAYOUTS[lanes])


def weight_lanes(func) -> int | None:
    """16 or 8 for a gemm_blocks_wide PrimFunc (from its weight layout attribute), else None."""
    attrs = func.attrs
    if attrs is None or "intlstm.weight_layout" not in attrs:
        return None
    return LAYOUT_LANES.get(str(attrs["intlstm.weight_layout"]))


# --- the tensor intrinsics ------------------------------------------------------------------------
def _u8s8_pmaddwd_impl(lanes):
    """u8 x s8 (lanes x 4) -> int32 lanes, exact, with two vpmaddwd (see the module doc)."""
    pmaddwd = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd"}[lanes]
    i8v, i16v, i32v = f"int8x{4 * lanes}", f"int16x{2 * lanes}", f"int32x{lanes}"
    w2 = 2 * lanes

    @T.macro
    def step(A, B, C):
        # a = u0 | u1 << 8 | u2 << 16 | u3 << 24
        a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a02 = T.bitwise_and(a, T.int32(0x00FF00FF))                  # int16 pair (u0, u2)
        a13 = T.bitwise_and(T.shift_right(a, T.int32(8)), T.int32(0x00FF00FF))   # (u1, u3)
        e = T.reinterpret(B.vload([0, 0], dtype=i8v), dtype=i16v)    # [2i] = w_i0 | w_i1 << 8
        w_even = T.shift_right(T.shift_left(e, T.Broadcast(T.int16(8), w2)),
                               T.Broadcast(T.int16(8), w2))          # (w_i0, w_i2), int16
        w_odd = T.shift_right(e, T.Broadcast(T.int16(8), w2))        # (w_i1, w_i3), int16
        C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=i32v) + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(pmaddwd),
            T.reinterpret(T.Broadcast(a02, lanes), dtype=i16v), w_even, dtype=i32v) + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(pmaddwd),
                T.reinterpret(T.Broadcast(a13, lanes), dtype=i16v), w_odd, dtype=i32v)

    return dot_intrin(lanes, KQUAD, "uint8", "int8", step)


def _u8s7_pmaddubsw_impl():
    """u8 x s8 (8 x 4) -> int32x8 with vpmaddubsw + vpmaddwd by ones: the AVX2 kernels' u8 route
    (kernels/_gemm.py) as a tensor intrinsic. vpmaddubsw saturates its int16 pair sums, so this is
    exact only for weights in [-64, 64]: |pair| <= 2 * 255 * 64 = 32640 < 2^15. The description is
    the exact u8 x s8 dot of INTRIN_AVX2_U8S8; the weight bound is the caller's promise (tune gives
    this intrinsic only to GEMMs whose constant weights fit, `passes._lowering.u8_route`)."""
    @T.macro
    def step(A, B, C):
        a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
            T.reinterpret(T.Broadcast(a, 8), dtype="uint8x32"),
            B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs,
            T.Broadcast(T.int16(1), 16), dtype="int32x8")

    return dot_intrin(8, KQUAD, "uint8", "int8", step)


def _vnni_impl(lanes: int = 16):
    """vpdpbusd: C += per lane sum of 4 u8 x s8 products, int32, not saturating; lanes 16 (zmm,
    AVX512-VNNI) or 8 (ymm: the x86_vnni kernel family's step, kernels/isa/x86_vnni.py). The LLVM
    intrinsic's operand types changed in LLVM 22 (llvm-project PR 155194: <16 x i32> -> <64 x i8>
    for the two byte operands); TVM 0.27's own dot_16x4_vnni still passes <16 x i32> and fails
    LLVM's verifier with the wheel's LLVM 22 ("Call parameter type does not match function
    signature"), so this body picks the operand form from the LLVM it is built with."""
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel

    byte_operands = int(codegen.llvm_version_major()) >= 22
    nb = 4 * lanes
    a_dt, b_dt = ((f"uint8x{nb}", f"int8x{nb}") if byte_operands else
                  (f"int32x{lanes}", f"int32x{lanes}"))
    i32v = f"int32x{lanes}"
    name = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.macro
    def step(A, B, C):
        a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(name), C.vload([0], dtype=i32v),
            T.reinterpret(T.Broadcast(a, lanes), dtype=a_dt),
            T.reinterpret(B.vload([0, 0], dtype=f"int8x{nb}"), dtype=b_dt), dtype=i32v)

    return dot_intrin(lanes, KQUAD, "uint8", "int8", step)


def _u8s8_desc(lanes: int):
    return dot_desc(lanes, KQUAD, "uint8", "int8")


def register_wide_intrinsics() -> None:
    """Register INTRIN_VNNI, INTRIN_AVX512_U8S8, INTRIN_AVX2_U8S8 and INTRIN_AVX2_U8S7 (once per
    process; cheap).
    Needed before scheduling and before replaying a trace that tensorizes with them;
    gemm.register_intrinsics() calls it. TVM's own x86 intrinsics are not needed (nor imported);
    `import_tvm_x86_intrinsics()` registers them cheaply if wanted."""
    from tvm.s_tir import TensorIntrin  # pylint: disable=import-outside-toplevel

    if TensorIntrin.get(INTRIN_VNNI, allow_missing=True) is None:
        TensorIntrin.register(INTRIN_VNNI, _u8s8_desc(16), _vnni_impl(16))
    for name, lanes in ((INTRIN_AVX512_U8S8, 16), (INTRIN_AVX2_U8S8, 8)):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, _u8s8_desc(lanes), _u8s8_pmaddwd_impl(lanes))
    if TensorIntrin.get(INTRIN_AVX2_U8S7, allow_missing=True) is None:
        TensorIntrin.register(INTRIN_AVX2_U8S7, _u8s8_desc(8), _u8s7_pmaddubsw_impl())
    if TensorIntrin.get(INTRIN_VNNI256, allow_missing=True) is None:
        TensorIntrin.register(INTRIN_VNNI256, _u8s8_desc(8), _vnni_impl(8))


def import_tvm_x86_intrinsics():
    """Register TVM's x86 tensor intrinsics (dot_16x4_vnni, dot_16x4_avx512) without importing
    every backend's (`import tvm.s_tir.tensor_intrin` alone took minutes here): the module
    tvm.s_tir.tensor_intrin.x86, imported under _ms.fast_tensor_intrin(). Returns the module."""
    from ._stub import fast_tensor_intrin  # pylint: disable=import-outside-toplevel

    with fast_tensor_intrin():
        import tvm.s_tir.tensor_intrin.x86 as x86  # pylint: disable=import-outside-toplevel
    return x86


def intrinsic_for(isa: str, lanes: int) -> str | None:
    """The TensorIntrin that tensorizes the lanes x 4 step for `isa`, or None (vectorize).
    W7_ISA ("avx2_w7", weights in [-64, 64]) gets the vpmaddubsw step, the AVX2 kernels' u8 route;
    VNNI256_ISA ("x86_vnni_u8") the vpdpbusd ymm step, the x86_vnni kernels' u8 route."""
    if lanes == 8 and isa == W7_ISA:
        return INTRIN_AVX2_U8S7
    if lanes == 8 and isa == VNNI256_ISA:
        return INTRIN_VNNI256
    if lanes == 16 and isa == "avx512_vnni":
        return INTRIN_VNNI
    if lanes == 16 and isa == "avx512":
        return INTRIN_AVX512_U8S8
    if lanes == 8 and isa in ("avx2",) + WIDE_ISAS:
        return INTRIN_AVX2_U8S8
    return None


# --- the design space -----------------------------------------------------------------------------
def schedule_gemm_wide(sch: s_tir.Schedule, isa: str = "avx512_vnni", O: int | None = None,
                       decisions: dict | None = None) -> None:
    """Apply the design space to a Schedule of `gemm_blocks_wide(...)`, sampling every decision
    (decisions: fix some, as in gemm.schedule_gemm: {"nt", "o_tile", "k_tile", "unroll"}).
    isa: tensorize per `intrinsic_for(isa, lanes)`; other isas vectorize the lanes."""
    dec = decisions or {}
    lanes = weight_lanes(sch.mod["main"])
    if lanes is None:
        raise ValueError("schedule_gemm_wide takes a gemm_blocks_wide kernel (layout o16k4/o8k4)")
    intrin = intrinsic_for(isa, lanes)
    if intrin is not None:
        register_wide_intrinsics()
    gemm = sch.get_sblock("gemm")
    epi = sch.get_sblock("epilogue")
    n0, n1, o0, o1, ol, k0, k1, k4 = sample_tiles(sch, gemm, dec, lanes, MAX_O_VECTORS[lanes], KQUAD)
    if intrin is not None:
        sch.reorder(o0, n0, k0, k1, n1, o1, ol, k4)
    else:
        sch.reorder(o0, n0, k0, k1, n1, o1, k4, ol)
    sch.reverse_compute_at(epi, n0, preserve_unit_loops=True)
    if intrin is None:
        # before decompose_reduction: vectorize refuses an update block without its init
        sch.vectorize(ol)
        sch.unroll(k4)
    init = sch.decompose_reduction(gemm, k0)
    if intrin is not None:
        sch.tensorize(ol, intrin)
    else:
        sch.vectorize(sch.get_loops(init)[-1])
    vec = None if O is None else lanes if O % lanes == 0 else (8 if O % 8 == 0 else None)
    finish_tiles(sch, epi, n0, n1, o1, vec, dec)


def design_spaces_wide(sch: s_tir.Schedule, isa: str = "avx512_vnni", O: int | None = None) -> list:
    """The MetaSchedule space of a gemm_blocks_wide kernel: one design (weights are pre-packed)."""
    schedule_gemm_wide(sch, isa, O)
    return [sch]
