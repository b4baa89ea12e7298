"""Target handling for tvm_intlstm: parse user target specs, describe CPU features, export.

TVM 0.27 only accepts targets as JSON dicts (``{"kind": "llvm", "mcpu": "znver3"}``); the
classic command-line strings (``"llvm -mcpu=znver3"``) that users write are rejected by
``tvm.target.Target``.  :func:`parse_target` accepts every form and returns a validated
``tvm.target.Target``:

* classic strings: ``"llvm"``, ``"llvm -mcpu=znver3"``,
  ``"llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod"``, ``"llvm ... -num-cores=4"``;
* TVM JSON dicts (or the same as a JSON string): ``{"kind": "llvm", "mcpu": "znver3"}``;
* a ``tvm.target.Target`` (returned unchanged after validation);
* named presets (see :data:`PRESETS` and docs/arm.md): ``"rpi4"``, ``"rpi5"``, ``"rk3588"``,
  ``"aarch64-i8mm"``, ``"x86-avx2"``, ``"x86-avx512"``, ``"x86-vnni"``, ``"host"``, ...
  A preset may be followed by overriding options: ``"rpi4 -num-cores=2"``.

:func:`target_features` answers the questions kernels ask (AVX2? VNNI? dotprod? i8mm?) from
the target's ``-mtriple``, ``-mcpu`` and ``-mattr``, using LLVM's own CPU tables (falling back
to a small built-in table of well-known CPUs).

:func:`export_library` links a compiled module for its target: with the aarch64 cross compiler
(:func:`find_cross_compiler`) for ARM, with the host compiler otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

__all__ = [
    "TargetError",
    "ToolchainError",
    "TargetFeatures",
    "Preset",
    "PRESETS",
    "CROSS_CXX_ENV",
    "parse_target",
    "target_features",
    "check_ieee_float",
    "host_cpu_features",
    "missing_host_features",
    "check_runs_on_host",
    "target_to_dict",
    "target_to_string",
    "is_aarch64",
    "is_x86",
    "host_arch",
    "list_presets",
    "find_cross_compiler",
    "export_library",
]

#: Environment variable that overrides the C++ cross compiler used for aarch64 exports.
CROSS_CXX_ENV = "TVM_INTLSTM_CROSS_CXX"
_DEFAULT_AARCH64_CXX = "aarch64-linux-gnu-g++"
_DEFAULT_X86_64_CXX = "x86_64-linux-gnu-g++"
_ARM_APT_HINT = "apt-get install g++-aarch64-linux-gnu libc6-dev-arm64-cross"

_EXAMPLES = (
    'e.g. "llvm -mcpu=znver3", '
    '"llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod", '
    '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"} '
    'or a preset such as "rpi4"'
)

TargetSpec = Union[str, dict, "tvm.target.Target"]  # noqa: F821


class TargetError(ValueError):
    """A target specification that tvm_intlstm cannot use (the message says why)."""


class ToolchainError(RuntimeError):
    """A compiler or tool needed for a target is not installed."""


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named target: a TVM target config plus what it is for."""

    name: str
    description: str
    config: dict  # TVM JSON target dict (without dynamic parts, see "host")
    qemu_cpu: str | None = None  # qemu-aarch64 -cpu model that runs code built for it


_A64 = "aarch64-linux-gnu"
_X64 = "x86_64-linux-gnu"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "rpi3",
            "Raspberry Pi 3 / Zero 2 W (BCM2837, 4x Cortex-A53): NEON, no dotprod",
            {"kind": "llvm", "mtriple": _A64, "mcpu": "cortex-a53", "mattr": ["+neon"],
             "num-cores": 4},
            "cortex-a53",
        ),
        Preset(
            "rpi4",
            "Raspberry Pi 4 / 400 / CM4 (BCM2711, 4x Cortex-A72): NEON, no dotprod",
            {"kind": "llvm", "mtriple": _A64, "mcpu": "cortex-a72", "mattr": ["+neon"],
             "num-cores": 4},
            "cortex-a72",
        ),
        Preset(
            "rpi5",
            "Raspberry Pi 5 (BCM2712, 4x Cortex-A76): NEON + dotprod (sdot/udot)",
            {"kind": "llvm", "mtriple": _A64, "mcpu": "cortex-a76",
             "mattr": ["+neon", "+dotprod"], "num-cores": 4},
            "cortex-a76",
        ),
        Preset(
            "rk3588",
            "Rockchip RK3588(S) boards (Rock 5, Orange Pi 5): 4x Cortex-A76 (+4x A55), "
            "NEON + dotprod; num-cores counts the big cores",
            {"kind": "llvm", "mtriple": _A64, "mcpu": "cortex-a76",
             "mattr": ["+neon", "+dotprod"], "num-cores": 4},
            "cortex-a76",
        ),
        Preset(
            "graviton2",
            "AWS Graviton2 / Ampere Altra (Neoverse-N1): NEON + dotprod",
            {"kind": "llvm", "mtriple": _A64, "mcpu": "neoverse-n1",
             "mattr": ["+neon", "+dotprod"]},
            "neoverse-n1",
        ),
        Preset(
            "aarch64-i8mm",
            "recent phones and Armv8.6+ cores (Cortex-A710/X2 and later, Graviton3): "
            "NEON + dotprod + i8mm (smmla), generic scheduling model",
            {"kind": "llvm", "mtriple": _A64, "mattr": ["+neon", "+dotprod", "+i8mm"]},
            "max",
        ),
        Preset(
            "x86-avx2",
            "x86-64 with AVX2/FMA, no AVX-512 (Haswell and later Intel, AMD Zen 1-3)",
            {"kind": "llvm", "mtriple": _X64, "mcpu": "haswell"},
        ),
        Preset(
            "x86-avx512",
            "x86-64 with AVX-512 F/BW/VL, no VNNI (Skylake-SP/X)",
            {"kind": "llvm", "mtriple": _X64, "mcpu": "skylake-avx512"},
        ),
        Preset(
            "x86-vnni",
            "x86-64 with AVX-512 VNNI (Cascade Lake and later Xeons, Ice Lake, Zen 4)",
            {"kind": "llvm", "mtriple": _X64, "mcpu": "cascadelake"},
        ),
        # named x86 server/client CPUs (the kernel family follows their features, docs/compiler.md)
        *[Preset(cpu, desc, {"kind": "llvm", "mtriple": _X64, "mcpu": cpu}) for cpu, desc in (
            ("znver3", "AMD Zen 3 (EPYC Milan, Ryzen 5000): AVX2 -> avx2 kernels"),
            ("znver4", "AMD Zen 4 (EPYC Genoa, Ryzen 7000): AVX-512 VNNI -> avx512_vnni kernels"),
            ("znver5", "AMD Zen 5 (EPYC Turin, Ryzen 9000): AVX-512 VNNI -> avx512_vnni kernels"),
            ("icelake-server", "Intel Xeon Ice Lake-SP: AVX-512 VNNI -> avx512_vnni kernels"),
            ("sapphirerapids", "Intel Xeon Sapphire Rapids / Emerald Rapids: AVX-512 VNNI -> "
                               "avx512_vnni kernels (AMX tiles: opt-in, compile(kernels=\"amx\"))"),
            ("alderlake", "Intel Core 12th-14th gen (Alder / Raptor Lake): AVX-VNNI -> x86_vnni kernels"),
        )],
        Preset(
            "host",
            "this machine's CPU as LLVM detects it (triple, -mcpu and core count)",
            {"kind": "llvm"},
        ),
    ]
}


def list_presets() -> dict[str, str]:
    """Preset names and their one-line descriptions."""
    return {name: p.description for name, p in PRESETS.items()}


def _host_config() -> dict:
    from tvm.target import codegen

    triple = str(codegen.llvm_get_system_triple())
    cpu = str(codegen.llvm_get_system_cpu())
    config: dict[str, Any] = {"kind": "llvm", "mtriple": triple}
    if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, triple):
        config["mcpu"] = cpu
    try:
        ncores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ncores = os.cpu_count() or 1
    config["num-cores"] = int(ncores)
    return config


def _preset_config(name: str) -> dict:
    if name == "host":
        return _host_config()
    return json.loads(json.dumps(PRESETS[name].config))  # deep copy


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _llvm_options() -> dict[str, str]:
    from tvm.target import TargetKind

    return {str(k): str(v) for k, v in TargetKind.options_from_name("llvm").items()}


def _tvm_tags() -> set[str]:
    from tvm.target import list_tags

    return {str(k) for k in list_tags().keys()}


def _known_kinds() -> list[str]:
    from tvm.target import Target

    return [str(k) for k in Target.list_kinds()]


def _check_kind(kind: Any, spec: Any, allow_preset: bool = False) -> None:
    if not isinstance(kind, str) or not kind:
        raise TargetError(f"target {spec!r} has no kind; {_EXAMPLES}")
    if kind == "llvm":
        return
    if kind in PRESETS:
        if allow_preset:
            return
        raise TargetError(
            f"{kind!r} is a preset name, not a target kind: write it as the string {kind!r} "
            f"(not as \"kind\" of a dict); {_EXAMPLES}"
        )
    if kind in _known_kinds():
        raise TargetError(
            f"target kind {kind!r} is not supported: tvm_intlstm compiles for x86-64 and "
            f"aarch64 CPUs through LLVM (kind 'llvm'); {_EXAMPLES}"
        )
    raise TargetError(
        f"unknown target kind or preset {kind!r} in {spec!r}; known presets: "
        f"{', '.join(PRESETS)}; {_EXAMPLES}"
    )


def _convert_option(key: str, value: str | None, typ: str, spec: str) -> Any:
    if typ == "bool":
        if value is None:
            return True
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise TargetError(
            f"option -{key} of {spec!r} wants true/false, got {value!r} (e.g. \"llvm -{key}\")"
        )
    if value is None or value == "":
        raise TargetError(
            f"option -{key} in {spec!r} needs a value, written -{key}=VALUE; {_EXAMPLES}"
        )
    if typ == "int":
        try:
            return int(value, 0)
        except ValueError:
            raise TargetError(
                f"option -{key} of {spec!r} wants an integer, got {value!r} "
                f"(e.g. \"llvm -{key}=4\")"
            ) from None
    if typ.startswith("Array"):
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise TargetError(f"option -{key} of {spec!r} is an empty list; {_EXAMPLES}")
        return items
    if typ == "str":
        return value
    raise TargetError(f"option -{key} cannot be given in a target string ({spec!r}); {_EXAMPLES}")


def _parse_classic(spec: str) -> dict:
    try:
        tokens = shlex.split(spec)
    except ValueError as err:
        raise TargetError(f"malformed target string {spec!r} ({err}); {_EXAMPLES}") from None
    if not tokens:
        raise TargetError(f"empty target string; {_EXAMPLES}")
    head, rest = tokens[0], tokens[1:]
    if head.startswith("-"):
        raise TargetError(
            f"target string {spec!r} must start with a kind or a preset name, "
            f"not an option; {_EXAMPLES}"
        )
    if "=" in head:
        raise TargetError(f"malformed target string {spec!r}; {_EXAMPLES}")
    if "/" in head and head in _tvm_tags():
        config: dict[str, Any] = {"tag": head}  # a TVM target tag, e.g. raspberry-pi/4b-aarch64
    else:
        _check_kind(head, spec, allow_preset=True)
        config = _preset_config(head) if head in PRESETS else {"kind": head}

    options = _llvm_options()
    for tok in rest:
        if not tok.startswith("-") or tok.lstrip("-") == "":
            raise TargetError(
                f"malformed target string {spec!r}: expected an option -key=value, got {tok!r}; "
                f"{_EXAMPLES}"
            )
        body = tok.lstrip("-")
        key, sep, value = body.partition("=")
        if key in ("kind", "host", "tag"):
            raise TargetError(
                f"option -{key} cannot be given in a target string ({spec!r}); {_EXAMPLES}"
            )
        if key not in options:
            valid = ", ".join(
                "-" + k for k in sorted(options) if k not in ("kind", "host", "tag")
            )
            raise TargetError(
                f"unknown option -{key} in target string {spec!r}; valid options: {valid}; "
                f"{_EXAMPLES}"
            )
        config[key] = _convert_option(key, value if sep else None, options[key], spec)
    return config


def _arch_of_triple(triple: str) -> str | None:
    arch = triple.split("-", 1)[0].lower()
    if arch in ("aarch64", "arm64", "aarch64_be"):
        return "aarch64" if arch != "aarch64_be" else None
    if arch in ("x86_64", "amd64"):
        return "x86_64"
    return None


def _normalize_config(config: dict, spec: Any) -> dict:
    """Validate and normalise a JSON-style target dict (kind, mattr, triple, mcpu)."""
    from tvm.target import codegen

    config = dict(config)
    if "tag" not in config or "kind" in config:
        _check_kind(config.get("kind"), spec)
    mattr = config.get("mattr")
    if mattr is not None:
        if isinstance(mattr, str):
            mattr = [m.strip() for m in mattr.split(",") if m.strip()]
        if not isinstance(mattr, (list, tuple)) or not all(isinstance(m, str) for m in mattr):
            raise TargetError(
                f"mattr of {spec!r} must be a list of features, "
                f"e.g. {{\"kind\": \"llvm\", \"mattr\": [\"+neon\", \"+dotprod\"]}}"
            )
        norm = []
        for m in mattr:
            m = m.strip()
            if not m:
                continue
            norm.append(m if m[0] in "+-" else "+" + m)
        config["mattr"] = norm
    triple = config.get("mtriple")
    if triple is not None:
        if not isinstance(triple, str) or _arch_of_triple(triple) is None:
            raise TargetError(
                f"unsupported -mtriple {triple!r} in {spec!r}: tvm_intlstm targets x86_64 and "
                f"64-bit ARM, e.g. \"llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72\""
            )
    mcpu = config.get("mcpu")
    if mcpu is not None:
        check_triple = triple or str(codegen.llvm_get_system_triple())
        if not isinstance(mcpu, str) or not codegen.llvm_is_valid_cpu(mcpu, check_triple):
            arch = _arch_of_triple(check_triple)
            hint = (
                '"llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72"'
                if arch == "aarch64"
                else '"llvm -mcpu=znver3"'
            )
            extra = ""
            if (
                isinstance(mcpu, str)
                and arch != "aarch64"
                and codegen.llvm_is_valid_cpu(mcpu, _A64)
            ):
                extra = f" ({mcpu} is an ARM CPU: add -mtriple={_A64})"
            raise TargetError(
                f"-mcpu={mcpu!r} is not a CPU LLVM knows for {check_triple} (from {spec!r})"
                f"{extra}; e.g. {hint} (tvm.target.codegen.llvm_get_cpu_archlist lists them)"
            )
    return config


def _make_target(config: dict, spec: Any):
    from tvm.target import Target

    try:
        return Target(config)
    except Exception as err:  # TVM raises ValueError / TVMError with its own text
        raise TargetError(f"invalid target {spec!r}: {err}; {_EXAMPLES}") from None


def _check_features_known(target, spec: Any) -> None:
    """Every '+feature' in -mattr must be a feature LLVM knows for the triple."""
    from tvm.target import codegen

    mattr = [str(m) for m in target.attrs.get("mattr", [])]
    wanted = [m[1:] for m in mattr if m.startswith("+")]
    if not wanted:
        return
    try:
        have = codegen.llvm_get_cpu_features(target)
    except Exception:  # pragma: no cover - LLVM without the target's backend
        return
    missing = [f for f in wanted if f not in have]
    if not missing:
        return
    # A '+feature' LLVM knows can still be off: a '-feature' it depends on switches it off too
    # (e.g. +avx512f,-avx2). Tell that apart from a misspelt or foreign feature.
    from tvm.target import Target

    plus_only = dict(target.export())
    plus_only["mattr"] = [m for m in mattr if m.startswith("+")]
    for key in ("feature", "keys"):
        plus_only.pop(key, None)
    try:
        known = {str(f) for f in codegen.llvm_get_cpu_features(Target(plus_only))}
    except Exception:  # pragma: no cover
        known = set()
    switched_off = [f for f in missing if f in known]
    unknown = [f for f in missing if f not in known]
    if switched_off:
        minus = [m for m in mattr if m.startswith("-")]
        raise TargetError(
            f"contradictory -mattr in {spec!r}: {', '.join('+' + f for f in switched_off)} "
            f"cannot be enabled together with {', '.join(minus) or 'the other features'} "
            f"(LLVM switches off every feature that depends on a disabled one); drop one of them"
        )
    if unknown:
        arch = _arch(target)
        hint = "+neon,+dotprod,+i8mm" if arch == "aarch64" else "+avx2,+fma,+avx512vnni"
        raise TargetError(
            f"-mattr feature(s) {', '.join('+' + f for f in unknown)} of {spec!r} are not "
            f"known to LLVM for {arch}; e.g. -mattr={hint}"
        )


def parse_target(spec: TargetSpec):
    """Turn any target specification users write into a validated ``tvm.target.Target``.

    ``spec`` may be a classic target string (``"llvm -mtriple=aarch64-linux-gnu
    -mattr=+neon,+dotprod"``; options ``-mcpu``, ``-mtriple``, ``-mattr`` (comma list),
    ``-num-cores`` and the other options of TVM's llvm target kind), a preset name optionally
    followed by options (``"rpi5"``, ``"rpi4 -num-cores=2"``), a TVM JSON dict or JSON string,
    a TVM target tag (``"raspberry-pi/4b-aarch64"``), or a ``tvm.target.Target``.
    Only kind ``llvm`` for x86_64 and aarch64 is accepted.

    Raises :class:`TargetError` (a ``ValueError``) naming the problem.
    """
    from tvm.target import Target

    if isinstance(spec, Target):
        kind = str(spec.kind.name)
        _check_kind(kind, str(spec))
        triple = spec.attrs.get("mtriple")
        if triple is not None and _arch_of_triple(str(triple)) is None:
            raise TargetError(
                f"unsupported -mtriple {str(triple)!r} in {spec}: tvm_intlstm targets x86_64 "
                f"and 64-bit ARM; {_EXAMPLES}"
            )
        return spec
    if isinstance(spec, dict):
        config = _normalize_config(spec, spec)
    elif isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise TargetError(f"malformed JSON target {spec!r}: {err}; {_EXAMPLES}") from None
            if not isinstance(loaded, dict):
                raise TargetError(f"JSON target {spec!r} must be an object; {_EXAMPLES}")
            config = _normalize_config(loaded, spec)
        else:
            config = _normalize_config(_parse_classic(text), spec)
    else:
        raise TargetError(
            f"a target must be a string, a dict or a tvm.target.Target, not "
            f"{type(spec).__name__}; {_EXAMPLES}"
        )
    target = _make_target(config, spec)
    _check_kind(str(target.kind.name), spec)
    triple = str(target.attrs.get("mtriple", ""))
    if triple and _arch_of_triple(triple) is None:
        raise TargetError(
            f"unsupported -mtriple {triple!r} in {spec!r}: tvm_intlstm targets x86_64 and "
            f"64-bit ARM, e.g. \"llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72\""
        )
    _check_features_known(target, spec)
    return target


# ----------------------------------------------------------------------------------------------
# Float semantics
# ----------------------------------------------------------------------------------------------

#: LLVM target options that relax IEEE float semantics.
FAST_MATH_OPTIONS = ("fast-math", "fast-math-reassoc", "fast-math-contract", "fast-math-arcp",
                     "fast-math-nnan", "fast-math-ninf", "fast-math-nsz")


def check_ieee_float(target) -> None:
    """Refuse a target that enables fast-math (any ``-fast-math*`` option): the float boundary of
    docs/integer_spec.md section 1 (input quantization) must stay IEEE float32, else rounding ties
    come out differently from the reference. Used by ``tvm_intlstm.compile`` and
    ``kernels.build_kernel``. Raises :class:`TargetError`."""
    for key in FAST_MATH_OPTIONS:
        if bool(target.attrs.get(key, False)):
            raise TargetError(
                f"target {target} enables -{key}; tvm_intlstm needs IEEE float32 for the "
                "input quantization (docs/integer_spec.md section 1): drop the fast-math option"
            )


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetFeatures:
    """What the kernels need to know about a CPU target."""

    arch: str  # "x86_64" or "aarch64"
    mcpu: str  # "-mcpu" value, "generic" when none was given
    mtriple: str
    num_cores: int | None
    has_avx2: bool = False
    has_avx512: bool = False  # AVX-512 F and BW (what int8 AVX-512 kernels need)
    has_vnni: bool = False  # AVX-512 VNNI (vpdpbusd on zmm), as TVM's x86 VNNI intrinsic uses
    has_avxvnni: bool = False  # AVX-VNNI (VEX-encoded vpdpbusd on ymm, Alder Lake, Zen 5)
    has_avx512vl: bool = False  # AVX-512 VL (EVEX forms, e.g. of vpdpbusd, on ymm)
    has_amx_int8: bool = False  # AMX-TILE + AMX-INT8 (tdpbssd on tile registers; Sapphire Rapids)
    has_neon: bool = False
    has_dotprod: bool = False  # sdot/udot
    has_i8mm: bool = False  # smmla/ummla/usdot

    @property
    def is_aarch64(self) -> bool:
        return self.arch == "aarch64"

    @property
    def is_x86(self) -> bool:
        return self.arch == "x86_64"


# Fallback knowledge of well-known CPUs (LLVM's own tables are used first; tests check that
# this table agrees with them).  Values: LLVM feature names implied by the -mcpu.
_KNOWN_CPU_FEATURES: dict[str, frozenset[str]] = {
    # aarch64
    "generic": frozenset({"neon"}),
    "cortex-a53": frozenset({"neon"}),
    "cortex-a55": frozenset({"neon", "dotprod"}),
    "cortex-a57": frozenset({"neon"}),
    "cortex-a72": frozenset({"neon"}),
    "cortex-a73": frozenset({"neon"}),
    "cortex-a75": frozenset({"neon", "dotprod"}),
    "cortex-a76": frozenset({"neon", "dotprod"}),
    "cortex-a77": frozenset({"neon", "dotprod"}),
    "cortex-a78": frozenset({"neon", "dotprod"}),
    "cortex-x1": frozenset({"neon", "dotprod"}),
    "cortex-a710": frozenset({"neon", "dotprod", "i8mm"}),
    "cortex-x2": frozenset({"neon", "dotprod", "i8mm"}),
    "neoverse-n1": frozenset({"neon", "dotprod"}),
    "neoverse-v1": frozenset({"neon", "dotprod", "i8mm"}),
    "neoverse-n2": frozenset({"neon", "dotprod", "i8mm"}),
    "apple-m1": frozenset({"neon", "dotprod"}),
    # x86_64
    "x86-64": frozenset(),
    "haswell": frozenset({"avx2"}),
    "skylake": frozenset({"avx2"}),
    "znver1": frozenset({"avx2"}),
    "znver2": frozenset({"avx2"}),
    "znver3": frozenset({"avx2"}),
    "znver4": frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni"}),
    "skylake-avx512": frozenset({"avx2", "avx512f", "avx512bw"}),
    "cascadelake": frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni"}),
    "icelake-server": frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni"}),
    "sapphirerapids": frozenset({"avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx-tile",
                                 "amx-int8"}),
    "alderlake": frozenset({"avx2", "avxvnni"}),
}

# features implied by others (for the fallback path only)
_IMPLIED = {"avx512bw": {"avx512f", "avx2"}, "avx512f": {"avx2"}, "avx512vnni": {"avx512f"},
            "i8mm": {"neon"}, "dotprod": {"neon"}}


def _arch(target) -> str:
    triple = target.attrs.get("mtriple")
    if triple is None:
        from tvm.target import codegen

        triple = codegen.llvm_get_system_triple()
    arch = _arch_of_triple(str(triple))
    if arch is None:
        raise TargetError(f"unsupported target triple {str(triple)!r} in {target}")
    return arch


def _fallback_features(arch: str, mcpu: str, mattr: list[str]) -> set[str]:
    feats = set(_KNOWN_CPU_FEATURES.get(mcpu, frozenset({"neon"} if arch == "aarch64" else ())))
    if arch == "aarch64":
        feats.add("neon")
    for m in mattr:
        name = m[1:]
        if m.startswith("+"):
            feats.add(name)
            feats |= _IMPLIED.get(name, set())
        elif m.startswith("-"):
            feats.discard(name)
    return feats


def target_features(target: TargetSpec) -> TargetFeatures:
    """The CPU features of a target (anything :func:`parse_target` accepts).

    Derived from ``-mattr`` together with what ``-mcpu`` implies (e.g. cortex-a76, cortex-x1 and
    neoverse-n1 imply dotprod, cortex-a72 and cortex-a53 do not; znver3 implies AVX2 without
    AVX-512); a ``-mattr=-dotprod`` removes a feature the CPU would have.
    """
    from tvm.target import codegen

    target = parse_target(target)
    arch = _arch(target)
    mcpu = str(target.attrs.get("mcpu", "generic"))
    mattr = [str(m) for m in target.attrs.get("mattr", [])]
    triple = str(target.attrs.get("mtriple", codegen.llvm_get_system_triple()))
    try:
        feats = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # pragma: no cover - LLVM without that backend
        feats = _fallback_features(arch, mcpu, mattr)
    num_cores = target.attrs.get("num-cores")
    common = dict(
        arch=arch,
        mcpu=mcpu,
        mtriple=triple,
        num_cores=int(num_cores) if num_cores is not None else None,
    )
    if arch == "x86_64":
        return TargetFeatures(
            **common,
            has_avx2="avx2" in feats,
            has_avx512="avx512f" in feats and "avx512bw" in feats,
            has_vnni="avx512vnni" in feats,
            has_avxvnni="avxvnni" in feats,
            has_avx512vl="avx512vl" in feats,
            has_amx_int8="amx-tile" in feats and "amx-int8" in feats,
        )
    return TargetFeatures(
        **common,
        has_neon="neon" in feats,
        has_dotprod="dotprod" in feats,
        has_i8mm="i8mm" in feats,
    )


# ----------------------------------------------------------------------------------------------
# Can this machine run code built for a target?
# ----------------------------------------------------------------------------------------------

# Instruction-set features whose instructions LLVM may emit for a target (in tvm_intlstm's kernels
# or in its own vectorized code), as LLVM names them -> as Linux names them in /proc/cpuinfo
# ("flags" on x86, "Features" on aarch64). A module built for a target with one of these that the
# CPU lacks dies with SIGILL (e.g. znver3 builds use the AMD-only sse4a `insertq`). Features that
# only tune scheduling, or that compilers never emit on their own, are not checked.
_X86_CPUINFO = {
    "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx",
    "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm",
    "movbe": "movbe", "sse4a": "sse4a", "fma4": "fma4", "xop": "xop", "tbm": "tbm",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512fp16": "avx512_fp16",
    "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avxvnni": "avx_vnni",
    "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    "sse3": "pni", "adx": "adx", "sha": "sha_ni", "gfni": "gfni", "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
}
_A64_CPUINFO = {
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "i8mm": "i8mm", "bf16": "bf16",
    "sve": "sve", "sve2": "sve2",
}


# flags an in-process emulator adds to this machine's while it runs (runtime/amx_trap.py:
# amx_tile and amx_int8 inside `emulate_amx()`, whose SIGILL handler carries out tile instructions)
_EMULATED_HOST_FLAGS: set[str] = set()


def host_cpu_features(cpuinfo: str | None = None) -> set[str] | None:
    """The instruction-set flags of this machine's CPU as /proc/cpuinfo lists them (x86 "flags",
    aarch64 "Features"), or None when they cannot be read. `cpuinfo` overrides the file's text
    (then emulated flags are not added)."""
    extra = set()
    if cpuinfo is None:
        extra = set(_EMULATED_HOST_FLAGS)
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return set(value.split()) | extra
    return None


def missing_host_features(target: TargetSpec, cpuinfo: str | None = None) -> list[str] | None:
    """LLVM feature names that code built for `target` may use and this CPU lacks ([] if none),
    or None when the question does not apply (the target is for another architecture, or the
    host's features cannot be read)."""
    from tvm.target import codegen

    target = parse_target(target)
    arch = _arch(target)
    if cpuinfo is None and arch != host_arch():
        return None
    table = _X86_CPUINFO if arch == "x86_64" else _A64_CPUINFO
    have = host_cpu_features(cpuinfo)
    if have is None:
        return None
    try:
        wanted = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # pragma: no cover - LLVM without that backend
        return None
    return sorted(f for f in wanted if f in table and table[f] not in have)


def check_runs_on_host(target: TargetSpec, what: str = "this module") -> None:
    """Raise :class:`TargetError` when code built for `target` needs CPU features this machine
    lacks (it would die with SIGILL). Does nothing for other architectures (cross builds)."""
    missing = missing_host_features(target)
    if missing:
        target = parse_target(target)
        raise TargetError(
            f"{what} was built for {target_to_string(target)}, which needs CPU feature(s) "
            f"{', '.join(missing)} that this CPU lacks (running it would die with an illegal "
            f"instruction); compile it for this machine (target \"host\" or \"llvm\") or run it "
            f"on a CPU that has them"
        )


def is_aarch64(target: TargetSpec) -> bool:
    """True when the target generates 64-bit ARM code."""
    return _arch(parse_target(target)) == "aarch64"


def is_x86(target: TargetSpec) -> bool:
    """True when the target generates x86-64 code."""
    return _arch(parse_target(target)) == "x86_64"


def host_arch() -> str:
    """This machine's architecture as "x86_64" or "aarch64" (or whatever uname says)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def target_to_dict(target: TargetSpec) -> dict:
    """The user-relevant options of a target as a plain JSON-able dict (no derived
    ``feature.*``/``keys`` entries): ``parse_target(target_to_dict(t))`` rebuilds it."""
    target = parse_target(target)
    out: dict[str, Any] = {"kind": str(target.kind.name)}
    for key in ("mtriple", "mcpu", "mattr", "num-cores", "mabi", "mfloat-abi", "opt-level",
                "vector-width", "libs", "device", "model"):
        if key in target.attrs:
            val = target.attrs[key]
            if key in ("mattr", "libs"):
                val = [str(v) for v in val]
            elif key in ("num-cores", "opt-level", "vector-width"):
                val = int(val)
            else:
                val = str(val)
            out[key] = val
    return out


def target_to_string(target: TargetSpec) -> str:
    """The classic string form, e.g. ``"llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76
    -mattr=+neon,+dotprod -num-cores=4"`` (accepted back by :func:`parse_target`)."""
    d = target_to_dict(target)
    parts = [d.pop("kind")]
    for key, val in d.items():
        if isinstance(val, list):
            val = ",".join(val)
        parts.append(f"-{key}={val}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Cross compilation and export
# ----------------------------------------------------------------------------------------------


def _which(cmd: str) -> str | None:
    if os.sep in cmd:
        return cmd if os.path.isfile(cmd) and os.access(cmd, os.X_OK) else None
    return shutil.which(cmd)


def find_cross_compiler(target: TargetSpec) -> str | None:
    """The C++ compiler that links a module built for ``target`` on this machine.

    For aarch64 targets: ``$TVM_INTLSTM_CROSS_CXX`` if set, else ``aarch64-linux-gnu-g++``
    (on an aarch64 machine, the native ``g++`` is accepted as well).  For x86_64 targets on an
    x86_64 machine: ``None``, meaning TVM's default host compiler (``g++`` or ``$CXX``).
    Returns an absolute path.  Raises :class:`ToolchainError` naming the packages to install.
    """
    arch = _arch(parse_target(target))
    host = host_arch()
    override = os.environ.get(CROSS_CXX_ENV)
    if arch == host and not override:
        if arch == "aarch64":
            found = _which(_DEFAULT_AARCH64_CXX) or _which("g++")
            if found:
                return found
        else:
            return None
    if override:
        found = _which(override)
        if found is None:
            raise ToolchainError(
                f"{CROSS_CXX_ENV}={override!r} is not an executable on PATH; unset it to use "
                f"{_DEFAULT_AARCH64_CXX}, or install the cross compiler: {_ARM_APT_HINT}"
            )
        return found
    if arch == "aarch64":
        found = _which(_DEFAULT_AARCH64_CXX)
        if found is None:
            raise ToolchainError(
                f"the aarch64 cross compiler {_DEFAULT_AARCH64_CXX} is not installed; on "
                f"Debian/Ubuntu run: {_ARM_APT_HINT} (or run .ci/install_arm.sh), or point "
                f"{CROSS_CXX_ENV} at another aarch64 C++ compiler"
            )
        return found
    found = _which(_DEFAULT_X86_64_CXX)
    if found is None:
        raise ToolchainError(
            f"cannot link x86_64 code on this {host} machine: install "
            f"g++-x86-64-linux-gnu or set {CROSS_CXX_ENV}"
        )
    return found


def export_library(executable, path: str | os.PathLike, target: TargetSpec | None = None) -> str:
    """Export a compiled module (``tvm.compile`` result or runtime Module) as a shared library
    for ``target``: with the cross compiler for aarch64 (:func:`find_cross_compiler`), with the
    host compiler otherwise.  ``target=None`` means the host.  Returns the path written."""
    from tvm.support import cc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cxx = find_cross_compiler(target) if target is not None else None
    if cxx is None:
        executable.export_library(str(path))
    else:
        executable.export_library(str(path), fcompile=cc.cross_compiler(cxx))
    return str(path)
