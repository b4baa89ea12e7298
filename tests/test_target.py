"""tvm_intlstm.target: parsing of every target form, CPU features, errors, export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_intlstm.target import (
    CROSS_CXX_ENV,
    PRESETS,
    TargetError,
    TargetFeatures,
    ToolchainError,
    export_library,
    find_cross_compiler,
    is_aarch64,
    is_x86,
    list_presets,
    parse_target,
    target_features,
    target_to_dict,
    target_to_string,
)

REPO = Path(__file__).resolve().parents[1]
A64 = "aarch64-linux-gnu"

CLASSIC = [
    "llvm",
    "llvm -mcpu=znver3",
    "llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod",
    "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72",
    "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76 -mattr=+neon,+dotprod -num-cores=4",
    "llvm  -mcpu=skylake-avx512   -num-cores=8",
    "llvm --mcpu=cascadelake",  # double dash accepted
    "llvm -mtriple=x86_64-linux-gnu -mattr=+avx2,+fma",
]
DICTS = [
    {"kind": "llvm"},
    {"kind": "llvm", "mcpu": "znver3"},
    {"kind": "llvm", "mtriple": A64, "mattr": ["+neon", "+dotprod"]},
    {"kind": "llvm", "mtriple": A64, "mcpu": "cortex-a76", "num-cores": 4},
    {"kind": "llvm", "mtriple": A64, "mattr": "+neon,+i8mm"},  # comma string accepted
]


@T.prim_func
def _add_one(A: T.Buffer((16,), "int32"), B: T.Buffer((16,), "int32")):
    T.func_attr({"global_symbol": "add_one"})
    for i in range(16):
        B[i] = A[i] + 1


@tvm.script.ir_module
class _RelaxMod:
    @R.function
    def main(a: R.Tensor((4, 8), "int8"), b: R.Tensor((8, 3), "int8")):
        with R.dataflow():
            y = R.matmul(a, b, out_dtype="int32")
            z = R.add(y, R.const(1, "int32"))
            R.output(z)
        return z


def _builds(target) -> None:
    """The target really compiles a TIR and a Relax function."""
    ex = tvm.compile(_add_one, target=target)
    assert ex is not None
    ex = tvm.compile(_RelaxMod, target=target)
    assert ex is not None


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec", CLASSIC)
def test_classic_strings(spec):
    t = parse_target(spec)
    assert isinstance(t, tvm.target.Target)
    assert t.kind.name == "llvm"
    _builds(t)


def test_classic_string_options_land_in_attrs():
    t = parse_target(
        "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76 -mattr=+neon,+dotprod -num-cores=4"
    )
    assert str(t.attrs["mtriple"]) == A64
    assert str(t.attrs["mcpu"]) == "cortex-a76"
    assert [str(m) for m in t.attrs["mattr"]] == ["+neon", "+dotprod"]
    assert int(t.attrs["num-cores"]) == 4
    t = parse_target("llvm -mcpu=znver3")
    assert str(t.attrs["mcpu"]) == "znver3"
    # bare features get a '+'
    t = parse_target("llvm -mtriple=aarch64-linux-gnu -mattr=neon,dotprod")
    assert [str(m) for m in t.attrs["mattr"]] == ["+neon", "+dotprod"]


@pytest.mark.parametrize("spec", DICTS, ids=lambda d: json.dumps(d))
def test_json_dicts(spec):
    t = parse_target(spec)
    assert t.kind.name == "llvm"
    for key in ("mcpu", "mtriple", "num-cores"):
        if key in spec:
            assert str(t.attrs[key]) == str(spec[key])
    _builds(t)


def test_json_string_and_target_passthrough():
    t = parse_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}')
    assert str(t.attrs["mcpu"]) == "cortex-a72"
    t2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    assert parse_target(t2) is t2


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_parse_and_build(name):
    t = parse_target(name)
    assert t.kind.name == "llvm"
    _builds(t)
    # round trip through the classic string form
    again = parse_target(target_to_string(t))
    assert target_to_dict(again) == target_to_dict(t)


def test_tvm_tags():
    t = parse_target("raspberry-pi/4b-aarch64")
    assert str(t.attrs["mcpu"]) == "cortex-a72" and is_aarch64(t)
    t = parse_target("arm/rasp4b64 -num-cores=2")
    assert int(t.attrs["num-cores"]) == 2 and not target_features(t).has_dotprod
    t = parse_target({"tag": "arm/rasp4b64", "mattr": ["+neon", "+dotprod"]})
    assert target_features(t).has_dotprod
    with pytest.raises(TargetError, match="unsupported -mtriple 'armv7l"):
        parse_target("arm/rasp3b")  # 32-bit ARM
    with pytest.raises(TargetError, match="not supported"):
        parse_target("nvidia/nvidia-a100")


def test_preset_with_overrides():
    t = parse_target("rpi4 -num-cores=2")
    assert str(t.attrs["mcpu"]) == "cortex-a72" and int(t.attrs["num-cores"]) == 2
    t = parse_target("rpi5 -mattr=+neon")
    assert target_features(t).has_dotprod  # cortex-a76 still implies dotprod
    t = parse_target("rpi5 -mattr=+neon,-dotprod")
    assert not target_features(t).has_dotprod


def test_host_preset_is_this_machine():
    from tvm.target import codegen

    t = parse_target("host")
    feats = target_features(t)
    assert feats.arch in ("x86_64", "aarch64")
    cpu = str(codegen.llvm_get_system_cpu())
    if cpu != "generic":
        assert feats.mcpu == cpu
    assert feats.num_cores and feats.num_cores >= 1
    # host code runs here
    ex = tvm.compile(_add_one, target=t)
    a = tvm.runtime.tensor(np.arange(16, dtype="int32"))
    b = tvm.runtime.tensor(np.zeros(16, dtype="int32"))
    ex["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(16) + 1)


def test_presets_documented():
    doc = (REPO / "docs" / "arm.md").read_text()
    for name in PRESETS:
        assert f"`{name}`" in doc, f"preset {name} missing from docs/arm.md"
    assert set(list_presets()) == set(PRESETS)


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize(
    "spec, arch, expected",
    [
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76", "aarch64",
         dict(has_neon=True, has_dotprod=True, has_i8mm=False)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a78", "aarch64",
         dict(has_dotprod=True)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-x1", "aarch64", dict(has_dotprod=True)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1", "aarch64", dict(has_dotprod=True)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72", "aarch64",
         dict(has_neon=True, has_dotprod=False, has_i8mm=False)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a53", "aarch64",
         dict(has_neon=True, has_dotprod=False)),
        ("llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod", "aarch64",
         dict(has_neon=True, has_dotprod=True, has_i8mm=False)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72 -mattr=+dotprod", "aarch64",
         dict(has_dotprod=True)),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76 -mattr=-dotprod", "aarch64",
         dict(has_dotprod=False)),
        ("aarch64-i8mm", "aarch64", dict(has_neon=True, has_dotprod=True, has_i8mm=True)),
        ("rpi4", "aarch64", dict(has_neon=True, has_dotprod=False, has_i8mm=False)),
        ("rpi5", "aarch64", dict(has_neon=True, has_dotprod=True, has_i8mm=False)),
        ("rk3588", "aarch64", dict(has_dotprod=True)),
        ("llvm -mcpu=znver3", "x86_64", dict(has_avx2=True, has_avx512=False, has_vnni=False)),
        ("llvm", "x86_64", dict(has_avx2=False, has_avx512=False)),
        ("llvm -mattr=+avx2", "x86_64", dict(has_avx2=True, has_avx512=False)),
        ("x86-avx2", "x86_64", dict(has_avx2=True, has_avx512=False, has_vnni=False)),
        ("x86-avx512", "x86_64", dict(has_avx2=True, has_avx512=True, has_vnni=False)),
        ("x86-vnni", "x86_64", dict(has_avx2=True, has_avx512=True, has_vnni=True)),
        ("llvm -mcpu=alderlake", "x86_64", dict(has_avx2=True, has_avx512=False, has_avxvnni=True)),
    ],
)
def test_features(spec, arch, expected):
    if arch == "x86_64" and spec == "llvm":
        # plain "llvm" is the host triple: only meaningful on an x86 machine
        from tvm_intlstm.target import host_arch

        if host_arch() != "x86_64":
            arch = host_arch()
            expected = {}
    f = target_features(spec)
    assert isinstance(f, TargetFeatures)
    assert f.arch == arch
    for key, val in expected.items():
        assert getattr(f, key) == val, (spec, key, f)
    if arch == "aarch64":
        assert not (f.has_avx2 or f.has_avx512 or f.has_vnni)
        assert is_aarch64(spec) and not is_x86(spec)
    else:
        assert not (f.has_neon or f.has_dotprod or f.has_i8mm)
        assert is_x86(spec) and not is_aarch64(spec)


def test_features_frozen_and_fields():
    f = target_features("rpi5")
    assert f.mcpu == "cortex-a76" and f.num_cores == 4 and f.mtriple == A64
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        f.has_dotprod = False  # type: ignore[misc]
    assert target_features("llvm -mtriple=aarch64-linux-gnu").mcpu == "generic"


def test_fallback_cpu_table_agrees_with_llvm():
    """The built-in table (used only when LLVM cannot answer) must say what LLVM says."""
    from tvm_intlstm.target import _KNOWN_CPU_FEATURES, _fallback_features

    arm_cpus = {c for c, f in _KNOWN_CPU_FEATURES.items() if "neon" in f}
    for cpu in _KNOWN_CPU_FEATURES:
        arch = "aarch64" if cpu in arm_cpus else "x86_64"
        triple = A64 if arch == "aarch64" else "x86_64-linux-gnu"
        spec = {"kind": "llvm", "mtriple": triple}
        if cpu not in ("generic", "x86-64"):
            spec["mcpu"] = cpu
        got = target_features(spec)
        table = _fallback_features(arch, cpu, [])
        if arch == "aarch64":
            assert got.has_dotprod == ("dotprod" in table), cpu
            assert got.has_i8mm == ("i8mm" in table), cpu
        else:
            assert got.has_avx2 == ("avx2" in table), cpu
            assert got.has_avx512 == ("avx512bw" in table), cpu
            assert got.has_vnni == ("avx512vnni" in table), cpu
            assert got.has_avxvnni == ("avxvnni" in table), cpu
            assert got.has_amx_int8 == ({"amx-tile", "amx-int8"} <= table), cpu


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("cuda", r"kind 'cuda' is not supported"),
        ({"kind": "cuda"}, r"kind 'cuda' is not supported"),
        ("opencl -device=mali", r"not supported"),
        ("foo", r"unknown target kind or preset 'foo'"),
        ("rpi9", r"unknown target kind or preset 'rpi9'.*rpi4"),
        ("", r"empty target string"),
        ("   ", r"empty target string"),
        ("-mcpu=znver3", r"must start with a kind"),
        ("llvm -mcpu", r"-mcpu .* needs a value"),
        ("llvm -mcpu=", r"-mcpu .* needs a value"),
        ("llvm mcpu=znver3", r"expected an option -key=value"),
        ("llvm -foo=1", r"unknown option -foo.*-mcpu"),
        ("llvm -num-cores=four", r"wants an integer"),
        ("llvm -mattr=", r"needs a value"),
        ("llvm -mattr=,", r"empty list"),
        ("llvm -mcpu='unterminated", r"malformed target string"),
        ("llvm=x", r"malformed target string"),
        ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a999", r"cortex-a999.*not a CPU"),
        ("llvm -mcpu=cortex-a72", r"ARM CPU: add -mtriple=aarch64-linux-gnu"),
        ("llvm -mcpu=notacpu", r"not a CPU LLVM knows"),
        ("llvm -mtriple=armv7l-linux-gnueabihf", r"unsupported -mtriple"),
        ("llvm -mtriple=riscv64-linux-gnu", r"unsupported -mtriple"),
        ("llvm -mtriple=aarch64-linux-gnu -mattr=+dotpord", r"\+dotpord .*not known"),
        ("llvm -mattr=+avx9000", r"\+avx9000 .*not known"),
        ({"mcpu": "znver3"}, r"has no kind"),
        ({"kind": "rpi4"}, r"preset name"),
        ({"kind": "llvm", "mcpu": "notacpu"}, r"not a CPU"),
        ({"kind": "llvm", "bogus-key": 1}, r"invalid target"),
        ({"kind": "llvm", "mattr": 5}, r"mattr .* must be a list"),
        ('{"kind": "llvm", ', r"malformed JSON"),
        ("[1, 2]", r"unknown target kind|malformed"),
        (42, r"must be a string, a dict or a tvm.target.Target"),
        (None, r"must be a string"),
    ],
)
def test_errors(spec, pattern):
    with pytest.raises(TargetError, match=pattern) as info:
        parse_target(spec)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    # every message shows something valid to write
    assert re.search(r'e\.g\.|"llvm', msg), msg


def test_target_object_of_other_kind_rejected():
    with pytest.raises(TargetError, match="not supported"):
        parse_target(tvm.target.Target({"kind": "c"}))
    with pytest.raises(TargetError):
        target_features(tvm.target.Target({"kind": "c"}))


# ---------------------------------------------------------------------------- export


def test_find_cross_compiler(monkeypatch):
    monkeypatch.delenv(CROSS_CXX_ENV, raising=False)
    cxx = find_cross_compiler("rpi4")
    assert cxx is not None and Path(cxx).is_file()
    from tvm_intlstm.target import host_arch

    if host_arch() == "x86_64":
        assert "aarch64-linux-gnu-g++" in Path(cxx).name
        assert find_cross_compiler("llvm -mcpu=znver3") is None
    # override
    monkeypatch.setenv(CROSS_CXX_ENV, cxx)
    assert find_cross_compiler("rpi5") == cxx
    monkeypatch.setenv(CROSS_CXX_ENV, "no-such-aarch64-g++")
    with pytest.raises(ToolchainError, match="TVM_INTLSTM_CROSS_CXX.*g\\+\\+-aarch64-linux-gnu"):
        find_cross_compiler("rpi5")


def test_find_cross_compiler_missing_names_packages(monkeypatch):
    from tvm_intlstm import target as tg

    monkeypatch.delenv(CROSS_CXX_ENV, raising=False)
    monkeypatch.setattr(tg, "host_arch", lambda: "x86_64")
    monkeypatch.setattr(tg, "_which", lambda cmd: None)
    with pytest.raises(
        ToolchainError, match="apt-get install g\\+\\+-aarch64-linux-gnu libc6-dev-arm64-cross"
    ):
        find_cross_compiler("llvm -mtriple=aarch64-linux-gnu")


def _elf_machine(path) -> int:
    head = Path(path).read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


def test_export_library_host_runs(tmp_path):
    t = parse_target("host")
    ex = tvm.compile(_RelaxMod, target=t)
    path = export_library(ex, tmp_path / "host.so", t)
    lib = tvm.runtime.load_module(path)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (4, 8), dtype=np.int8)
    b = rng.integers(-128, 128, (8, 3), dtype=np.int8)
    out = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    np.testing.assert_array_equal(out, a.astype(np.int32) @ b.astype(np.int32) + 1)


def test_export_library_aarch64_is_arm_elf(tmp_path):
    t = parse_target("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72")
    ex = tvm.compile(_RelaxMod, target=t)
    path = export_library(ex, tmp_path / "sub" / "arm.so", t)
    assert Path(path).is_file()
    assert _elf_machine(path) == 183  # EM_AARCH64
