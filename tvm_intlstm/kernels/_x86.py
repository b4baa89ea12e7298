"""x86 building blocks (explicit LLVM x86 intrinsics) of the AVX2 and VNNI kernel families.

Each is used only where it is exact: vpmaddwd (int16 x int16 -> int32, pair sums, exact for every
int16 input; its only overflow case, all four operands -32768, cannot occur with int8-extended
data); vphaddd (wrapping int32 adds, exact because the spec bounds every accumulator); vpmaddubsw
(u8 x s8 -> int16 pair sums, which SATURATE: exact only for weights in [-64, 64], the AVX2 family's
7-bit route, see kernels/isa/avx2.py); vpdpbusd (four u8 x s8 products added to an int32 lane, no
intermediate saturation: exact for every int8 weight).
"""
from __future__ import annotations

from tvm import tirx

from ._tir import lanes_of


def pmaddwd(a, b):
    """int16x16, int16x16 -> int32x8: lane i = a[2i] b[2i] + a[2i+1] b[2i+1]."""
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a, b)


def phaddd(a, b):
    """int32x8, int32x8 -> int32x8 horizontal pair adds within each 128-bit half:
    [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]."""
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.phadd.d", a, b)


def _halves_sum(q0, q1):
    """q0 = [s0..s3 lo | s0..s3 hi], q1 likewise for s4..s7 -> [s0..s7] (lo + hi)."""
    lo = tirx.Shuffle([q0, q1], [0, 1, 2, 3, 8, 9, 10, 11])
    hi = tirx.Shuffle([q0, q1], [4, 5, 6, 7, 12, 13, 14, 15])
    return lo + hi


def hsum8(accs):
    """Eight int32x8 accumulators -> one int32x8 whose lane r is the sum of all lanes of accs[r]."""
    assert len(accs) == 8
    p = [phaddd(accs[2 * i], accs[2 * i + 1]) for i in range(4)]
    q0 = phaddd(p[0], p[1])   # [r0 r1 r2 r3 (lo halves) | r0 r1 r2 r3 (hi halves)]
    q1 = phaddd(p[2], p[3])
    return _halves_sum(q0, q1)


def pmaddubsw(u, w):
    """uint8x32, int8x32 -> int16x16: lane i = sat16(u[2i] w[2i] + u[2i+1] w[2i+1])."""
    return tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u, w)


def vpdpbusd(acc, u, w):
    """int32x8 acc, int8x32 u (the bytes of a uint8 vector), int8x32 w -> int32x8 (or x16 / x64 for
    zmm): lane i = acc[i] +
    sum_j uint8(u[4i+j]) w[4i+j] (wrapping). LLVM 22 types the byte operands <32 x i8> (older
    LLVMs took <8 x i32>); the same intrinsic selects AVX-VNNI's VEX or AVX512-VNNI's EVEX form."""
    lanes = lanes_of(acc)     # 8 (ymm) or 16 (zmm: int8x64 operands, AVX512-VNNI)
    return tirx.call_llvm_pure_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}",
                                      acc, u, w)
