"""aarch64 cross-compilation + qemu emulation, bit-exact against numpy.

Needs the tools of .ci/install_arm.sh (cross g++, binutils, qemu-user) and, the first time,
PyPI access to download the aarch64 TVM runtime (cached under $TVM_INTLSTM_CACHE).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir
from tvm.script import relax as R
from tvm.script import tirx as T

from tvm_intlstm.runtime.emulate import (
    EmulatedOutputs,
    EmulationError,
    check_uses_instruction,
    ensure_runner,
    instruction_count,
    qemu_cpu_for_target,
    qemu_cpus,
    run_emulated,
)
from tvm_intlstm.target import export_library, parse_target, target_features

M, K, N = 8, 96, 40
SHIFT = 7

TARGETS = {
    # classic string with +dotprod and no -mcpu: the kernel is tensorized with sdot
    "dotprod": "llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod",
    # a Raspberry Pi 4 build: must run on any Armv8.0 core
    "a72": "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72",
    # preset with i8mm (and dotprod)
    "i8mm": "aarch64-i8mm",
}


@T.prim_func(s_tir=True)
def qmatmul(
    A: T.Buffer((M, K), "int8"),
    W: T.Buffer((N // 4, K // 4, 4, 4), "int8"),
    C: T.Buffer((M, N), "int32"),
):
    """C[m, n] = sum_k A[m, k] * W[n, k], weights packed in 4x4 tiles (n-tile, k-tile, n, k)."""
    T.func_attr({"tirx.noalias": True})
    for m, n, k in T.grid(M, N, K):
        with T.sblock("C"):
            vm, vn, vk = T.axis.remap("SSR", [m, n, k])
            with T.init():
                C[vm, vn] = 0
            C[vm, vn] = C[vm, vn] + T.cast(A[vm, vk], "int32") * T.cast(
                W[vn // 4, vk // 4, vn % 4, vk % 4], "int32"
            )


# The ARM sdot tensor intrinsic, as in tvm/s_tir/tensor_intrin/arm_cpu.py
# (ARM_DOT_4x4_i8_SDOT_INTRIN).  It is restated here because importing anything under
# tvm.s_tir.tensor_intrin imports every backend's intrinsics (cuda, rocm, hexagon, ...), which
# takes minutes on the 2-core machines.
@T.prim_func(s_tir=True)
def _sdot_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
    C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        for i in T.serial(0, 4):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _sdot_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
    C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        vec_a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                              dtype="int8x16")
        vec_b = B.vload([0, 0], dtype="int8x16")
        vec_c = C.vload([0], dtype="int32x4")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            vec_c, vec_a, vec_b, dtype="int32x4",
        )


SDOT_INTRIN = "tvm_intlstm_test_sdot_4x4_i8i8i32"
s_tir.TensorIntrin.register(SDOT_INTRIN, _sdot_desc, _sdot_impl, override=True)


def _sdot_kernel():
    """qmatmul with its 4x4 inner product tensorized with sdot."""
    sch = s_tir.Schedule(qmatmul)
    blk = sch.get_sblock("C")
    m, n, k = sch.get_loops(blk)
    no, ni = sch.split(n, [None, 4])
    ko, ki = sch.split(k, [None, 4])
    sch.reorder(m, no, ko, ni, ki)
    sch.decompose_reduction(blk, ko)
    sch.tensorize(ni, SDOT_INTRIN)
    return sch.mod["main"]


def build_int8_module(target) -> tvm.IRModule:
    """main: int8 x int8 -> int32 product (TIR kernel through call_tir: sdot when the target
    has dotprod, a plain loop nest otherwise) + bias, then an element-wise int8 requantization
    (arithmetic shift and saturation); returns both.  matmul_only: the same product with the
    stock Relax operator, returning a single tensor."""
    kernel = _sdot_kernel() if target_features(target).has_dotprod else qmatmul
    bb = relax.BlockBuilder()
    gv = bb.add_func(kernel, "qmatmul")
    a = relax.Var("a", R.Tensor((M, K), "int8"))
    w = relax.Var("w", R.Tensor((N // 4, K // 4, 4, 4), "int8"))
    bias = relax.Var("bias", R.Tensor((N,), "int32"))
    with bb.function("main", [a, w, bias]):
        with bb.dataflow():
            acc = bb.emit(relax.call_tir(gv, [a, w], out_ty=R.Tensor((M, N), "int32")))
            acc_b = bb.emit(relax.op.add(acc, bias))
            sh = bb.emit(relax.op.right_shift(acc_b, relax.const(SHIFT, "int32")))
            q = bb.emit(relax.op.astype(relax.op.clip(sh, -128, 127), "int8"))
            out = bb.emit_output(relax.Tuple([acc_b, q]))
        bb.emit_func_output(out)
    a2 = relax.Var("a", R.Tensor((M, K), "int8"))
    w2 = relax.Var("w", R.Tensor((K, N), "int8"))
    with bb.function("matmul_only", [a2, w2]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(a2, w2, out_dtype="int32"))
        bb.emit_func_output(y)
    return bb.get()


def pack_weights(w: np.ndarray) -> np.ndarray:
    """(N, K) int8 -> (N/4, K/4, 4, 4) tiles, the layout qmatmul reads."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // 4, 4, k // 4, 4).transpose(0, 2, 1, 3))


def _reference(a, w, bias):
    acc = a.astype(np.int32) @ w.astype(np.int32).T + bias
    q = np.clip(acc >> SHIFT, -128, 127).astype(np.int8)  # arithmetic shift, like TIR
    return acc, q


def _inputs(seed=0):
    """a (M, K), w (N, K) unpacked, bias (N,), with the extremes of int8 included."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    a[0, :] = -128
    w[0, :] = -128  # acc[0, 0] = K * 16384: every product at its maximum
    a[1, :] = 127
    w[1, :] = -128  # acc[1, 1] = -K * 16256
    bias = rng.integers(-(2**20), 2**20, (N,), dtype=np.int32)
    return a, w, bias


def _run_main(lib, seed, cpu):
    a, w, bias = _inputs(seed)
    out = run_emulated(lib, [a, pack_weights(w), bias], cpu=cpu)
    return out, _reference(a, w, bias)


@pytest.fixture(scope="session")
def runner():
    missing = [t for t in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump", "qemu-aarch64")
               if shutil.which(t) is None]
    assert not missing, f"missing {missing}: run `bash .ci/install_arm.sh`"
    return ensure_runner()


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    out = tmp_path_factory.mktemp("arm_libs")
    paths = {}
    for name, spec in TARGETS.items():
        target = parse_target(spec)
        ex = tvm.compile(build_int8_module(target), target=target)
        paths[name] = Path(export_library(ex, out / f"int8_{name}.so", target))
    return paths


def test_runner_is_cached(runner):
    assert runner.is_file()
    assert ensure_runner(verbose=False) == runner


def test_targets_features():
    assert target_features(TARGETS["dotprod"]).has_dotprod
    assert not target_features(TARGETS["a72"]).has_dotprod
    assert target_features(TARGETS["i8mm"]).has_i8mm
    assert qemu_cpu_for_target(TARGETS["a72"]) == "cortex-a72"
    assert qemu_cpu_for_target(TARGETS["dotprod"]) == "cortex-a76"
    assert qemu_cpu_for_target("rpi5") == "cortex-a76"
    assert qemu_cpu_for_target("aarch64-i8mm") == "max"
    assert {"cortex-a53", "cortex-a72", "cortex-a76", "max"} <= set(qemu_cpus())


def test_dotprod_build_contains_sdot(libs):
    assert check_uses_instruction(libs["dotprod"], "sdot")
    assert instruction_count(libs["dotprod"], "sdot") > 0
    assert not check_uses_instruction(libs["a72"], "sdot")
    assert not check_uses_instruction(libs["a72"], "udot")


def test_dotprod_build_bit_exact_on_cortex_a76(runner, libs):
    out, (acc, q) = _run_main(libs["dotprod"], 0, "cortex-a76")
    assert isinstance(out, EmulatedOutputs) and len(out) == 2
    assert out[0].dtype == np.int32 and out[0].shape == (M, N)
    assert out[1].dtype == np.int8 and out[1].shape == (M, N)
    np.testing.assert_array_equal(out[0], acc)
    np.testing.assert_array_equal(out[1], q)
    _, _, bias = _inputs()
    assert out[0][0, 0] == K * 128 * 128 + bias[0]  # the extremes really ran
    assert out[0][1, 1] == -K * 127 * 128 + bias[1]


@pytest.mark.parametrize("cpu", ["cortex-a53", "cortex-a72", "cortex-a76"])
def test_a72_build_runs_everywhere(runner, libs, cpu):
    out, (acc, q) = _run_main(libs["a72"], 1, cpu)
    np.testing.assert_array_equal(out[0], acc)
    np.testing.assert_array_equal(out[1], q)


@pytest.mark.parametrize("cpu", ["cortex-a53", "cortex-a72"])
def test_dotprod_build_sigill_without_dotprod(runner, libs, cpu):
    with pytest.raises(EmulationError, match="not support.*SIGILL") as info:
        _run_main(libs["dotprod"], 0, cpu)
    assert info.value.illegal_instruction
    assert info.value.cpu == cpu
    assert "sdot" in str(info.value)


def test_i8mm_build_runs_on_max(runner, libs):
    assert check_uses_instruction(libs["i8mm"], "sdot")
    out, (acc, q) = _run_main(libs["i8mm"], 2, "max")
    np.testing.assert_array_equal(out[0], acc)
    np.testing.assert_array_equal(out[1], q)


def test_single_tensor_result_and_timing(runner, libs):
    a, w, _ = _inputs(seed=3)
    w_kn = np.ascontiguousarray(w.T)
    out = run_emulated(libs["dotprod"], [a, w_kn], cpu="cortex-a76", repeat=3,
                       function="matmul_only")
    assert len(out) == 1
    np.testing.assert_array_equal(out[0], a.astype(np.int32) @ w_kn.astype(np.int32))
    assert out.median_us is not None and out.median_us > 0
    assert out.min_us <= out.median_us


def test_runner_errors_are_reported(runner, libs, tmp_path):
    a, w, bias = _inputs()
    w = pack_weights(w)
    # wrong arity: the runner's stderr (TVM's message) is in the error
    with pytest.raises(EmulationError, match="expects 3 arguments") as info:
        run_emulated(libs["dotprod"], [a, w], cpu="cortex-a76")
    assert info.value.returncode == 1 and not info.value.illegal_instruction
    # wrong dtype
    with pytest.raises(EmulationError):
        run_emulated(libs["dotprod"], [a.astype(np.int32), w, bias], cpu="cortex-a76")
    # unknown function
    with pytest.raises(EmulationError, match="no Relax function named 'nope'"):
        run_emulated(libs["dotprod"], [a, w, bias], function="nope")
    # unknown qemu cpu model
    with pytest.raises(EmulationError, match="no CPU model 'cortex-a999'.*cortex-a76"):
        run_emulated(libs["dotprod"], [a, w, bias], cpu="cortex-a999")
    # an x86 library
    host = parse_target("host")
    x86 = export_library(tvm.compile(build_int8_module(host), target=host), tmp_path / "x86.so",
                         host)
    with pytest.raises(EmulationError, match="not aarch64"):
        run_emulated(x86, [a, w, bias])
    with pytest.raises(EmulationError, match="does not exist"):
        run_emulated(tmp_path / "missing.so", [a, w, bias])
    with pytest.raises(FileNotFoundError):
        check_uses_instruction(tmp_path / "missing.so", "sdot")


def test_qemu_missing_message(monkeypatch, libs):
    import tvm_intlstm.runtime.emulate as emu

    monkeypatch.setattr(emu.shutil, "which", lambda name: None)
    monkeypatch.delenv("TVM_INTLSTM_QEMU", raising=False)
    with pytest.raises(EmulationError, match="apt-get install qemu-user"):
        _run_main(libs["a72"], 0, "cortex-a76")


@tvm.script.ir_module
class DtypeMod:
    @R.function
    def main(
        a: R.Tensor((3,), "int16"),
        b: R.Tensor((2, 2), "int64"),
        c: R.Tensor((2, 3), "float32"),
        d: R.Tensor((5,), "uint8"),
        e: R.Tensor((), "int32"),
        f: R.Tensor((4,), "bool"),
    ):
        a1 = R.add(a, R.const(1, "int16"))
        b1 = R.multiply(b, R.const(2, "int64"))
        c1 = R.multiply(c, R.const(0.5, "float32"))
        d1 = R.add(d, R.const(1, "uint8"))
        e1 = R.add(e, R.const(-7, "int32"))
        f1 = R.logical_not(f)
        return ((a1, b1), c1, (d1, (e1, f1)))


def test_npy_dtypes_and_nested_tuples(runner, tmp_path):
    target = parse_target("rpi4")
    lib = export_library(tvm.compile(DtypeMod, target=target), tmp_path / "dtypes.so", target)
    a = np.array([-32768, 0, 32766], dtype=np.int16)
    b = np.array([[2**40, -(2**40)], [1, -1]], dtype=np.int64)
    c = np.array([[1.5, -2.25, 3e30], [0.0, -0.0, 1e-30]], dtype=np.float32)
    d = np.array([0, 1, 127, 128, 254], dtype=np.uint8)
    e = np.array(5, dtype=np.int32)
    f = np.array([True, False, False, True])
    out = run_emulated(lib, [a, b, c, d, e, f], cpu="cortex-a53")
    expected = [a + np.int16(1), b * 2, c * np.float32(0.5), d + np.uint8(1), e - 7, ~f]
    assert len(out) == len(expected)
    for got, want in zip(out, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # non-contiguous and big-endian inputs are converted on the way in
    out2 = run_emulated(lib, [a[::-1].copy(), b.T, c.astype(">f4"), d, e, f], cpu="cortex-a53")
    np.testing.assert_array_equal(out2[1], b.T * 2)
    np.testing.assert_array_equal(out2[2], c * np.float32(0.5))
