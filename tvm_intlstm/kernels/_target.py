"""Targets as the kernels see them: parsing (`as_target`) and LLVM's feature answer (`has_feature`).
A leaf module (tvm only): the kernel-family registry (kernels/isa) and the generators import it."""
from __future__ import annotations

import tvm


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
