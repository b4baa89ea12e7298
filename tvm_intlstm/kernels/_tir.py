"""TIR expression builders for the integer operations of docs/integer_spec.md.

Every kernel builds its arithmetic from these helpers, so each spec operation is written once
in TIR. They take and return `PrimExpr` (scalar or vector: scalars broadcast against vectors)
and are called from inside TVMScript bodies (the parser evaluates Python calls at parse time).

Conventions:
- `rshift_round(v, n)` and `requantize` work in the dtype of `v` (int32 or int64) exactly as the
  spec states; the caller is responsible for choosing the width the spec asks for.
- Static (Python int) shifts and multipliers are folded into immediates.

The PWL evaluation (spec 7) is not a single expression here: an expression with n - 1 compare
terms, inlined into its uses, made TVM's CompactBufferAllocation pass take minutes (it
substitutes bound values into index expressions). The kernels count the piece index in a small
stack buffer instead (`for q in T.unroll(1, n): IDX[v] += XC[v] >= knot[q]`), which LLVM keeps
in registers (one value at a time: the macro `pwl_index_into`), and finish with `pwl_piece` once
the index is known. The integer square root
(spec 10) is a statement sequence too: the macro `isqrt_into`.
"""
from __future__ import annotations

from tvm import tirx
from tvm.ir import Expr as PrimExpr
from tvm.script import tirx as T

from ..spec import GATE_FRAC, PWL_FRAC  # noqa: F401  (re-exported for the kernels)

_RANGES = {
    8: (-(2**7), 2**7 - 1),
    16: (-(2**15), 2**15 - 1),
    32: (-(2**31), 2**31 - 1),
}


def full_dtype(e) -> str:
    """dtype string of a PrimExpr, with lanes ('int32', 'int32x8'); TVM 0.27 keeps it in `.ty`."""
    return str(e.ty.dtype)


def dtype_of(e) -> str:
    """Element dtype string of a PrimExpr (vector dtypes like 'int32x8' give 'int32')."""
    return full_dtype(e).split("x")[0]


def lanes_of(e) -> int:
    d = full_dtype(e)
    return int(d.split("x")[1]) if "x" in d else 1


def const(value: int, like) -> PrimExpr:
    """An integer constant with the element dtype of `like` (broadcast happens on use)."""
    return tirx.const(int(value), dtype_of(like))


def cast(dtype: str, e) -> PrimExpr:
    """Cast keeping the lane count: cast('int64', int32x8 expr) -> int64x8."""
    n = lanes_of(e)
    target = dtype if n == 1 else f"{dtype}x{n}"
    if full_dtype(e) == target:
        return e
    return tirx.Cast(target, e)


def clamp(v, lo: int, hi: int) -> PrimExpr:
    return tirx.max(tirx.min(v, const(hi, v)), const(lo, v))


def sat(v, bits: int) -> PrimExpr:
    """sat_N (spec 0), in the dtype of `v` (no narrowing)."""
    lo, hi = _RANGES[bits]
    return clamp(v, lo, hi)


def sat_cast(v, bits: int) -> PrimExpr:
    """sat_N then narrow to intN."""
    return cast(f"int{bits}", sat(v, bits))


def rshift_round(v, n) -> PrimExpr:
    """(v + 2^(n-1)) >> n, ties toward +inf; v for n = 0 (spec 0). Computed in v's dtype.

    `n` is a Python int (folded) or a PrimExpr (per-channel shifts, 0 <= n <= 62)."""
    if isinstance(n, int):
        if n == 0:
            return v
        return (v + const(1 << (n - 1), v)) >> const(n, v)
    n = cast(dtype_of(v), n)
    one = const(1, v)
    # (1 << n) >> 1 is 2^(n-1) for n >= 1 and 0 for n = 0: branch-free
    return (v + ((one << n) >> one)) >> n


def add_i32(a, b) -> PrimExpr:
    """a + b of two int32 values whose sum fits int32 (the caller's contract: a GEMM accumulator
    and its bias or u8 correction), written as int32(int64(a) + int64(b)). Same value as a + b;
    the point is the code LLVM makes of a requantize of it. TVM emits a + b as `add nsw`, and
    InstCombine widens sext(add nsw a, b) into a 64-bit add of the extended operands, after which
    the requantize's int64 product is no longer a 32 x 32 -> 64 multiply (vpmuldq, one per 4
    lanes) but a full 64-bit multiply emulation (three vpmuludq and shifts): ~35 instead of ~17
    instructions per 8 outputs of a GEMM epilogue. The truncated 64-bit sum becomes a plain
    32-bit add (no nsw, nothing to widen). Measured: 7-bit LSTM input projection -7 %, batch-8
    recurrent step -4 to -7 %."""
    return cast("int32", cast("int64", a) + cast("int64", b))


def requantize(acc, M, s, bits: int) -> PrimExpr:
    """requantize_N (spec 2): sat_N(rshift_round(int64(acc) * M, s)), returned as intN.

    acc: int32 expression; M, s: int32 expressions or Python ints (1 <= s <= 62)."""
    a64 = cast("int64", acc)
    if isinstance(M, int):
        prod = a64 * tirx.const(M, "int64")
    else:
        prod = a64 * cast("int64", M)
    return sat_cast(rshift_round(prod, s), bits)


def requantize_hi(acc, M, s, bits: int) -> PrimExpr:
    """requantize (spec 2) for shifts known to be in [32, 62], with a 32-bit final shift:

        floor(P / 2^s) = floor(floor(P / 2^32) / 2^(s - 32)),  P = int64(acc) M + 2^(s-1)

    (nested floor division of integers). floor(P / 2^32) of an int64 is its high 32-bit word, so
    the variable shift, the clamp and the narrowing happen on int32 lanes: AVX2 has no 64-bit
    arithmetic shift (vpsravq) or 64-bit compare-and-clamp, which LLVM otherwise emulates per call.
    Bit-exact with `requantize` whenever 32 <= s <= 62: the caller guarantees it (the compiler checks
    the constant shifts; real gate/hidden scales give s of 35-45).

    A vector acc (an even number of lanes) with a constant s takes `_requantize_hi_halves`."""
    if lanes_of(acc) > 1 and lanes_of(acc) % 2 == 0 and isinstance(s, int) and 32 <= s <= 62:
        return _requantize_hi_halves(acc, M, s, bits)
    a64 = cast("int64", acc)
    s64 = cast("int64", s) if not isinstance(s, int) else tirx.const(s, "int64")
    one = const(1, a64)
    prod = a64 * (tirx.const(M, "int64") if isinstance(M, int) else cast("int64", M))
    hi = cast("int32", (prod + ((one << s64) >> one)) >> const(32, a64))
    s32 = cast("int32", s) if not isinstance(s, int) else tirx.const(s, "int32")
    # the shift amount is clamped to [0, 31] (a no-op for valid s) so that TVM's integer analysis
    # sees its range: with an unbounded amount it derived a wrong bound for the shift and dropped
    # the int16 clamp below (found by tests/test_fast_kernels.py)
    amount = tirx.max(tirx.min(s32 - const(32, hi), const(31, hi)), const(0, hi))
    return sat_cast(hi >> amount, bits)


def _requantize_hi_halves(acc, M, s: int, bits: int) -> PrimExpr:
    """requantize_hi of an int32 vector of L lanes (L even) for a constant s in [32, 62], with the
    int64 products taken where vpmuldq computes them: the 32 x 32 -> 64 multiply of the even
    lanes (the low half of each 64-bit pair), and of the odd lanes shifted down into it. The high
    words of the two product vectors (+ the rounding term) are then interleaved back into L int32
    lanes, i.e. floor(P / 2^32) of every lane, and shifted by s - 32 as in requantize_hi. LLVM
    makes the lane-wise form (each half of the lanes widened to int64, multiplied, narrowed and
    the halves re-joined) ~17 instructions per 16 lanes; this one ~12, without the cross-lane
    widening and narrowing."""
    L = lanes_of(acc)
    h = L // 2
    a = tirx.reinterpret(f"int64x{h}", acc)
    c32 = tirx.Broadcast(tirx.const(32, "int64"), h)
    if isinstance(M, int):
        me = mo = tirx.Broadcast(tirx.const(M, "int64"), h)
    else:
        m = tirx.reinterpret(f"int64x{h}", M)
        me, mo = (m << c32) >> c32, m >> c32
    rnd = tirx.Broadcast(tirx.const(1 << (s - 1), "int64"), h)
    pe = ((a << c32) >> c32) * me + rnd     # even lanes (sign-extended low words)
    po = (a >> c32) * mo + rnd              # odd lanes
    hi = tirx.Shuffle([tirx.reinterpret(f"int32x{L}", pe), tirx.reinterpret(f"int32x{L}", po)],
                      [i + 1 if i % 2 == 0 else L + i for i in range(L)])
    return sat_cast(hi >> tirx.Broadcast(tirx.const(s - 32, "int32"), L), bits)


def add_sat16(a, b) -> PrimExpr:
    """add_sat_16 (spec 3): int32 sum, saturated, int16 result."""
    return sat_cast(cast("int32", a) + cast("int32", b), 16)


def pwl_piece(table, idx, xc) -> PrimExpr:
    """spec 7 once the clamped input xc and its piece index idx are known:
    sat_16(v_i + rshift_round(a_i (xc - k_i), PWL_FRAC)) for a packed table (rows: knots, bases,
    slopes; `lstm.pack_pwl`). `table` is a buffer (or a buffer view) indexed [row, idx]; idx and xc
    are scalar or vector int32 expressions."""
    return sat(table[1, idx] + rshift_round(table[2, idx] * (xc - table[0, idx]), PWL_FRAC), 16)


@T.macro
def pwl_index_into(TBL, n, x, XC, i, IDX, j):
    """XC[i] = the int32 value x clamped to the knots of table TBL (n pieces, `lstm.pack_pwl`) and
    IDX[j] = its piece index (spec 7), counted in these int32 stack buffers; the PWL value is then
    pwl_piece(TBL, IDX[j], XC[i])."""
    XC[i] = T.max(T.min(x, TBL[0, n]), TBL[0, 0])
    IDX[j] = 0
    for q in range(1, n):
        IDX[j] = IDX[j] + T.Cast("int32", XC[i] >= TBL[0, q])


@T.macro
def pwl_index_vec(TBL, n, XC, IDX, r, L):
    """pwl_index_into on L lanes at once: row r of XC (int32, filled by the caller) clamped in
    place to the knots of TBL (n pieces) and IDX[r, 0:L] its piece index (spec 7); the value is then
    pwl_piece(TBL, IDX[r, jv], XC[r, jv]) per lane (the table reads become gathers)."""
    for jv in T.vectorized(L):
        XC[r, jv] = T.max(T.min(XC[r, jv], TBL[0, n]), TBL[0, 0])
        IDX[r, jv] = 0
    for q in T.unroll(1, n):
        for jv in T.vectorized(L):
            IDX[r, jv] = IDX[r, jv] + T.Cast("int32", XC[r, jv] >= TBL[0, q])


@T.macro
def isqrt_into(ISQ, v):
    """isqrt (spec 10) of the int64 value v into ISQ[1], with ISQ an int64 [2] scratch buffer
    ([remaining value, result]): the reference's 31 rounds of the binary digit-by-digit method
    (`reference.ops.isqrt`), v in [0, 2^62). The result is floor(sqrt(v)) (not yet clamped to 1)."""
    ISQ[0] = v
    ISQ[1] = T.int64(0)
    for i in T.unroll(31):
        if ISQ[0] >= ISQ[1] + (T.int64(1) << T.Cast("int64", 60 - 2 * i)):
            ISQ[0] = ISQ[0] - (ISQ[1] + (T.int64(1) << T.Cast("int64", 60 - 2 * i)))
            ISQ[1] = (ISQ[1] >> T.int64(1)) + (T.int64(1) << T.Cast("int64", 60 - 2 * i))
        else:
            ISQ[1] = ISQ[1] >> T.int64(1)
