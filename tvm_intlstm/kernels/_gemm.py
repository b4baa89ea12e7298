"""The int8 x int8 -> int32 product shared by the linear kernels and the recurrent LSTM step.

`gemm_macro(K, O, isa)` returns a TVMScript macro that computes, for rows n of an activation
source XS [rows, K'] and every row o of an int8 weight W [O, K] (natural row-major layout, no
packing):

    acc[n, o] = sum_k int32(W[o, k]) * int32(XS[n, k])          (exact int32, spec 5)

and hands each accumulator to `store(n, o, acc)`, a Python callable returning the BufferStore of
the epilogue (bias, requantization, gate add, ...). The store is called inside an 8-lane
vectorized loop over o for full tiles, and as a scalar for the O % 8 remaining rows.

The source XS is, by ISA (`x16_source(isa)`):
- "avx2": an int16 scratch [rows, padded_k(K)] holding the int8 activations sign-extended (and
  zero padded): per 16 k one vpmovsxbw of each weight row + vpmaddwd + vpaddd.
- "neon_dotprod": the int8 activations themselves: per 16 k one sdot per weight row.
- "generic": the int8 activations; int32 lanes of 8 that LLVM vectorizes for any target.

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

from tvm import tirx
from tvm.script import tirx as T

from . import _x86

ROW_TILE = 8      # outputs per micro-tile (rows of W)
KC = 16           # k per vector chunk (and the X16 padding unit)
NB = 16           # rows of XS per cache block


def padded_k(K: int) -> int:
    return (K + KC - 1) // KC * KC


def x16_source(isa: str) -> bool:
    """Does the ISA's micro-kernel read an int16 (sign-extended, padded) copy of the activations?"""
    return isa == "avx2"


def _sdot(acc, a, b):
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc, a, b)


def _addp(a, b):
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.addp.v4i32", a, b)


def gemm_macro(K: int, O: int, isa: str):
    OT, OR = divmod(O, ROW_TILE)
    use_avx2 = isa == "avx2"
    use_sdot = isa == "neon_dotprod"
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
