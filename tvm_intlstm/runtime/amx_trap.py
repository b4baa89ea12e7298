"""Run AMX kernels on an x86-64 CPU without AMX: their tile instructions are emulated in a SIGILL
handler (`amx_trap.c`, next to this file), for checking the machine code, not for speed.

The `amx_emulated` kernel family replaces every tile instruction by TIR loops *before* LLVM, so it
checks the kernels' data layout but not the code LLVM generates for the real `amx` family (tile
configuration, register allocation, tileloadd strides and addressing). Here the real machine code
runs: on a CPU without AMX each tile instruction raises #UD (SIGILL), the handler decodes it,
carries it out on a per-thread tile state as the Intel SDM defines it, and resumes after it. Every
other instruction runs natively, so the rest of the code must suit this CPU (e.g. build for
`llvm -mcpu=x86-64-v4 -mattr=+avx512vnni,+amx-tile,+amx-int8` on an AVX-512 VNNI CPU).

    from tvm_intlstm.runtime.amx_trap import emulate_amx
    with emulate_amx() as emu:
        out = compiled_model(x)      # compiled with kernels="amx"
    print(emu.counts())              # {"tdpbssd": ..., "tileloadd": ..., ...}

Inside the block this machine counts as having amx_tile and amx_int8 (`target.host_cpu_features`)
and the process as holding the AMX permission (`runtime.amx`). On a CPU that has AMX the block
asks the OS for the real permission instead (`runtime.amx.request_amx_permission`) and the
instructions run natively: the same tests then check the hardware. A configuration or operand shape the
hardware would refuse is recorded instead of faulting and raised as `AMXTrapError` when the block
ends. Only inside the block: a module that ran there and is called again after it dies with SIGILL
as on any CPU without AMX. The library is compiled once with the system C compiler (cc) and
cached under `<cache>/amx_trap/<hash of amx_trap.c>/` (`runtime.emulate.cache_dir`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["AMXTrapError", "emulate_amx", "trap_available", "library_path", "native_amx",
           "runs_emulated", "TRAP_TARGET"]

SOURCE = Path(__file__).with_name("amx_trap.c")
# the counters of amx_trap.c, in its KIND order
KINDS = ("ldtilecfg", "sttilecfg", "tilerelease", "tilezero", "tileloadd", "tilestored",
         "tdpbxxd", "errors", "emulated")
FLAGS = frozenset({"amx_tile", "amx_int8"})     # the /proc/cpuinfo flags the emulator provides
# a target for the amx family whose other instructions any AVX-512 VNNI CPU runs (the tests' choice)
TRAP_TARGET = "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni,+amx-tile,+amx-int8"


class AMXTrapError(RuntimeError):
    """The emulator cannot run here, or an emulated AMX instruction did what the hardware refuses."""


_lock = threading.RLock()
_lib = None
_depth = 0


def trap_available() -> str:
    """"" if the emulator can run on this machine, else why not."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the AMX trap emulator needs x86-64 Linux, this is {sys.platform} {platform.machine()}"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "the AMX trap emulator is compiled with the system C compiler: install gcc (apt-get install gcc)"
    return ""


def library_path(verbose: bool = False) -> Path:
    """Compile (once, cached by the source's hash) and return the emulator's shared library."""
    why = trap_available()
    if why:
        raise AMXTrapError(why)
    from .emulate import _locked, cache_dir
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = cache_dir() / "amx_trap" / digest / "amx_trap.so"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    with _locked(out.parent / ".lock"):
        if out.is_file():
            return out
        tmp = out.with_name(f".amx_trap.{os.getpid()}.so")
        cmd = [cc, "-O2", "-std=c11", "-shared", "-fPIC", "-Wall", str(SOURCE), "-o", str(tmp)]
        if verbose:
            print(f"[tvm_intlstm] building the AMX trap emulator: {' '.join(cmd)}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AMXTrapError(f"building the AMX trap emulator failed:\n  {' '.join(cmd)}\n"
                               f"{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    return out


def _load():
    global _lib  # pylint: disable=global-statement
    if _lib is None:
        lib = ctypes.CDLL(str(library_path()))
        lib.amx_trap_count.restype = ctypes.c_long
        lib.amx_trap_count.argtypes = [ctypes.c_int]
        lib.amx_trap_error.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def native_amx() -> bool:
    """Does this CPU itself have AMX-TILE and AMX-INT8 (its own /proc/cpuinfo flags, whether or not
    an emulation block is open)?"""
    from ..target import host_cpu_features
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return FLAGS <= (host_cpu_features(f.read()) or set())
    except OSError:
        return False


def runs_emulated(target) -> bool:
    """Can code built for `target` run here inside `emulate_amx()`: this CPU lacks at most AMX-TILE
    and AMX-INT8 (natively present, or supplied by the emulator where it can run)?"""
    from ..target import missing_host_features
    missing = missing_host_features(target)
    if missing is None:
        return False
    return not missing or (not trap_available() and set(missing) <= {"amx-tile", "amx-int8"})


class _Emulation:
    """What `emulate_amx` yields: the emulated instruction counts of the block so far."""

    def __init__(self, lib):
        self._lib = lib

    def counts(self) -> dict[str, int]:
        return {k: int(self._lib.amx_trap_count(i)) for i, k in enumerate(KINDS)}

    def error(self) -> str:
        return self._lib.amx_trap_error().decode()


@contextlib.contextmanager
def emulate_amx():
    """Within the block, AMX tile instructions are emulated (module doc); yields an object whose
    `counts()` gives the emulated instructions per kind. Re-entrant; the counters start at zero
    when the outermost block opens. Raises AMXTrapError at the end if the hardware would have
    refused an instruction."""
    global _depth  # pylint: disable=global-statement
    from .. import target as _target
    from . import amx as _amx
    if native_amx():
        # an AMX CPU: the instructions run natively once the process holds the permission (tile
        # instructions without it would trap after a native ldtilecfg, a state the emulator does
        # not see); the emulator stays idle and its counters at zero
        _amx.request_amx_permission()
        with _lock:
            lib = _load()
            if _depth == 0:
                lib.amx_trap_reset()
        yield _Emulation(lib)
        return
    with _lock:
        lib = _load()
        if _depth == 0:
            lib.amx_trap_reset()
            if lib.amx_trap_install() != 0:
                raise AMXTrapError("sigaction(SIGILL) failed: the AMX trap emulator is not installed")
            _target._EMULATED_HOST_FLAGS.update(FLAGS)  # pylint: disable=protected-access
            _amx._emulated = True                       # pylint: disable=protected-access
        _depth += 1
    emu = _Emulation(lib)
    try:
        yield emu
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.amx_trap_uninstall()
                _target._EMULATED_HOST_FLAGS.difference_update(FLAGS)  # pylint: disable=protected-access
                _amx._emulated = False                                 # pylint: disable=protected-access
    err = emu.error()
    if err and _depth == 0:
        raise AMXTrapError(f"an AMX instruction did what the hardware refuses: {err}; on an AMX CPU "
                           "it would fault (#UD / #GP): the kernel's tile configuration or shapes are wrong")
