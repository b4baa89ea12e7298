"""What a tuning record's target must agree with, and whether this machine can run a target's
code (the in-process runner executes every candidate)."""
from __future__ import annotations

def as_target(spec):
    from ..target import parse_target  # pylint: disable=import-outside-toplevel

    return parse_target(spec)


def target_key(tgt) -> tuple:
    """What must agree between a tuning record and the compile target: kind, triple, cpu, attrs."""
    a = tgt.attrs
    mattr = a.get("mattr", None) or []
    return (tgt.kind.name, str(a.get("mtriple", "") or ""), str(a.get("mcpu", "") or ""),
            tuple(sorted(str(v) for v in mattr)))


def target_str(tgt) -> str:
    k = target_key(tgt)
    parts = [k[0]] + [f"-{n}={v}" for n, v in (("mtriple", k[1]), ("mcpu", k[2])) if v]
    if k[3]:
        parts.append("-mattr=" + ",".join(k[3]))
    return " ".join(parts)


def is_host_runnable(tgt) -> bool:
    import platform  # pylint: disable=import-outside-toplevel

    if tgt.kind.name != "llvm":
        return False
    triple = str(tgt.attrs.get("mtriple", "") or "")
    host = platform.machine().lower()
    if host in ("x86_64", "amd64"):
        same_arch = not triple or triple.startswith("x86_64")
    elif host in ("aarch64", "arm64"):
        same_arch = not triple or triple.startswith("aarch64") or triple.startswith("arm64")
    else:
        same_arch = False
    return same_arch and not missing_host_features(tgt)


def missing_host_features(tgt) -> list:
    """Features the target's code may use that this machine's CPU lacks (e.g. tuning for
    `-mcpu=cascadelake` on a Zen3: the in-process runner would execute AVX-512 and die); the one
    check of tvm_intlstm.target, from /proc/cpuinfo."""
    from ..target import missing_host_features  # pylint: disable=import-outside-toplevel
    return missing_host_features(tgt) or []
