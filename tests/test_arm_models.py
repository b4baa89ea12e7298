"""Whole models on aarch64: compiled for a Raspberry Pi 4 (cortex-a72, no dotprod), a
Raspberry Pi 5 (cortex-a76, dotprod) and a generic i8mm core (NEON + dotprod + i8mm: the smmla
GEMMs), exported (cross-linked), run under qemu-aarch64 for two (batch, seq) shapes from one
build, and compared bit for bit with the x86 build and the numpy reference.

Needs the tools of .ci/install_arm.sh (cross g++, binutils, qemu-user) and, the first time,
PyPI access for the aarch64 TVM runtime (cached under $TVM_INTLSTM_CACHE).  Compiling is the
slow part (6 builds, about 10-15 s each on a 2-core machine): every build is made once per
module (module-scoped fixtures) and all tests reuse it.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.compiler import compile as til_compile
from tvm_intlstm.runtime.emulate import (
    EmulationError,
    instruction_count,
    run_emulated,
)
from tvm_intlstm.target import target_features

#: the TIR names of the dotprod / i8mm intrinsics the kernels use (tvm_intlstm/kernels/_gemm.py)
SDOT_INTRINSIC = "llvm.aarch64.neon.sdot"
SMMLA_INTRINSIC = "llvm.aarch64.neon.smmla"
#: the aarch64 builds: preset -> qemu CPU models that must run it bit-exactly
ARM_BUILDS = {"rpi4": ("cortex-a53", "cortex-a72"), "rpi5": ("cortex-a76",),
              "aarch64-i8mm": ("max",)}
#: two (batch, seq) shapes per build: more rows than a GEMM row block (16), and a single step
SHAPES = ((3, 11), (2, 1))


class TokenBiLSTM(nn.Module):
    """embedding -> 2-layer bidirectional LSTM (batch_first) -> residual h + lstm2(h) ->
    final linear (int32 logits).  Sizes with GEMM remainders: K = 20, 40 (16-wide chunks +
    rest), O = 37 (8-row tiles + rest)."""

    V = 37

    def __init__(self, E=20, H=20):
        super().__init__()
        self.embed = nn.Embedding(self.V, E)
        self.lstm = nn.LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True)
        self.lstm2 = nn.LSTM(2 * H, 2 * H, batch_first=True)
        self.head = nn.Linear(2 * H, self.V)

    def forward(self, ids):
        h, _ = self.lstm(self.embed(ids))
        r, _ = self.lstm2(h)
        return self.head(h + r)


class FeatureStackedLSTM(nn.Module):
    """float features (time-major) -> 2-layer unidirectional LSTM -> hidden linear -> final
    linear."""

    F = 12

    def __init__(self, H=32):
        super().__init__()
        self.lstm = nn.LSTM(self.F, H, num_layers=2)
        self.mid = nn.Linear(H, 24)
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(self.mid(h))


def _token_inputs(batch, seq, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TokenBiLSTM.V, (batch, seq), dtype=np.int64)
    ids.flat[0] = 0
    ids.flat[-1] = TokenBiLSTM.V - 1
    return ids


def _feature_inputs(batch, seq, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((seq, batch, FeatureStackedLSTM.F)) * 2).astype(np.float32)
    x.flat[0] = 1e3  # saturates the input quantizer
    x.flat[-1] = -1e3
    return x


MODELS = {
    "token_bilstm": (
        TokenBiLSTM,
        lambda: [torch.randint(0, TokenBiLSTM.V, (3, 9)) for _ in range(3)],
        _token_inputs,
    ),
    "feature_stacked": (
        FeatureStackedLSTM,
        lambda: [torch.randn(7, 2, FeatureStackedLSTM.F) for _ in range(3)],
        _feature_inputs,
    ),
}

#: compile/export seconds per (model, target) and sdot counts, printed at the end of the module
TIMINGS: dict[str, float | int] = {}


class Build:
    """One model: its quantized form, the x86 build and the two exported aarch64 libraries."""

    def __init__(self, name, q, x86, libs, ir_text, inputs):
        self.name = name
        self.q = q
        self.x86 = x86
        self.libs = libs
        self.ir_text = ir_text
        self.make_inputs = inputs

    def cases(self):
        """(inputs, expected) for every shape; expected = x86 build == reference (asserted)."""
        ref = til.reference(self.q)
        out = []
        for i, (batch, seq) in enumerate(SHAPES):
            x = self.make_inputs(batch, seq, seed=100 + i)
            y_x86 = self.x86(x)
            y_ref = ref(x)
            assert y_x86.dtype == np.int32
            np.testing.assert_array_equal(y_x86, y_ref)
            out.append((x, y_x86))
        return out


@pytest.fixture(scope="session")
def arm_tools():
    missing = [t for t in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump", "qemu-aarch64")
               if shutil.which(t) is None]
    assert not missing, f"missing {missing}: run `bash .ci/install_arm.sh`"


@pytest.fixture(scope="module", params=list(MODELS))
def build(request, tmp_path_factory, arm_tools):
    name = request.param
    cls, calib, inputs = MODELS[name]
    torch.manual_seed(0)
    q = til.quantize(cls().eval(), calib())
    example = (torch.as_tensor(inputs(2, 5, seed=0)),)
    out = tmp_path_factory.mktemp(f"arm_{name}")
    t0 = time.perf_counter()
    x86 = til_compile(q, "host", example, verbose=False)
    TIMINGS[f"{name} host compile"] = time.perf_counter() - t0
    libs, ir_text = {}, {}
    for preset in ARM_BUILDS:
        t0 = time.perf_counter()
        cm = til_compile(q, preset, example, verbose=False)
        t1 = time.perf_counter()
        libs[preset] = cm.export_library(out / f"{name}_{preset}.so")
        TIMINGS[f"{name} {preset} compile"] = t1 - t0
        TIMINGS[f"{name} {preset} export"] = time.perf_counter() - t1
        ir_text[preset] = cm.ir_module.script(show_meta=False)
    TIMINGS[f"{name} rpi5 sdot count"] = instruction_count(libs["rpi5"], "sdot")
    TIMINGS[f"{name} i8mm smmla count"] = instruction_count(libs["aarch64-i8mm"], "smmla")
    yield Build(name, q, x86, libs, ir_text, inputs)


@pytest.fixture(scope="module", autouse=True)
def _report_timings():
    yield
    if TIMINGS:
        print("\n[test_arm_models] build times (s): " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in TIMINGS.items()))


def _run_all_shapes(build, preset, cpu):
    for x, want in build.cases():
        got = run_emulated(build.libs[preset], [x], cpu=cpu, verbose=False)
        assert len(got) == 1, f"expected one output, got {len(got)}"
        assert got[0].dtype == np.int32 and got[0].shape == want.shape
        np.testing.assert_array_equal(
            got[0], want, err_msg=f"{build.name}: {preset} build on {cpu}, input {x.shape}")


# ----------------------------------------------------------------------------------------------
# bit-exact on every emulated CPU the build is meant for
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpu", ARM_BUILDS["rpi4"])
def test_rpi4_build_bit_exact(build, cpu):
    """The cortex-a72 build (no dotprod) on an A53 and an A72: == x86 build == reference."""
    _run_all_shapes(build, "rpi4", cpu)


def test_rpi5_build_bit_exact_on_cortex_a76(build):
    """The cortex-a76 (+dotprod) build on an A76: == x86 build == reference."""
    _run_all_shapes(build, "rpi5", "cortex-a76")


# ----------------------------------------------------------------------------------------------
# instructions
# ----------------------------------------------------------------------------------------------


def test_rpi4_build_contains_no_dotprod(build):
    """No sdot/udot anywhere in the cortex-a72 build, neither asked for by the kernels nor
    introduced by LLVM (it runs on cortex-a53, test above)."""
    assert not target_features("rpi4").has_dotprod
    assert SDOT_INTRINSIC not in build.ir_text["rpi4"]
    for mnemonic in ("sdot", "udot", "usdot", "smmla"):
        assert instruction_count(build.libs["rpi4"], mnemonic) == 0, mnemonic


def test_rpi5_build_contains_sdot_iff_kernels_emit_it(build):
    """The dotprod build's machine code has sdot exactly when the lowered TIR calls the sdot
    intrinsic (and the kernels do have a dotprod path: they must use it for rpi5)."""
    kernels_emit = SDOT_INTRINSIC in build.ir_text["rpi5"]
    n = instruction_count(build.libs["rpi5"], "sdot")
    assert (n > 0) == kernels_emit, (
        f"{build.name}: the lowered TIR {'calls' if kernels_emit else 'does not call'} "
        f"{SDOT_INTRINSIC} but the rpi5 library has {n} sdot instructions")
    assert kernels_emit, f"{build.name}: the kernels emit no sdot for a +dotprod target"


@pytest.mark.parametrize("cpu", ARM_BUILDS["rpi4"])
def test_rpi5_build_sigill_without_dotprod(build, cpu):
    """The dotprod build really executes sdot: on an A53/A72 (no dotprod) it dies with SIGILL,
    reported as EmulationError(illegal_instruction=True)."""
    assert SDOT_INTRINSIC in build.ir_text["rpi5"], "the kernels emit no sdot for rpi5"
    x, _ = build.cases()[0]
    with pytest.raises(EmulationError, match="SIGILL") as info:
        run_emulated(build.libs["rpi5"], [x], cpu=cpu, verbose=False)
    assert info.value.illegal_instruction
    assert info.value.cpu == cpu


def test_i8mm_build_bit_exact_on_max(build):
    """The i8mm build (smmla GEMMs for the batched products) on qemu's `max` CPU: == x86 build ==
    reference, for an odd and an even number of rows."""
    _run_all_shapes(build, "aarch64-i8mm", "max")


def test_i8mm_build_uses_smmla_and_needs_i8mm(build):
    """The kernels emit smmla for an i8mm target, the library contains it, and on a dotprod-only
    core (cortex-a76) the build dies with SIGILL instead of computing anything."""
    assert target_features("aarch64-i8mm").has_i8mm
    assert SMMLA_INTRINSIC in build.ir_text["aarch64-i8mm"]
    assert SMMLA_INTRINSIC not in build.ir_text["rpi5"]
    assert instruction_count(build.libs["aarch64-i8mm"], "smmla") > 0
    assert instruction_count(build.libs["rpi5"], "smmla") == 0
    x, _ = build.cases()[0]
    with pytest.raises(EmulationError, match="SIGILL") as info:
        run_emulated(build.libs["aarch64-i8mm"], [x], cpu="cortex-a76", verbose=False)
    assert info.value.illegal_instruction


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def test_cli_run_emulated(build, tmp_path, capsys):
    """`tvm-intlstm run --emulate aarch64 --cpu cortex-a72 model.so --input x.npy`."""
    from tvm_intlstm import cli

    x, want = build.cases()[0]
    np.save(tmp_path / "x.npy", x)
    cli.main(["run", "--emulate", "aarch64", "--cpu", "cortex-a72", str(build.libs["rpi4"]),
              "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    assert "output 0: shape" in capsys.readouterr().out
