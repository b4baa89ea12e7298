"""The Linux permission a process needs before it runs AMX tile instructions.

Linux keeps the AMX tile data state (XFEATURE_XTILEDATA, 8 KiB per thread) disabled for a process
until it asks for it with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` (Linux 5.16 and
later); the first tile instruction of a process that did not ask is trapped and kills it with
SIGILL. The permission is per process (every thread, the thread pool's included, then may use the
tiles; each thread still loads its own tile configuration, which the AMX kernels do themselves).
TVM's `runtime.amx_init` does the same but exists only in TVM builds with USE_AMX, not in the PyPI
wheel, so the request is made here through the raw system call.

`request_amx_permission()` makes the request once per process (later calls return the first
answer) and raises `AMXUnavailableError`, saying why and what to do, where the OS or the CPU
refuses: the compiled module and `kernels.Kernel` call it before their first AMX kernel runs, so a
refusal is a Python exception, never SIGILL.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading

__all__ = ["AMXUnavailableError", "request_amx_permission", "amx_permission_answer"]

SYS_ARCH_PRCTL = 158            # x86-64 system call number of arch_prctl
ARCH_GET_XCOMP_SUPP = 0x1021    # -> the mask of extended state features the kernel supports
ARCH_REQ_XCOMP_PERM = 0x1023    # ask for permission to use a dynamically enabled feature
XFEATURE_XTILEDATA = 18         # the AMX tile data (tmm0-7)


class AMXUnavailableError(RuntimeError):
    """This process cannot run AMX instructions (the OS refused the tile state or the CPU has no
    AMX); the message says why and what to do instead."""


_FIX = ("compile the model without kernels=\"amx\" (the default avx512_vnni kernels need no "
        "permission), or run it on a Linux >= 5.16 machine whose CPU has AMX (e.g. Sapphire Rapids)")

_lock = threading.Lock()
_answer: str | None = None      # "" once granted, else why not (set by the first request)
# inside runtime.amx_trap.emulate_amx(): tile instructions are emulated, no permission is needed
_emulated = False


def _arch_prctl(code: int, arg) -> tuple[int, int]:
    """(return value, errno) of the raw arch_prctl system call."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(code), arg)
    return int(rc), ctypes.get_errno()


def _request() -> str:
    """"" when the permission is granted, else the reason it is not."""
    if not sys.platform.startswith("linux") or \
            platform.machine().lower() not in ("x86_64", "amd64"):
        return (f"AMX needs an x86-64 Linux machine, this is {sys.platform} "
                f"{platform.machine()}")
    rc, err = _arch_prctl(ARCH_REQ_XCOMP_PERM, ctypes.c_ulong(XFEATURE_XTILEDATA))
    if rc == 0:
        return ""
    name = errno.errorcode.get(err, str(err))
    supp = ctypes.c_uint64(0)
    src, _ = _arch_prctl(ARCH_GET_XCOMP_SUPP, ctypes.byref(supp))
    if src == 0 and not supp.value >> XFEATURE_XTILEDATA & 1:
        why = (f"this CPU (or the kernel, {platform.release()}) has no AMX tile state: the "
               f"supported extended state features are {supp.value:#x}, without bit "
               f"{XFEATURE_XTILEDATA} (XTILEDATA)")
    elif src != 0:
        why = (f"the kernel ({platform.release()}) does not support dynamic extended state "
               "features (Linux 5.16 or later is needed for AMX)")
    else:
        why = ("the kernel supports AMX but refused it to this process (e.g. a signal stack too "
               "small for the larger signal frame, or a sandbox that filters arch_prctl)")
    return (f"the OS refused this process the AMX tile state: arch_prctl(ARCH_REQ_XCOMP_PERM, "
            f"XFEATURE_XTILEDATA) failed with {name} ({os.strerror(err)}); {why}. Running an AMX "
            f"kernel here would die with SIGILL; {_FIX}")


def amx_permission_answer() -> str:
    """"" if this process may run AMX instructions, else why not. Asks the OS on the first call
    only (once per process), then returns the same answer."""
    global _answer  # pylint: disable=global-statement
    if _emulated:
        return ""
    with _lock:
        if _answer is None:
            _answer = _request()
        return _answer


def request_amx_permission() -> None:
    """Make sure this process may run AMX tile instructions (see the module doc); raises
    AMXUnavailableError with the reason and the fix where it may not. Cheap after the first call."""
    why = amx_permission_answer()
    if why:
        raise AMXUnavailableError(why)
