"""Shared plumbing of the kernel generators: argument checks, vector splits, ISA selection."""
from __future__ import annotations

from . import isa as _isa
from ._target import as_target, has_feature  # noqa: F401  (re-exported: the kernels' door)

INT32_MAX = 2**31 - 1


def check_multiplier(M) -> int:
    M = int(M)
    if not 0 <= M <= INT32_MAX:
        raise ValueError(f"fixed-point multiplier must be in [0, 2^31 - 1], got {M}")
    return M


def check_shift(s, lo: int = 0, hi: int = 62) -> int:
    s = int(s)
    if not lo <= s <= hi:
        raise ValueError(f"shift must be in [{lo}, {hi}], got {s}")
    return s


def check_pieces(n) -> int:
    """A PWL table's piece count (spec 7: 1 to 64)."""
    n = int(n)
    if not 1 <= n <= 64:
        raise ValueError(f"PWL piece count must be in 1..64, got {n}")
    return n


def requantizer(shift_hi: bool = False, scale: tuple | None = None):
    """The requantize (spec 2) of a kernel epilogue, called as rq(acc, M, s, bits):
    `_tir.requantize_hi` when every shift is known to be in [32, 62] (shift_hi=True, or a baked
    shift in that range), `_tir.requantize` otherwise. scale=(M, s) bakes a per-tensor multiplier and
    shift in as immediates (the M, s passed at the call are then ignored); scale=(None, s) bakes only
    the shift (M is the per-channel value passed at the call)."""
    from ._tir import requantize, requantize_hi  # pylint: disable=import-outside-toplevel
    if scale is None:
        return requantize_hi if shift_hi else requantize
    M0 = None if scale[0] is None else check_multiplier(scale[0])
    s0 = check_shift(scale[1], 1, 62)
    rq = requantize_hi if 32 <= s0 <= 62 else requantize
    return lambda acc, M, s, bits: rq(acc, M if M0 is None else M0, s0, bits)


def vec_split(n: int, width: int) -> tuple[int, int]:
    """(outer, inner) with outer * inner == n and inner the largest divisor of n <= width."""
    n = int(n)
    if n <= 0:
        raise ValueError(f"feature size must be positive, got {n}")
    for v in range(min(width, n), 0, -1):
        if n % v == 0:
            return n // v, v
    return n, 1


def resolve_isa(target=None, isa: str | None = None) -> str:
    """The kernel family (kernels/isa/) a generator uses, by name: explicit `isa` (checked), else the
    family `isa.pick(target)` chooses from the target's features, else 'generic'. `target` may be a
    tvm.target.Target, a JSON-like dict or a target string."""
    if isa is not None:
        return _isa.family(isa).name
    if target is None:
        return "generic"
    return _isa.pick(target).name


def without_params(func, *names: str):
    """`func` without the parameters (buffers) named `names`, which its body must not use: one
    TVMScript definition then serves the variants of a kernel with and without optional operands
    (a TVMScript signature is fixed). The result is the PrimFunc the shorter signature parses to."""
    from tvm import tirx  # pylint: disable=import-outside-toplevel
    dropped = [p for p in func.params if p.name in names]
    if len(dropped) != len(names):
        raise ValueError(f"{names} are not all parameters of {[p.name for p in func.params]}")
    used = tirx.analysis.undefined_vars(func.body)
    if any(u.same_as(p) for u in used for p in dropped):
        raise ValueError(f"the kernel body uses a parameter to be dropped, one of {names}")
    keep = [p for p in func.params if p.name not in names]
    return tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs, func.span)


def finish(func, name: str, isa: str = "generic"):
    """Attach the symbol name and the ISA the body was written for."""
    return func.with_attr("global_symbol", name).with_attr("intlstm.isa", isa)
