"""The int8 x int8 -> int32 product shared by the linear kernels and the recurrent LSTM step.

`gemm_macro(K, O, isa)` returns a TVMScript macro that computes, for rows n of an activation
source XS [rows, K'] and every row o of an int8 weight W [O, K] (natural row-major layout, no
packing):

    acc[n, o] = sum_k int32(W[o, k]) * int32(XS[n, k])          (exact int32, spec 5)

and hands each accumulator to `store(n, o, acc)`, a Python callable returning the BufferStore of
the epilogue (bias, requantization, gate add, ...). The store is called inside an 8-lane
vectorized loop over o for full tiles, and as a scalar for the O % 8 remaining rows.

The source XS is, by the kernel family's dot-form micro-kernel (`x16_source(isa)`, kernels/isa/):
- "vpmaddwd" (x86 families): an int16 scratch [rows, padded_k(K)] holding the int8 activations
  sign-extended (and zero padded): per 16 k one vpmovsxbw of each weight row + vpmaddwd + vpaddd.
- "sdot" (neon_dotprod): the int8 activations themselves: per 16 k one sdot per weight row.
- "generic": the int8 activations; int32 lanes of 8 that LLVM vectorizes for any target.

The u8 x s8 route (packed weights only, see `gemm_outer_macro`; the family decides for which
weights it is exact, `KernelFamily.u8_exact`: AVX2's vpmaddubsw for weights in [-64, 64],
vpdpbusd for every int8 weight): a uint8 source u = x + 128. The accumulator is then
sum_k W[o, k] u[n, k] = acc + 128 rowsum(W[o]); the caller's `store` adds the correction
-128 rowsum(W[o]) (`u8_correction`), folded into the bias where there is one.

k remainder (K not a multiple of the chunk: 16 for vpmaddwd / sdot, 8 for the generic form and
the O % 8 tail rows): one more vector chunk over the in-bounds window [K - chunk, K) of W and of
XS, with the XS lanes below the last full chunk replaced by zeros (a constant shuffle), so those
products are 0 and the sums stay exact. No layout change or padding of W is needed; only K < chunk
keeps a short scalar loop.

Schedule: rows in blocks of NB (a block of XS stays in L1 while W streams through it), W in tiles
of 8 rows, per (row, tile) 8 vector accumulators reduced to one vector of 8 outputs (vphaddd tree
on AVX2, addp tree on NEON, scalar adds in the generic form).
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from . import _x86
from . import isa as _isa
from ._common import vec_split

ROW_TILE = 8      # outputs per micro-tile (rows of W)
KC = 16           # k per vector chunk (and the X16 padding unit)
KC8 = 32          # vector width of the u8 source fill
NB = 16           # rows of XS per cache block
W7_MAX = _isa.avx2.W7_MAX   # |W| bound under which AVX2's u8 x s8 kernel is exact


def u8_correction(W) -> np.ndarray:
    """int32 [O]: -128 * rowsum(W), the term that turns the u8-source accumulator into acc."""
    return (-128 * np.asarray(W, dtype=np.int64).sum(axis=1)).astype(np.int32)


def u8_bias_fits(W, bias=None) -> bool:
    """Does the u8 route's folded bias, bias + u8_correction(W) (bias numpy, None = zeros), stay in
    int32?"""
    folded = u8_correction(W).astype(np.int64)
    if bias is not None:
        folded = folded + np.asarray(bias, dtype=np.int64)
    return bool(folded.size == 0 or (folded.max() <= 2**31 - 1 and folded.min() >= -(2**31)))


def weights_fit_u8(W, isa: str = "avx2") -> bool:
    """Is the u8 x s8 micro-kernel of family `isa` exact for the int8 weights W (AVX2: all within
    [-W7_MAX, W7_MAX]; x86_vnni: any)?"""
    return _isa.family(isa).u8_exact(W)


def uses_u8(isa: str, w7: bool, packed: bool = True) -> bool:
    """Does the kernel take the u8 route (and so need the u8_correction)? Packed kernels of a family
    with a u8 route (avx2, x86_vnni) do when generated with w7=True (the caller checked
    `weights_fit_u8(W, isa)`); elsewhere w7 changes nothing."""
    return _isa.family(isa).u8_route(w7, packed)


def padded_k(K: int) -> int:
    return (K + KC - 1) // KC * KC


def x16_source(isa: str, u8: bool = False) -> bool:
    """Does the family's micro-kernel read an int16 (sign-extended, padded) copy of the activations?"""
    return _isa.family(isa).dot == "vpmaddwd" and not u8


def u8_source_macro(K: int, KP: int | None = None):
    """TVMScript macro filling the u8 source: XU[n, k] = uint8(X[n, k] + 128) for n < N, k < K,
    and 0 for K <= k < KP (the padding of packed weights)."""
    KO, KV = vec_split(K, KC8)
    KP = K if KP is None else int(KP)

    @T.macro
    def to_u8(X, XU, N):
        for n, ko in T.grid(N, KO):
            for kv in T.vectorized(KV):
                XU[n, ko * KV + kv] = T.Cast("uint8", T.Cast("int32", X[n, ko * KV + kv]) + 128)
        for n, kp in T.grid(N, KP - K):
            XU[n, K + kp] = T.uint8(0)

    return to_u8


def _sdot(acc, a, b):
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, a, b)


def _addp(a, b):
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.addp.v4i32", a, b)


def gemm_macro(K: int, O: int, isa: str):
    OT, OR = divmod(O, ROW_TILE)
    dot = _isa.family(isa).dot
    use_avx2 = dot == "vpmaddwd"
    use_sdot = dot == "sdot"
    kstep = KC if (use_avx2 or use_sdot) else 8
    KV = K // kstep                   # full vector chunks
    KT0 = KV * kstep                  # start of the k remainder
    # The k remainder [KT0, K) costs one more vector chunk: the window [K - kstep, K) of W and
    # of the activations (in bounds, since K >= kstep), with the activation lanes below KT0
    # (already summed) replaced by zeros, so their products are 0 and the int32 sums stay
    # exact. Only when K < kstep is the remainder a (short) scalar loop.
    vtail = KT0 < K and K >= kstep
    KT1 = K if vtail else KT0         # start of the scalar k remainder
    KG = K // 8                       # generic chunks (tail rows)
    KG0 = KG * 8
    gtail = KG0 < K and K >= 8
    KG1 = K if gtail else KG0

    def xwin(XS, n, width):
        """XS[n, K - width : K] with the lanes k < K // width * width zeroed."""
        dz = (K // width + 1) * width - K      # leading lanes already covered by full chunks
        v = XS[n, tirx.Ramp(K - width, 1, width)]
        zeros = tirx.Broadcast(tirx.const(0, XS.dtype), width)
        return tirx.Shuffle([v, zeros], [width + j if j < dz else j for j in range(width)])

    def wwin(W, o, width):
        return W[o, tirx.Ramp(K - width, 1, width)]

    def pmadd_row(W, XS, n, o, kc):
        w16 = tirx.Cast("int16x16", W[o, tirx.Ramp(kc * KC, 1, KC)])
        return _x86.pmaddwd(w16, XS[n, tirx.Ramp(kc * KC, 1, KC)])

    def hsum_avx2(ACC):
        return _x86.hsum8([ACC[r, tirx.Ramp(0, 1, 8)] for r in range(ROW_TILE)])

    def sdot_row(ACC, W, XS, n, o, r, kc):
        return _sdot(ACC[r, tirx.Ramp(0, 1, 4)], W[o, tirx.Ramp(kc * KC, 1, KC)],
                     XS[n, tirx.Ramp(kc * KC, 1, KC)])

    def hsum_neon(ACC, half):
        a = [ACC[4 * half + i, tirx.Ramp(0, 1, 4)] for i in range(4)]
        return _addp(_addp(a[0], a[1]), _addp(a[2], a[3]))

    @T.macro
    def gemm(XS, n0, nrows, W, ACC, RED, store):
        for nb in range((nrows + NB - 1) // NB):
            for ot in range(OT):
                for ni in range(T.min(T.int64(NB), nrows - nb * NB)):
                    if use_avx2:
                        for r in T.unroll(ROW_TILE):
                            ACC[r, T.Ramp(0, 1, 8)] = T.Broadcast(T.int32(0), 8)
                        for kc in range(KV):
                            for r in T.unroll(ROW_TILE):
                                ACC[r, T.Ramp(0, 1, 8)] = ACC[r, T.Ramp(0, 1, 8)] + pmadd_row(
                                    W, XS, n0 + nb * NB + ni, ot * ROW_TILE + r, kc)
                        if vtail:
                            for r in T.unroll(ROW_TILE):
                                ACC[r, T.Ramp(0, 1, 8)] = ACC[r, T.Ramp(0, 1, 8)] + _x86.pmaddwd(
                                    tirx.Cast("int16x16", wwin(W, ot * ROW_TILE + r, KC)),
                                    xwin(XS, n0 + nb * NB + ni, KC))
                        RED[T.Ramp(0, 1, 8)] = hsum_avx2(ACC)
                    elif use_sdot:
                        for r in T.unroll(ROW_TILE):
                            ACC[r, T.Ramp(0, 1, 4)] = T.Broadcast(T.int32(0), 4)
                        for kc in range(KV):
                            for r in T.unroll(ROW_TILE):
                                ACC[r, T.Ramp(0, 1, 4)] = sdot_row(
                                    ACC, W, XS, n0 + nb * NB + ni, ot * ROW_TILE + r, r, kc)
                        if vtail:
                            for r in T.unroll(ROW_TILE):
                                ACC[r, T.Ramp(0, 1, 4)] = _sdot(
                                    ACC[r, T.Ramp(0, 1, 4)], wwin(W, ot * ROW_TILE + r, KC),
                                    xwin(XS, n0 + nb * NB + ni, KC))
                        RED[T.Ramp(0, 1, 4)] = hsum_neon(ACC, 0)
                        RED[T.Ramp(4, 1, 4)] = hsum_neon(ACC, 1)
                    else:
                        for r in T.unroll(ROW_TILE):
                            for l in T.vectorized(8):
                                ACC[r, l] = 0
                        for kc in range(KV):
                            for r in T.unroll(ROW_TILE):
                                for l in T.vectorized(8):
                                    ACC[r, l] = ACC[r, l] + T.Cast(
                                        "int32", W[ot * ROW_TILE + r, kc * 8 + l]) * T.Cast(
                                        "int32", XS[n0 + nb * NB + ni, kc * 8 + l])
                        if vtail:
                            for r in T.unroll(ROW_TILE):
                                ACC[r, T.Ramp(0, 1, 8)] = ACC[r, T.Ramp(0, 1, 8)] + tirx.Cast(
                                    "int32x8", wwin(W, ot * ROW_TILE + r, 8)) * tirx.Cast(
                                    "int32x8", xwin(XS, n0 + nb * NB + ni, 8))
                        for r in T.unroll(ROW_TILE):
                            RED[r] = (ACC[r, 0] + ACC[r, 1] + ACC[r, 2] + ACC[r, 3]
                                      + ACC[r, 4] + ACC[r, 5] + ACC[r, 6] + ACC[r, 7])
                    for r in T.unroll(ROW_TILE):
                        for kr in range(KT1, K):
                            RED[r] = RED[r] + T.Cast("int32", W[ot * ROW_TILE + r, kr]) * T.Cast(
                                "int32", XS[n0 + nb * NB + ni, kr])
                    for l in T.vectorized(ROW_TILE):
                        store(nb * NB + ni, ot * ROW_TILE + l, RED[l])
            for orr in range(OR):
                for ni in range(T.min(T.int64(NB), nrows - nb * NB)):
                    for l in T.vectorized(8):
                        ACC[0, l] = 0
                    for kc in range(KG):
                        for l in T.vectorized(8):
                            ACC[0, l] = ACC[0, l] + T.Cast(
                                "int32", W[OT * ROW_TILE + orr, kc * 8 + l]) * T.Cast(
                                "int32", XS[n0 + nb * NB + ni, kc * 8 + l])
                    if gtail:
                        ACC[0, T.Ramp(0, 1, 8)] = ACC[0, T.Ramp(0, 1, 8)] + tirx.Cast(
                            "int32x8", wwin(W, OT * ROW_TILE + orr, 8)) * tirx.Cast(
                            "int32x8", xwin(XS, n0 + nb * NB + ni, 8))
                    RED[0] = (ACC[0, 0] + ACC[0, 1] + ACC[0, 2] + ACC[0, 3]
                              + ACC[0, 4] + ACC[0, 5] + ACC[0, 6] + ACC[0, 7])
                    for kr in range(KG1, K):
                        RED[0] = RED[0] + T.Cast("int32", W[OT * ROW_TILE + orr, kr]) * T.Cast(
                            "int32", XS[n0 + nb * NB + ni, kr])
                    store(nb * NB + ni, OT * ROW_TILE + orr, RED[0])

    return gemm


# --- pre-packed weights (AVX2) ---------------------------------------------------------------------
# For constant weights (every model the compiler sees) the AVX2 kernels take W pre-packed at compile
# time (`pack_outer`), so one k step of a register tile is contiguous: W streams through the cache in
# order (the natural layout reads 8 rows one line at a time), the zero padding removes every k and row
# tail, and a software prefetch PF_BYTES ahead keeps the stream ahead of the multiply-adds when W does
# not fit in L2 (the 2048 x 512 recurrent W_h of a 512-unit LSTM is 1 MiB, read once per step).
PF_BYTES = 1024


# --- outer-product form: no horizontal sums ----------------------------------------------------------
# The dot form above ends every (row, 8-channel tile) with a horizontal reduction of 8 vectors
# (vphaddd tree): at K = 256 that is ~1/4 of the work. The outer-product form instead keeps 8 output
# channels per int32x8 accumulator: per step of KQ k values (4 on the u8 route, 2 on the vpmaddwd
# route) it broadcasts x[n, k:k+KQ] to every 32-bit lane and multiplies it by the weights of 8
# channels x KQ k packed side by side, so each lane accumulates its own channel and the epilogue reads
# the accumulators directly. Weights are packed [ceil(O / (8 OV)), K / KQ, 8 OV, KQ] (OV = channel
# vectors per register tile; one k step of a tile is 8 OV KQ contiguous bytes), zero padded.
# Register tile: NR rows x OV vectors (NR * OV = 8 accumulators). Row tails reload the last valid row
# (branch-free) and only the stores are guarded.
def outer_kq(u8: bool) -> int:
    return 4 if u8 else 2


def outer_shape(K: int, O: int, u8: bool, OV: int) -> tuple[int, int, int, int]:
    kq = outer_kq(u8)
    return ((O + 8 * OV - 1) // (8 * OV), (K + kq - 1) // kq, 8 * OV, kq)


def pack_outer(W, u8: bool, OV: int) -> np.ndarray:
    """int8 [O, K] -> int8 outer_shape(K, O, u8, OV) (zero padded), see above."""
    W = np.asarray(W, dtype=np.int8)
    O, K = W.shape
    OG, KQN, OC, kq = outer_shape(K, O, u8, OV)
    Wp = np.zeros((OG * OC, KQN * kq), np.int8)
    Wp[:O, :K] = W
    return np.ascontiguousarray(Wp.reshape(OG, OC, KQN, kq).transpose(0, 2, 1, 3))


def gemm_outer_macro(K: int, O: int, isa: str, u8: bool, NR: int, OV: int, OVT: int | None = None,
                     parallel: bool = False, prefetch_w: bool = True, span: int = 1,
                     ksplit: int = 1):
    """Same contract as `gemm_macro` (ACC must be at least [NR * OVT, 8] int32; RED is unused) for W
    packed by `pack_outer(W, u8, OV)` and a source XS zero padded to outer_shape(...)[1] * KQ columns
    (u8: uint8 u = x + 128; else int16). Families with `outer` (x86); the step of a k quad / pair is
    the family's `outer_step` (AVX2: vpmaddwd / vpmaddubsw; x86_vnni: vpdpbusd). The register tile is NR rows x OVT (a divisor
    of OV, default OV) vectors of 8 channels: a channel group of the layout is then done in OV / OVT
    passes, each on whole cache lines of its k steps when OVT * 8 * KQ is a multiple of 64.

    parallel=True: the channel groups are a `T.parallel` loop (contiguous ranges per worker of the
    thread pool, each worker with its own accumulator tile; ACC is then unused).

    prefetch_w=False: no software prefetch of the weight stream (the hardware prefetcher follows
    it; the prefetch instructions then only take issue slots: the recurrent batch > 1 step, whose
    row tiles re-read each channel group from L1, runs 3-8 % faster without them, and so does the
    zmm families' batch-1 GEMV once its k steps are split (ksplit=2); the AVX2 batch-1 GEMV and the
    input projections are as fast or faster with them).

    Optional hooks of the macro call: `pf_out(n, o)` (an address to prefetch for row n, channel o,
    once per row tile and `pf_step` channels), and `group_done(og, nrows, group_args)` (a macro
    expanded after every row of channel group og has been stored).

    span=2 (with parallel; OG even): the parallel loop runs over pairs of channel groups and
    group_done(pair, nrows, group_args) follows each pair (the 16-lane cells of the threaded
    recurrent form).

    ksplit=2: two accumulator sets, even k steps into one and odd into the other, added before the
    epilogue (ACC then at least [2 NR OVT, 8]). A one-row tile has only OVT / VM accumulators, each a
    chain of dependent multiply-adds: on a Zen 5 core the chains, not the weight stream, set the
    pace of the batch-1 GEMV (a 1 MiB W_h: 7.5 -> 6.5 us per sweep with the k steps split in two),
    and a 4-row tile's 8 were still too few for the AVX-512 recurrent step at batch 8. Where the two
    sets would take ACC to 1 KiB (which TVM allocates on the heap, out of LLVM's registers), the
    second set is RED's first NR OVT vectors instead (the caller sizes RED; the parallel forms
    allocate a second per-worker buffer)."""
    fam = _isa.family(isa)
    if not fam.outer:
        raise ValueError(f"the outer-product GEMM is an x86 kernel; family {isa!r} has none")
    if span not in (1, 2) or (span == 2 and not parallel):
        raise ValueError(f"span must be 1, or 2 with parallel=True; got {span}")
    if ksplit not in (1, 2):
        raise ValueError(f"ksplit must be 1 or 2, got {ksplit}")
    OVT = OV if OVT is None else int(OVT)
    if OV % OVT:
        raise ValueError(f"OVT={OVT} must divide OV={OV}")
    use_u8 = uses_u8(isa, u8)
    kq = outer_kq(use_u8)
    OG, KQN, OC, _ = outer_shape(K, O, use_u8, OV)
    if span == 2 and OG % 2:
        raise ValueError(f"span=2 needs an even number of channel groups, got {OG}")
    lanes_x = 32 if use_u8 else 16      # x lanes of one ymm (u8 / int16)
    xdt = "uint8" if use_u8 else "int16"
    line_steps = max(1, 64 // (OC * kq))   # k steps per 64-byte line of a tile
    lines = max(1, OC * kq // 64)          # lines per k step
    ahead = max(1, PF_BYTES // (OC * kq))

    # vectors of 8 channels per step instruction: 2 for a family with 16-lane (zmm) steps on the u8
    # route (one vpdpbusd zmm covers two adjacent 8-channel vectors of the layout, 64 contiguous
    # weight bytes per k quad), when the register tile holds an even number of them
    VM = fam.vec_lanes // 8 if use_u8 and OVT % (fam.vec_lanes // 8) == 0 else 1
    NA = NR * OVT       # 8-channel accumulators of one set
    # TVM places a stack buffer of 1 KiB or more on the heap (TVMBackendAllocWorkspace), where LLVM
    # can no longer keep it in registers (each multiply-add then stores its accumulator): a
    # second set that would take ACC to 1 KiB lives in RED instead (the caller sizes it; in the
    # parallel forms a second per-worker buffer)
    split_red = ksplit == 2 and NA * 2 * 8 * 4 >= 1024

    def xbcast(XS, n, k):
        word = tirx.reinterpret("int32", XS[n, tirx.Ramp(k * kq, 1, kq)])
        return tirx.reinterpret(f"{xdt}x{lanes_x * VM}", tirx.Broadcast(word, 8 * VM))


    def prefetch_line(addr):
        i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
        return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", addr, i32(0), i32(3), i32(1))

    def walk(flip, og0, count=OG):
        """Position og0 of a walk over `count` channel groups (or, span=2, pairs of them):
        backwards when flip (a PrimExpr or a bool) holds."""
        if isinstance(flip, bool):
            return count - 1 - og0 if flip else og0
        return tirx.if_then_else(flip, count - 1 - og0, og0)

    @T.macro
    def kstep(XS, n0, nrows, WF, ACCF, og, oh, nb, k, s):
        """One k step of a register tile into accumulator set s."""
        if prefetch_w and k % line_steps == 0 and oh == 0:
            for line in T.unroll(lines):
                T.evaluate(prefetch_line(tirx.address_of(
                    WF[((og * KQN + k + ahead) * OC + line * 64 // kq) * kq])))
        for r in T.unroll(NR):
            for ov in T.unroll(OVT // VM):
                ACCF[T.Ramp((s * NA + r * OVT + ov * VM) * 8, 1, 8 * VM)] = fam.outer_step(
                    ACCF[T.Ramp((s * NA + r * OVT + ov * VM) * 8, 1, 8 * VM)],
                    xbcast(XS, n0 + T.min(nb * NR + r, nrows - 1), k),
                    WF[T.Ramp(((og * KQN + k) * OC + (oh * OVT + ov * VM) * 8) * kq, 1, 8 * VM * kq)],
                    use_u8)

    @T.macro
    def group(XS, n0, nrows, WF, ACC, RED, store, og, pf_out, group_done, group_args, pf_step):
        """Every row tile of channel group og (the body of the group loop)."""
        for oh, nb in T.grid(OV // OVT, (nrows + NR - 1) // NR):
            for a in T.unroll(NA if split_red else NA * ksplit):
                ACC[a, T.Ramp(0, 1, 8)] = T.Broadcast(T.int32(0), 8)
            if split_red:
                for a in T.unroll(NA):
                    RED[T.Ramp(a * 8, 1, 8)] = T.Broadcast(T.int32(0), 8)
            if pf_out is not None and oh == 0:
                # pf_out(n, o): the address of an int16 input that the store of (n, o) reads
                # (the recurrent kernel's gx[t], written long before this step and no longer
                # in L1/L2: its loads missed in the epilogue), fetched while the k loop runs
                for r in T.unroll(NR):
                    for c in T.unroll((OC + pf_step - 1) // pf_step):
                        T.evaluate(prefetch_line(pf_out(T.min(nb * NR + r, nrows - 1),
                                                        T.min(og * OC + c * pf_step, O - 1))))
            ACCF = T.decl_buffer((NA * ksplit * 8,), "int32", data=ACC.data)   # VM vectors at once
            if split_red:
                for k2 in range(KQN // 2):
                    kstep(XS, n0, nrows, WF, ACCF, og, oh, nb, k2 * 2, 0)
                    kstep(XS, n0, nrows, WF, RED, og, oh, nb, k2 * 2 + 1, 0)
            else:
                for k2 in range(KQN // ksplit):
                    for s in T.unroll(ksplit):      # k step k2 * ksplit + s into accumulator set s
                        kstep(XS, n0, nrows, WF, ACCF, og, oh, nb, k2 * ksplit + s, s)
            if KQN % ksplit != 0:
                kstep(XS, n0, nrows, WF, ACCF, og, oh, nb, KQN - 1, 0)
            if split_red:
                for a in T.unroll(NA):
                    ACCF[T.Ramp(a * 8, 1, 8)] = ACCF[T.Ramp(a * 8, 1, 8)] + RED[T.Ramp(a * 8, 1, 8)]
            elif ksplit == 2:
                for a in T.unroll(NA):
                    ACCF[T.Ramp(a * 8, 1, 8)] = ACCF[T.Ramp(a * 8, 1, 8)] + ACCF[T.Ramp((NA + a) * 8, 1, 8)]
            for r in T.unroll(NR):
                if nb * NR + r < nrows:
                    # the epilogue on the step's vector width: VM adjacent 8-channel vectors at once
                    # where they are all in range (zmm: half the epilogue's instructions)
                    for ovm in T.unroll(OVT // VM):
                        if (og * OV + oh * OVT + ovm * VM + VM) * 8 <= O:
                            # (one vector expression: the requantize can then work on the lanes'
                            # halves, `_tir.requantize_hi`)
                            store(nb * NR + r, T.Ramp((og * OV + oh * OVT + ovm * VM) * 8, 1, 8 * VM),
                                  ACCF[T.Ramp((r * OVT + ovm * VM) * 8, 1, 8 * VM)])
                        else:
                            # (a channel tail: per 8-channel vector as before. A guarded scalar loop
                            # over all 16 channels instead wrote past the output on AVX-512: its
                            # guard was lost somewhere in the lowering)
                            for ov in T.unroll(VM):
                                if (og * OV + oh * OVT + ovm * VM + ov + 1) * 8 <= O:
                                    for l in T.vectorized(8):
                                        store(nb * NR + r, (og * OV + oh * OVT + ovm * VM + ov) * 8 + l,
                                              ACCF[(r * OVT + ovm * VM + ov) * 8 + l])
                                else:
                                    for l in range(8):
                                        if (og * OV + oh * OVT + ovm * VM + ov) * 8 + l < O:
                                            store(nb * NR + r, (og * OV + oh * OVT + ovm * VM + ov) * 8 + l,
                                                  ACCF[(r * OVT + ovm * VM + ov) * 8 + l])
        if group_done is not None:
            group_done(og, nrows, group_args)

    @T.macro
    def gemm(XS, n0, nrows, W, ACC, RED, store, flip=False, pf_out=None, group_done=None,
             group_args=None, pf_step=32):
        WF = T.decl_buffer((OG * KQN * OC * kq,), "int8", data=W.data)
        if parallel and span == 2:
            # pairs of channel groups per iteration, group_done(pair, ...) after both (16 units
            # for the cells of a 16-lane family)
            for og0 in T.parallel(OG // 2):
                og2 = T.Bind(walk(flip, og0, OG // 2))
                ACCP = T.alloc_buffer((NA * (1 if split_red else ksplit), 8), "int32")   # per worker
                ACCQ = T.alloc_buffer((NA * 8 if split_red else 8,), "int32")
                for s2 in range(2):
                    group(XS, n0, nrows, WF, ACCP, ACCQ, store, og2 * 2 + s2, pf_out, None, None, pf_step)
                if group_done is not None:
                    group_done(og2, nrows, group_args)
        elif parallel:
            for og0 in T.parallel(OG):
                # (a flip here reverses the whole range, so the caller passes one only when the pool
                # has a single worker: with several it would swap their ranges every step)
                og = T.Bind(walk(flip, og0))
                ACCP = T.alloc_buffer((NA * (1 if split_red else ksplit), 8), "int32")   # per worker
                ACCQ = T.alloc_buffer((NA * 8 if split_red else 8,), "int32")
                group(XS, n0, nrows, WF, ACCP, ACCQ, store, og, pf_out, group_done, group_args, pf_step)
        else:
            for og0 in range(OG):
                # flip (a PrimExpr) walks the channel groups backwards: the serial recurrent kernel
                # alternates direction every step, so a step starts on the groups the previous one
                # read last, which are still in L2 (W_h is larger than L2 and read once per step)
                og = T.Bind(walk(flip, og0))
                group(XS, n0, nrows, WF, ACC, RED, store, og, pf_out, group_done, group_args, pf_step)

    return gemm


# --- aarch64 i8mm: smmla (2x8 by 8x2 int8 matrix multiply-accumulate into a 2x2 int32 block) ------
# One smmla multiplies a pair of x rows (8 k each) by a pair of weight rows: 32 multiply-adds per
# instruction (sdot: 16), for GEMMs with at least two rows (input projections over T*B rows, batched
# linear layers). Weights are packed at compile time as channel pairs [ceil(O/2), KP/8, 2, 8]
# (`pack_mmla`, zero padded); x is interleaved per call the same way, row pairs into the memory of
# rows 2p, 2p+1 of an int8 scratch [N + 1, KP] (`mmla_source_macro`; the extra row pads an odd N).
MMLA_K = 8          # k per smmla operand row
MMLA_RP, MMLA_CP = 2, 4   # register tile: 2 row pairs x 4 channel pairs (4 rows x 8 channels)


def mmla_kp(K: int) -> int:
    return (K + MMLA_K - 1) // MMLA_K * MMLA_K


def pack_mmla(W) -> np.ndarray:
    """int8 [O, K] -> int8 [ceil(O/2), KP/8, 2, 8]: for channel pair q and k chunk c, the 8 k of
    channel 2q then the 8 k of channel 2q + 1 (zero padded in O and K)."""
    W = np.asarray(W, dtype=np.int8)
    O, K = W.shape
    OP, KP = (O + 1) // 2, mmla_kp(K)
    Wp = np.zeros((OP * 2, KP), np.int8)
    Wp[:O, :K] = W
    return np.ascontiguousarray(Wp.reshape(OP, 2, KP // MMLA_K, MMLA_K).transpose(0, 2, 1, 3))


def mmla_source_macro(K: int):
    """TVMScript macro interleaving int8 X [N, K] into XS [N + 1, KP] as row pairs: pair p, chunk c,
    row r, lane j at flat offset ((p * KC + c) * 2 + r) * 8 + j, zeros past K and past row N - 1."""
    KP = mmla_kp(K)
    KCN = KP // MMLA_K

    @T.macro
    def fill(X, XS, N):
        XF = T.decl_buffer(((N + 1) * KP,), "int8", data=XS.data)
        for p, c, r in T.grid((N + 1) // 2, KCN, 2):
            for j in T.vectorized(MMLA_K):
                XF[((p * KCN + c) * 2 + r) * MMLA_K + j] = T.if_then_else(
                    p * 2 + r < N and c * MMLA_K + j < K,
                    X[T.min(p * 2 + r, N - 1), T.min(c * MMLA_K + j, K - 1)], T.int8(0))

    return fill


def _smmla(acc, a, b):
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.smmla.v4i32.v16i8", acc, a, b)


def gemm_mmla_macro(K: int, O: int):
    """Same contract as `gemm_macro` (ACC at least [MMLA_RP * MMLA_CP, 4] int32, RED at least [8])
    for W packed by `pack_mmla` and XS filled by `mmla_source_macro`. aarch64 with i8mm only."""
    KP = mmla_kp(K)
    KCN = KP // MMLA_K
    OP = (O + 1) // 2
    RP, CP = MMLA_RP, MMLA_CP

    @T.macro
    def gemm(XS, n0, nrows, W, ACC, RED, store):
        NP = (nrows + 1) // 2
        XF = T.decl_buffer(((n0 + nrows + 1) * KP,), "int8", data=XS.data)
        WF = T.decl_buffer((OP * KCN * 2 * MMLA_K,), "int8", data=W.data)
        for cq, rq in T.grid((OP + CP - 1) // CP, (NP + RP - 1) // RP):
            for a in T.unroll(RP * CP):
                ACC[a, T.Ramp(0, 1, 4)] = T.Broadcast(T.int32(0), 4)
            for c in range(KCN):
                for rp in T.unroll(RP):
                    for cp in T.unroll(CP):
                        ACC[rp * CP + cp, T.Ramp(0, 1, 4)] = _smmla(
                            ACC[rp * CP + cp, T.Ramp(0, 1, 4)],
                            XF[T.Ramp(n0 * KP + ((T.min(rq * RP + rp, NP - 1) * KCN + c) * 2) * MMLA_K,
                                      1, 16)],
                            WF[T.Ramp((T.min(cq * CP + cp, OP - 1) * KCN + c) * 2 * MMLA_K, 1, 16)])
            # lanes of a 2x2 block: [r0 c0, r0 c1, r1 c0, r1 c1]
            for rp, r in T.grid(RP, 2):
                if (rq * RP + rp) * 2 + r < nrows:
                    for cp, cc in T.grid(CP, 2):
                        RED[cp * 2 + cc] = ACC[rp * CP + cp, r * 2 + cc]
                    if (cq * CP + CP) * 2 <= O:
                        for l in T.vectorized(CP * 2):
                            store((rq * RP + rp) * 2 + r, cq * CP * 2 + l, RED[l])
                    else:
                        for l in range(CP * 2):
                            if cq * CP * 2 + l < O:
                                store((rq * RP + rp) * 2 + r, cq * CP * 2 + l, RED[l])

    return gemm


# --- x86 AMX-INT8: tdpbssd on tile registers (kernels/isa/amx.py) ----------------------------------
# A tile holds up to 16 rows of 64 bytes. tdpbssd C += A B: A 16 rows x 64 int8 (k), B 16 rows (k
# quads) x 64 bytes (16 channels x 4 k: the pack_outer u8 layout), C 16 x 16 int32; each int32 adds
# four exact s8 x s8 products. Register block: 2 x 2 tiles (AMX_NR = 32 rows x AMX_OC = 32
# channels): C tiles 0-3, A tiles 4-5, B tiles 6-7. Weights are packed [ceil(O/32), KP/4, 32, 4]
# with K padded by zeros to KP, a multiple of 64 (`pack_amx`); a B tile is then 16 consecutive k
# quads of one half of a channel group (row stride 128 bytes). The activations are copied into an
# int8 source [round_up(N, 32), KP] zero padded in both dimensions (`amx_source_macro`), so every
# tile load is in bounds and the padding adds only zero products.
AMX_ROWS = 16      # rows of a tile
AMX_KB = 64        # k per tile step (bytes per tile row)
AMX_NR = 2 * AMX_ROWS   # rows per register block
AMX_OC = 32        # channels per register block (two B tiles of 16)
AMX_PACK = -2      # `intlstm.wpack` of the AMX kernels (see with_convention)


def amx_kp(K: int) -> int:
    return (int(K) + AMX_KB - 1) // AMX_KB * AMX_KB


def amx_shape(K: int, O: int) -> tuple[int, int, int, int]:
    return ((int(O) + AMX_OC - 1) // AMX_OC, amx_kp(K) // 4, AMX_OC, 4)


def pack_amx(W) -> np.ndarray:
    """int8 [O, K] -> int8 amx_shape(K, O): `pack_outer(W, u8=True, OV=4)` with K zero padded to a
    multiple of 64 (one B tile is 16 k quads)."""
    W = np.asarray(W, dtype=np.int8)
    O, K = W.shape
    Wk = np.zeros((O, amx_kp(K)), np.int8)
    Wk[:, :K] = W
    return pack_outer(Wk, True, AMX_OC // 8)


def amx_source_macro(K: int):
    """TVMScript macro copying int8 X [N, K] into XS [>= round_up(N, 32), KP]: XS[n, k] = X[n, k] for
    n < N, k < K, and 0 elsewhere up to row round_up(N, 32)."""
    KP = amx_kp(K)

    @T.macro
    def fill(X, XS, N):
        for n, kc in T.grid((N + AMX_NR - 1) // AMX_NR * AMX_NR, KP // AMX_KB):
            for j in T.vectorized(AMX_KB):
                XS[n, kc * AMX_KB + j] = T.if_then_else(
                    n < N and kc * AMX_KB + j < K,
                    X[T.min(n, N - 1), T.min(kc * AMX_KB + j, K - 1)], T.int8(0))

    return fill


def _amx(name, *args):
    return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _tmm(t: int):
    return tirx.const(t, "int8")     # the tile register number, an immediate of the intrinsic


def gemm_amx_macro(K: int, O: int, parallel: bool = False, emulate: bool = False,
                   w_offset: int = 0):
    """Same contract as `gemm_macro` for W packed by `pack_amx` and XS filled by `amx_source_macro`
    (int8 [>= n0 + round_up(nrows, 32), KP]); ACC must hold at least 4 * 16 * 16 int32 (the four C
    tiles are stored there for the epilogue); RED is unused. The serial form loads the tile
    configuration once per call (ldtilecfg is slow, and the recurrent kernel calls this every step)
    and releases the tiles at its end; the configuration is per thread, so in the parallel form
    (`T.parallel` over the channel groups, each worker with its own scratch) every channel group
    configures and releases its own.

    emulate=True: every tile instruction is replaced by plain TIR loops computing what the
    instruction set reference defines (tileloadd: 16 rows of 64 bytes at a stride; tdpbssd:
    C[m, n] += sum_k sum_j s8(A[m, 4k + j]) s8(B[k, 4n + j]); tilestored), in a scratch of 8 tiles:
    the same addresses, layouts and epilogue, runnable on any x86 CPU (slow). Tests check the tile
    kernels' data layout with it where no AMX CPU is at hand (the `amx_emulated` family).

    w_offset: the packed weights start that many bytes into W (the recurrent kernel's W_h holds
    its vpdpbusd layout first, `lstm.lstm_recurrent`)."""
    KP = amx_kp(K)
    KQN = KP // 4
    OG = (O + AMX_OC - 1) // AMX_OC
    KBN = KP // AMX_KB
    GROUP_BYTES = KQN * AMX_OC * 4          # packed weights of one channel group
    CTILE = AMX_ROWS * 16                   # int32 per C tile
    B_STRIDE = AMX_OC * 4                   # bytes per k quad of a channel group
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731

    def a_at(n, kb):
        """Flat source offset of A tile rows n .. n + 15, k block kb (row stride KP bytes)."""
        return n * KP + kb * AMX_KB

    def b_at(og, kb, half):
        """Flat weight offset of the B tile of k quads 16 kb .. 16 kb + 15, channels 16 half ..
        16 half + 15 of group og (row stride B_STRIDE)."""
        return w_offset + og * GROUP_BYTES + kb * (AMX_KB // 4) * B_STRIDE + half * 64

    if not emulate:
        @T.macro
        def configure(CFG, TM, TC):
            # palette 1; tiles 0-7 of 16 rows x 64 bytes (colsb uint16 at byte 16 + 2 t, rows at 48 + t)
            for i in T.vectorized(64):
                CFG[i] = T.uint8(0)
            CFG[0] = T.uint8(1)
            for t in T.unroll(8):
                CFG[16 + 2 * t] = T.uint8(AMX_KB)
                CFG[48 + t] = T.uint8(AMX_ROWS)
            T.evaluate(_amx("ldtilecfg", tirx.address_of(CFG[0])))

        @T.macro
        def zero(TM, TC, t):
            T.evaluate(_amx("tilezero", _tmm(t)))

        @T.macro
        def load(TM, t, SRC, off, stride):
            T.evaluate(_amx("tileloadd64", _tmm(t), tirx.address_of(SRC[off]), i64(stride)))

        @T.macro
        def dot(TM, TC, c, a, b):
            T.evaluate(_amx("tdpbssd", _tmm(c), _tmm(a), _tmm(b)))

        @T.macro
        def store_c(TC, t, CF):
            T.evaluate(_amx("tilestored64", _tmm(t), tirx.address_of(CF[t * CTILE]), i64(64)))

        @T.macro
        def release():
            T.evaluate(_amx("tilerelease"))
    else:
        # TM: int8 tiles [8, 16, 64] (A and B); TC: int32 C tiles [4, 16, 16]
        @T.macro
        def configure(CFG, TM, TC):
            for i in range(8 * AMX_ROWS * AMX_KB):
                TM[i] = T.int8(0)

        @T.macro
        def zero(TM, TC, t):
            for i in range(CTILE):
                TC[t * CTILE + i] = 0

        @T.macro
        def load(TM, t, SRC, off, stride):
            for r, c in T.grid(AMX_ROWS, AMX_KB):
                TM[(t * AMX_ROWS + r) * AMX_KB + c] = SRC[off + r * stride + c]

        @T.macro
        def dot(TM, TC, c, a, b):
            for m, n, k, j in T.grid(AMX_ROWS, 16, AMX_KB // 4, 4):
                TC[c * CTILE + m * 16 + n] = TC[c * CTILE + m * 16 + n] + T.Cast(
                    "int32", TM[(a * AMX_ROWS + m) * AMX_KB + 4 * k + j]) * T.Cast(
                    "int32", TM[(b * AMX_ROWS + k) * AMX_KB + 4 * n + j])

        @T.macro
        def store_c(TC, t, CF):
            for i in range(CTILE):
                CF[t * CTILE + i] = TC[t * CTILE + i]

        @T.macro
        def release():
            T.evaluate(0)

    @T.macro
    def group(XS, n0, nrows, WF, CF, store, og, TM, TC):
        # (the tiles are configured by the caller: once per call in the serial form, where the
        # recurrent kernel calls this every step, and per channel group in the parallel form)
        XF = T.decl_buffer(((n0 + (nrows + AMX_NR - 1) // AMX_NR * AMX_NR) * KP,), "int8",
                           data=XS.data)
        for rb in range((nrows + AMX_NR - 1) // AMX_NR):
            # C tiles 0-3 (2 a + b: rows 16 a.., channels 16 b..), A tiles 4-5, B tiles 6-7 (tile
            # numbers are immediates of the instructions: written out, not loop variables)
            zero(TM, TC, 0)
            zero(TM, TC, 1)
            zero(TM, TC, 2)
            zero(TM, TC, 3)
            for kb in range(KBN):
                load(TM, 4, XF, a_at(n0 + rb * AMX_NR, kb), KP)
                load(TM, 5, XF, a_at(n0 + rb * AMX_NR + AMX_ROWS, kb), KP)
                load(TM, 6, WF, b_at(og, kb, 0), B_STRIDE)
                load(TM, 7, WF, b_at(og, kb, 1), B_STRIDE)
                dot(TM, TC, 0, 4, 6)
                dot(TM, TC, 1, 4, 7)
                dot(TM, TC, 2, 5, 6)
                dot(TM, TC, 3, 5, 7)
            store_c(TC, 0, CF)
            store_c(TC, 1, CF)
            store_c(TC, 2, CF)
            store_c(TC, 3, CF)
            # C tile 2 a + b holds rows 16 a + r, channels 16 b + c at CF[(2 a + b) * 256 + 16 r + c]
            for r in range(AMX_NR):
                if rb * AMX_NR + r < nrows:
                    for v in T.unroll(AMX_OC // 8):
                        if (og * AMX_OC + v * 8 + 8) <= O:
                            for l in T.vectorized(8):
                                store(rb * AMX_NR + r, og * AMX_OC + v * 8 + l, CF[
                                    (2 * (r // AMX_ROWS) + v // 2) * CTILE
                                    + (r % AMX_ROWS) * 16 + (v % 2) * 8 + l])
                        else:
                            for l in range(8):
                                if og * AMX_OC + v * 8 + l < O:
                                    store(rb * AMX_NR + r, og * AMX_OC + v * 8 + l, CF[
                                        (2 * (r // AMX_ROWS) + v // 2) * CTILE
                                        + (r % AMX_ROWS) * 16 + (v % 2) * 8 + l])

    @T.macro
    def groups(XS, n0, nrows, WF, CF, store, og0, count):
        # channel groups og0 .. og0 + count - 1 between one tile configuration and its release
        CFG = T.alloc_buffer((64,), "uint8")
        TM = T.alloc_buffer((8 * AMX_ROWS * AMX_KB if emulate else 1,), "int8")
        TC = T.alloc_buffer((4 * CTILE if emulate else 1,), "int32")
        configure(CFG, TM, TC)
        for j in range(count):
            group(XS, n0, nrows, WF, CF, store, og0 + j, TM, TC)
        release()

    @T.macro
    def gemm(XS, n0, nrows, W, ACC, RED, store):
        WF = T.decl_buffer((w_offset + OG * GROUP_BYTES,), "int8", data=W.data)
        if parallel:
            for og in T.parallel(OG):
                CFP = T.alloc_buffer((4 * CTILE,), "int32")   # per worker
                groups(XS, n0, nrows, WF, CFP, store, og, 1)
        else:
            CF = T.decl_buffer((4 * CTILE,), "int32", data=ACC.data)
            groups(XS, n0, nrows, WF, CF, store, 0, OG)

    return gemm


def with_convention(func, isa: str, w7: bool, packed: bool, ov: int, mmla: bool = False,
                    tiles: bool = False):
    """Record how the kernel takes its weight: `intlstm.u8` (the u8 x s8 route: a correction
    -128 rowsum(W) is added, folded into the bias of linear kernels or passed as `corr` to the
    recurrent kernel) and `intlstm.wpack` (0: natural [O, K]; else the OV of
    `_gemm.pack_outer(W, u8, OV)`; -1: `_gemm.pack_mmla(W)`, the aarch64 i8mm form, which also
    needs a target with i8mm; -2: `_gemm.pack_amx(W)`, the AMX tile form (tiles=True: no u8 route),
    which also gets `intlstm.amx` = 1: running it needs the process's AMX permission,
    `runtime.amx.request_amx_permission`). `kernels.prepare_weights` and `build_kernel` read them."""
    if tiles:
        return (func.with_attr("intlstm.u8", 0).with_attr("intlstm.wpack", AMX_PACK)
                .with_attr("intlstm.amx", int(not _isa.family(isa).tiles_emulated)))
    u8 = uses_u8(isa, w7, packed)
    pack = int(ov) if (packed and _isa.family(isa).outer) else (-1 if mmla else 0)
    return func.with_attr("intlstm.u8", int(u8)).with_attr("intlstm.wpack", pack)
