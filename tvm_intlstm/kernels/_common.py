"""Shared plumbing of the kernel generators: argument checks, vector splits, ISA selection."""
from __future__ import annotations

import tvm

from . import isa as _isa

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


def has_feature(target, feature: str) -> bool:
    """Does LLVM enable CPU `feature` (e.g. "avx2", "dotprod") for this llvm target (its mcpu and
    mattr)? False when LLVM cannot tell (unknown feature or CPU)."""
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel
    try:
        return bool(codegen.llvm_cpu_has_features(feature, as_target(target)))
    except Exception:  # pylint: disable=broad-except
        return False


def as_target(target) -> tvm.target.Target:
    """tvm.target.Target from a Target, a dict, or a string (JSON, a kind name, or the classic
    'llvm -mcpu=znver3 -mtriple=... -mattr=+a,+b' form that TVM 0.27 no longer parses)."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if not isinstance(target, str):
        raise TypeError(f"target must be a Target, dict or str, got {type(target)}")
    s = target.strip()
    if s.startswith("{"):
        return tvm.target.Target(s)
    parts = s.split()
    if len(parts) == 1:
        return tvm.target.Target(parts[0])
    cfg: dict = {"kind": parts[0]}
    for p in parts[1:]:
        if not p.startswith("-") or "=" not in p:
            raise ValueError(f"cannot parse target option {p!r} in {target!r}")
        key, val = p.lstrip("-").split("=", 1)
        cfg[key] = val.split(",") if key in ("mattr", "keys", "libs") else val
    return tvm.target.Target(cfg)


def finish(func, name: str, isa: str = "generic"):
    """Attach the symbol name and the ISA the body was written for."""
    return func.with_attr("global_symbol", name).with_attr("intlstm.isa", isa)


def with_convention(func, isa: str, w7: bool, packed: bool, ov: int, mmla: bool = False,
                    tiles: bool = False):
    """Record how the kernel takes its weight: `intlstm.u8` (the u8 x s8 route: a correction
    -128 rowsum(W) is added, folded into the bias of linear kernels or passed as `corr` to the
    recurrent kernel) and `intlstm.wpack` (0: natural [O, K]; else the OV of
    `_gemm.pack_outer(W, u8, OV)`; -1: `_gemm.pack_mmla(W)`, the aarch64 i8mm form, which also
    needs a target with i8mm; -2: `_gemm.pack_amx(W)`, the AMX tile form (tiles=True: no u8 route),
    which also gets `intlstm.amx` = 1: running it needs the process's AMX permission,
    `runtime.amx.request_amx_permission`). `kernels.prepare_weights` and `build_kernel` read them."""
    from ._gemm import AMX_PACK, uses_u8  # pylint: disable=import-outside-toplevel
    if tiles:
        return (func.with_attr("intlstm.u8", 0).with_attr("intlstm.wpack", AMX_PACK)
                .with_attr("intlstm.amx", int(not _isa.family(isa).tiles_emulated)))
    u8 = uses_u8(isa, w7, packed)
    pack = int(ov) if (packed and _isa.family(isa).outer) else (-1 if mmla else 0)
    return func.with_attr("intlstm.u8", int(u8)).with_attr("intlstm.wpack", pack)
