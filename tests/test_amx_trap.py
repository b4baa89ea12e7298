"""The AMX trap emulator (`tvm_intlstm.runtime.amx_trap`) against numpy, so that the tests running
the amx family's machine code through it (test_kernel_families.py, test_guarded_buffers.py) check
the kernels, not the emulator.

Small TIR functions call the tile intrinsics directly (ldtilecfg, tileloadd64, tdpb{ss,su,us,uu}d,
tilestored64, tilerelease) on odd shapes and row strides; each is built for the baseline x86-64 with
AMX (so it runs on any x86-64 CPU, AVX-512 or not) and run inside `emulate_amx()` (natively on an
AMX CPU, where the emulator is then idle and the test checks the numpy model of the instructions
against the hardware). The four
signedness variants are checked with operands at -128 / 127 / 255 and an accumulator near the
int32 limits (wraparound); configurations and shapes the hardware refuses raise AMXTrapError; an
illegal instruction that is not AMX still kills the process with SIGILL (run in a subprocess).
"""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import tirx
from tvm.script import tirx as T

from tvm_intlstm import kernels as K
from tvm_intlstm.runtime.amx_trap import AMXTrapError, emulate_amx, native_amx, trap_available

TARGET = "llvm -mcpu=x86-64 -mattr=+amx-tile,+amx-int8"     # nothing else beyond the baseline
HOST_AMX = native_amx()
WHY_NOT = trap_available()       # "" on x86-64 Linux with cc


def _intr(name, *args):
    return tirx.call_llvm_intrin("void", name, *args)


def _i8(v):
    return tirx.const(v, "int8")


def _i64(v):
    return tirx.const(v, "int64")


def tdp_kernel(op: str, M: int, KB: int, N: int, lda: int, ldb: int, ldc: int,
               rows_override: int | None = None, b_colsb: int | None = None):
    """c_out[M, N] = c_in + a[M, KB] x b[KB/4, 4N] by `op` (tdpbssd, ...): tile 0 = C (M x 4N
    bytes), 4 = A (M x KB), 6 = B (KB/4 x 4N); rows strided by lda / ldb / ldc bytes.
    rows_override / b_colsb configure a wrong shape on purpose."""
    a_rows = rows_override or M

    @T.prim_func
    def f(a: T.Buffer((M, lda), "int8"), b: T.Buffer((KB // 4, ldb), "int8"),
          c_in: T.Buffer((M, ldc // 4), "int32"), c_out: T.Buffer((M, ldc // 4), "int32")):
        T.func_attr({"global_symbol": "f", "tirx.noalias": True})
        cfg = T.alloc_buffer((64,), "uint8")
        for i in range(64):
            cfg[i] = T.uint8(0)
        cfg[0] = T.uint8(1)
        cfg[16] = T.uint8(4 * N)            # colsb (little-endian uint16) and rows per tile
        cfg[48] = T.uint8(M)
        cfg[16 + 8] = T.uint8(KB)
        cfg[48 + 4] = T.uint8(a_rows)
        cfg[16 + 12] = T.uint8(b_colsb or 4 * N)
        cfg[48 + 6] = T.uint8(KB // 4)
        T.evaluate(_intr("llvm.x86.ldtilecfg", tirx.address_of(cfg[0])))
        T.evaluate(_intr("llvm.x86.tileloadd64", _i8(0), tirx.address_of(c_in[0, 0]), _i64(ldc)))
        T.evaluate(_intr("llvm.x86.tileloadd64", _i8(4), tirx.address_of(a[0, 0]), _i64(lda)))
        T.evaluate(_intr("llvm.x86.tileloadd64", _i8(6), tirx.address_of(b[0, 0]), _i64(ldb)))
        T.evaluate(_intr(f"llvm.x86.{op}", _i8(0), _i8(4), _i8(6)))
        T.evaluate(_intr("llvm.x86.tilestored64", _i8(0), tirx.address_of(c_out[0, 0]), _i64(ldc)))
        T.evaluate(_intr("llvm.x86.tilerelease"))

    return tvm.compile(tvm.IRModule({"f": f}), target=K.as_target(TARGET))


def _reference(op, a, b, c_in, M, KB, N):
    sa, sb = {"tdpbssd": (1, 1), "tdpbsud": (1, 0), "tdpbusd": (0, 1), "tdpbuud": (0, 0)}[op]
    A = a[:, :KB].astype(np.int64) if sa else a[:, :KB].view(np.uint8).astype(np.int64)
    B = b[:, :4 * N] if sb else b[:, :4 * N].view(np.uint8)
    B = B.astype(np.int64).reshape(KB // 4, N, 4).transpose(0, 2, 1).reshape(KB, N)
    out = c_in.copy()
    acc = c_in[:, :N].astype(np.int64) + A @ B
    out[:, :N] = ((acc + 2**31) % 2**32 - 2**31).astype(np.int32)     # int32 wraparound
    return out


pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the AMX trap emulator is for x86-64 Linux")


def test_emulator_runs_here():
    """On the x86-64 Linux machines this project tests on, the emulator must be able to run (it
    needs cc), else the tests below and the amx-trapped families would check nothing."""
    assert not WHY_NOT, WHY_NOT
    print(f"\nAMX trap emulator: {'idle (this CPU has AMX: native runs)' if HOST_AMX else 'runs'}")


@pytest.mark.parametrize("op", ["tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud"])
@pytest.mark.parametrize("M,KB,N,lda,ldb,ldc", [(16, 64, 16, 64, 64, 64), (5, 12, 3, 19, 13, 20),
                                                (16, 4, 1, 7, 5, 8), (1, 64, 16, 64, 80, 128)])
def test_tdp_against_numpy(op, M, KB, N, lda, ldb, ldc):
    assert not WHY_NOT, WHY_NOT
    rng = np.random.default_rng(M * 1000 + KB * 10 + N)
    a = rng.integers(-128, 128, (M, lda)).astype(np.int8)
    b = rng.integers(-128, 128, (KB // 4, ldb)).astype(np.int8)
    a[0, :KB], b[0, :] = -128, -128           # -128 x -128 (and 128 x 128 / 255 x 255 unsigned)
    a[-1, :KB] = -1                           # 255 unsigned
    c_in = rng.integers(-2**31, 2**31, (M, ldc // 4), dtype=np.int64).astype(np.int32)
    c_in[0, :] = 2**31 - 1                    # the products push past the limit: wraparound
    c_out = np.full_like(c_in, 0x5A5A5A5A)
    lib = tdp_kernel(op, M, KB, N, lda, ldb, ldc)
    args = [tvm.runtime.tensor(v) for v in (a, b, c_in, c_out)]
    with emulate_amx() as emu:
        lib["f"](*args)
    got = args[3].numpy()
    want = _reference(op, a, b, c_in, M, KB, N)
    # tilestored writes 4N bytes per row: the rest of each c_out row keeps its pattern
    want[:, N:] = 0x5A5A5A5A
    np.testing.assert_array_equal(got, want)
    if not HOST_AMX:
        n = emu.counts()
        assert (n["ldtilecfg"], n["tileloadd"], n["tdpbxxd"], n["tilestored"], n["tilerelease"]) \
            == (1, 3, 1, 1, 1) and n["errors"] == 0, n


@pytest.mark.parametrize("bad,match", [
    (dict(rows_override=17), "over 16 rows"),                 # a tile config the CPU refuses
    (dict(rows_override=3), "shapes do not chain"),           # A's rows != C's rows
    (dict(b_colsb=8), "shapes do not chain"),                 # B's width != C's width
])
def test_refused_shapes_raise(bad, match):
    """What the hardware refuses (#GP / #UD) is an AMXTrapError under the emulator; on an AMX CPU
    the same kernel kills a child process (SIGILL or SIGSEGV), which checks the emulator's rule."""
    assert not WHY_NOT, WHY_NOT
    M, KB, N = 4, 16, 4
    if HOST_AMX:
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
            import numpy as np, tvm
            from test_amx_trap import tdp_kernel
            from tvm_intlstm.runtime.amx import request_amx_permission
            request_amx_permission()
            lib = tdp_kernel("tdpbssd", {M}, {KB}, {N}, {KB}, 16, 16, **{bad!r})
            args = [tvm.runtime.tensor(np.zeros(s, t)) for s, t in
                    ((({M}, {KB}), "int8"), (({KB // 4}, 16), "int8"), (({M}, 4), "int32"), (({M}, 4), "int32"))]
            lib["f"](*args)
            print("survived", flush=True)
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300)
        assert "survived" not in proc.stdout and proc.returncode in (-4, -11), \
            (proc.returncode, proc.stderr[-2000:])
        return
    lib = tdp_kernel("tdpbssd", M, KB, N, KB, 16, 16, **bad)
    args = [tvm.runtime.tensor(np.zeros(s, t)) for s, t in
            (((M, KB), "int8"), ((KB // 4, 16), "int8"), ((M, 4), "int32"), ((M, 4), "int32"))]
    with pytest.raises(AMXTrapError, match=match):
        with emulate_amx():
            lib["f"](*args)


def test_other_illegal_instructions_still_fault():
    """Inside emulate_amx() an illegal instruction that is not AMX (ud2) gets the previous SIGILL
    action: the process dies with SIGILL as it would without the emulator (not a hang, not a
    silent skip)."""
    assert not WHY_NOT, WHY_NOT
    code = textwrap.dedent("""
        import ctypes, mmap
        from tvm_intlstm.runtime.amx_trap import emulate_amx
        buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        buf.write(b"\\x0f\\x0b\\xc3")        # ud2; ret
        fn = ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        with emulate_amx():
            print("calling", flush=True)
            fn()
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "calling" in proc.stdout and "survived" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == -4, (proc.returncode, proc.stderr[-2000:])     # SIGILL
