"""Run aarch64 modules built by tvm_intlstm under qemu user-mode emulation.

How it works (see docs/arm.md):

1. :func:`ensure_runtime` downloads the aarch64 manylinux wheels of the *same* apache-tvm and
   apache-tvm-ffi versions as the ones installed here (``pip download --platform
   manylinux_2_28_aarch64``) and keeps only ``libtvm_runtime.so``, ``libtvm_ffi.so`` and the
   tvm_ffi headers in a cache directory (``$TVM_INTLSTM_CACHE``, default
   ``~/.cache/tvm_intlstm``; layout ``aarch64/tvm-<ver>_ffi-<ver>/{lib,include}``).
2. :func:`ensure_runner` cross-compiles ``runner.cc`` (next to this file) against them with
   ``aarch64-linux-gnu-g++`` and caches the binary (keyed by the source's hash).
3. :func:`run_emulated` writes the inputs as .npy files and runs
   ``qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu <cpu> -E LD_LIBRARY_PATH=<cache>/lib
   runner -o <dir> module.so in_0.npy ...`` explicitly (binfmt_misc is usually not mounted
   in containers), then reads the outputs back.

qemu's ``-cpu`` model decides which instructions exist: ``cortex-a53``/``cortex-a72`` have no
dotprod, so a module containing ``sdot`` dies with SIGILL there, which :func:`run_emulated`
reports as :class:`EmulationError`.  Timings under qemu say nothing about a real board.

Tools: ``apt-get install g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
binutils-aarch64-linux-gnu`` (what ``.ci/install_arm.sh`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = [
    "EmulationError",
    "EmulatedOutputs",
    "CACHE_ENV",
    "QEMU_SYSROOT",
    "cache_dir",
    "ensure_runtime",
    "ensure_runner",
    "find_qemu",
    "qemu_cpus",
    "qemu_cpu_for_target",
    "run_emulated",
    "instruction_count",
    "check_uses_instruction",
    "elf_machine",
    "RUNNER_SOURCE",
]

#: Environment variable naming the cache directory (default ``~/.cache/tvm_intlstm``).
CACHE_ENV = "TVM_INTLSTM_CACHE"
#: Sysroot of Debian's libc6-arm64-cross (the aarch64 ld.so, libc, libstdc++ for qemu).
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"
#: The runner's C++ source (also built on boards, see examples/deploy_arm).
RUNNER_SOURCE = Path(__file__).resolve().parent / "runner.cc"

_APT_ALL = (
    "apt-get install g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user "
    "binutils-aarch64-linux-gnu"
)
_RUNNER_NAME = "tvm_intlstm_runner"
_WHEEL_PLATFORM = "manylinux_2_28_aarch64"
_CXXFLAGS = ["-std=c++17", "-O2"]
_EM_AARCH64 = 183
_EM_X86_64 = 62


class EmulationError(RuntimeError):
    """Running a module under qemu failed; the message says why.

    Attributes: ``returncode`` (negative for a signal), ``stderr`` (the runner's and qemu's
    error output), ``cpu`` (the emulated CPU model), ``illegal_instruction`` (died by SIGILL).
    """

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        stderr: str = "",
        cpu: str | None = None,
        illegal_instruction: bool = False,
    ):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr
        self.cpu = cpu
        self.illegal_instruction = illegal_instruction


class EmulatedOutputs(list):
    """The output arrays of :func:`run_emulated` (a list), plus timing when ``repeat > 0``:
    ``median_us``, ``min_us``, ``mean_us`` (microseconds per call under qemu, i.e.
    meaningless as a performance figure), and the runner's ``stdout``/``stderr``."""

    median_us: float | None = None
    min_us: float | None = None
    mean_us: float | None = None
    stdout: str = ""
    stderr: str = ""


def _log(msg: str) -> None:
    print(f"tvm_intlstm: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Cache: aarch64 TVM runtime libraries and the runner
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of tvm_intlstm's cache: ``$TVM_INTLSTM_CACHE`` or ``~/.cache/tvm_intlstm``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tvm_intlstm"


def _versions() -> tuple[str, str]:
    try:
        tvm_version = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:  # pragma: no cover - source builds of TVM
        import tvm

        tvm_version = tvm.__version__
    ffi_version = metadata.version("apache-tvm-ffi")
    return tvm_version, ffi_version


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file, so that parallel test processes build the cache once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _runtime_dir() -> Path:
    tvm_version, ffi_version = _versions()
    return cache_dir() / "aarch64" / f"tvm-{tvm_version}_ffi-{ffi_version}"


def _runtime_complete(root: Path) -> bool:
    return (
        (root / "lib" / "libtvm_runtime.so").is_file()
        and (root / "lib" / "libtvm_ffi.so").is_file()
        and (root / "include" / "tvm" / "ffi" / "function.h").is_file()
        and (root / "include" / "dlpack" / "dlpack.h").is_file()
    )


def _extract(wheel: Path, dest: Path, members: dict[str, str]) -> None:
    """Copy wheel members whose name starts with a key of ``members`` to dest/value/..."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            for prefix, target in members.items():
                if info.filename == prefix or (
                    prefix.endswith("/") and info.filename.startswith(prefix)
                ):
                    rel = info.filename[len(prefix):] if prefix.endswith("/") else Path(
                        prefix).name
                    out = dest / target / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)


def ensure_runtime(verbose: bool = True) -> Path:
    """Download (once) the aarch64 TVM runtime matching the installed TVM and return its
    directory, holding ``lib/libtvm_runtime.so``, ``lib/libtvm_ffi.so`` and ``include/``."""
    root = _runtime_dir()
    if _runtime_complete(root):
        return root
    with _locked(root.parent / ".lock"):
        if _runtime_complete(root):
            return root
        tvm_version, ffi_version = _versions()
        pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as tmp:
            tmp = Path(tmp)
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--platform", _WHEEL_PLATFORM, "--python-version", pyver,
                "--disable-pip-version-check", "-d", str(tmp / "wheels"),
                f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}",
            ]
            if verbose:
                _log(
                    f"downloading the aarch64 wheels of apache-tvm=={tvm_version} and "
                    f"apache-tvm-ffi=={ffi_version} (about 100 MB, once) into {root} ..."
                )
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise EmulationError(
                    "could not download the aarch64 TVM wheels with pip:\n"
                    f"  {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}",
                    returncode=proc.returncode,
                    stderr=proc.stderr,
                )
            wheels = list((tmp / "wheels").glob("*.whl"))
            tvm_whl = [w for w in wheels if w.name.startswith("apache_tvm-")]
            ffi_whl = [w for w in wheels if w.name.startswith("apache_tvm_ffi-")]
            if not tvm_whl or not ffi_whl:
                raise EmulationError(f"pip download gave unexpected files: {wheels}")
            if verbose:
                _log(f"downloaded in {time.time() - t0:.0f} s; unpacking the runtime libraries")
            stage = tmp / "runtime"
            _extract(tvm_whl[0], stage, {"tvm/lib/libtvm_runtime.so": "lib"})
            _extract(
                ffi_whl[0],
                stage,
                {
                    "tvm_ffi/lib/libtvm_ffi.so": "lib",
                    "tvm_ffi/include/": "include",
                    "tvm_ffi/3rdparty/dlpack/include/": "include",
                },
            )
            if not _runtime_complete(stage):
                raise EmulationError(
                    f"the aarch64 wheels {tvm_whl[0].name}, {ffi_whl[0].name} do not contain "
                    "libtvm_runtime.so, libtvm_ffi.so and the tvm_ffi headers where expected"
                )
            if root.exists():
                shutil.rmtree(root)
            os.replace(stage, root)
    return root


def build_key(source: bytes, cxx: str) -> str:
    """Cache key of a cross-built binary: its source, the flags and the compiler."""
    h = hashlib.sha256()
    h.update(source)
    h.update(" ".join(_CXXFLAGS).encode())
    h.update(Path(cxx).name.encode())
    return h.hexdigest()[:16]


def check_qemu(cpu: str, error_cls=None) -> str:
    """qemu-aarch64's path, after checking the aarch64 sysroot and that qemu knows `cpu`."""
    error_cls = error_cls or EmulationError
    qemu = find_qemu()
    if not Path(QEMU_SYSROOT, "lib", "ld-linux-aarch64.so.1").exists():
        raise error_cls(
            f"the aarch64 sysroot {QEMU_SYSROOT} is missing: "
            "run `apt-get install libc6-dev-arm64-cross`"
        )
    cpus = qemu_cpus()
    if cpus and cpu not in cpus:
        raise error_cls(
            f"qemu-aarch64 has no CPU model {cpu!r}; available: {', '.join(cpus)}", cpu=cpu
        )
    return qemu


def build_aarch64_binary(source: Path, out_dir: Path, name: str, what: str, verbose: bool = True,
                         error_cls=None) -> Path:
    """Cross-compile (once) `source` against the cached aarch64 TVM runtime into out_dir/name.

    Shared by the runner and the RPC server; builds under the runtime's lock and renames into
    place atomically, so concurrent callers never see a half-written binary."""
    from tvm_intlstm.target import find_cross_compiler

    error_cls = error_cls or EmulationError
    runtime = ensure_runtime(verbose=verbose)
    binary = out_dir / name
    if binary.is_file():
        return binary
    cxx = find_cross_compiler({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    with _locked(runtime / ".lock"):
        if binary.is_file():
            return binary
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp_out = out_dir / f".{name}.{os.getpid()}"
        lib = runtime / "lib"
        cmd = [
            cxx, *_CXXFLAGS, str(source), "-o", str(tmp_out),
            f"-I{runtime / 'include'}", f"-L{lib}", f"-Wl,-rpath-link,{lib}",
            "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
            "-ldl", "-lpthread",
        ]
        if verbose:
            _log(f"building the aarch64 {what} with {Path(cxx).name} ...")
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                tmp_out.unlink()
            raise error_cls(
                f"building the {what} failed:\n  {' '.join(cmd)}\n{proc.stderr[-4000:]}",
                returncode=proc.returncode,
                stderr=proc.stderr,
            )
        os.replace(tmp_out, binary)
        if verbose:
            _log(f"{what} built in {time.time() - t0:.1f} s: {binary}")
    return binary


def ensure_runner(verbose: bool = True) -> Path:
    """Build (once) the aarch64 runner and return its path.

    Downloads the aarch64 TVM runtime first if needed (:func:`ensure_runtime`).  The binary is
    cached under ``<cache>/aarch64/tvm-.../runner-<hash of runner.cc>/``; progress messages go
    to stderr.
    """
    from tvm_intlstm.target import find_cross_compiler

    runtime = ensure_runtime(verbose=verbose)
    cxx = find_cross_compiler({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    out_dir = runtime / f"runner-{build_key(RUNNER_SOURCE.read_bytes(), cxx)}"
    return build_aarch64_binary(RUNNER_SOURCE, out_dir, _RUNNER_NAME, "runner", verbose)


# ----------------------------------------------------------------------------------------------
# qemu
# ----------------------------------------------------------------------------------------------


def find_qemu() -> str:
    """Path of ``qemu-aarch64`` (``$TVM_INTLSTM_QEMU`` overrides); raises EmulationError."""
    override = os.environ.get("TVM_INTLSTM_QEMU")
    for cand in ([override] if override else []) + ["qemu-aarch64", "qemu-aarch64-static"]:
        found = shutil.which(cand)
        if found:
            return found
    raise EmulationError(
        "qemu-aarch64 is not installed: run `apt-get install qemu-user` "
        f"(all ARM tools: `{_APT_ALL}`, or .ci/install_arm.sh)"
    )


_QEMU_CPUS: list[str] | None = None


def qemu_cpus() -> list[str]:
    """The CPU models this qemu-aarch64 emulates (``qemu-aarch64 -cpu help``)."""
    global _QEMU_CPUS
    if _QEMU_CPUS is None:
        proc = subprocess.run([find_qemu(), "-cpu", "help"], capture_output=True, text=True)
        names = []
        for line in proc.stdout.splitlines():
            line = line.strip()
            if line and not line.endswith(":") and " " not in line:
                names.append(line)
        _QEMU_CPUS = names
    return list(_QEMU_CPUS)


def qemu_cpu_for_target(target) -> str:
    """A qemu ``-cpu`` model able to run code built for ``target`` (a spec or Target):
    the preset's model, the target's own -mcpu when qemu has it, else the smallest model
    with the needed features (cortex-a72, cortex-a76 for dotprod, max for i8mm)."""
    from tvm_intlstm.target import PRESETS, target_features

    if isinstance(target, str) and target.strip() in PRESETS:
        cpu = PRESETS[target.strip()].qemu_cpu
        if cpu:
            return cpu
    feats = target_features(target)
    if not feats.is_aarch64:
        raise EmulationError(f"{target!r} is not an aarch64 target")
    if feats.mcpu in qemu_cpus():
        return feats.mcpu
    if feats.has_i8mm:
        return "max"
    if feats.has_dotprod:
        return "cortex-a76"
    return "cortex-a72"


def elf_machine(path: str | os.PathLike) -> str:
    """"aarch64", "x86_64" or "unknown" from a file's ELF header."""
    with open(path, "rb") as fh:
        head = fh.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return "unknown"
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return {_EM_AARCH64: "aarch64", _EM_X86_64: "x86_64"}.get(machine, "unknown")


_NPY_KINDS = {"b", "i", "u", "f"}


def _save_inputs(inputs: Sequence[np.ndarray], folder: Path) -> list[str]:
    paths = []
    for i, arr in enumerate(inputs):
        a = np.asarray(arr)
        if a.dtype.kind not in _NPY_KINDS or a.dtype.itemsize > 8 or (
            a.dtype.kind == "f" and a.dtype.itemsize < 2
        ):
            raise EmulationError(f"input {i}: dtype {a.dtype} is not supported by the runner")
        # little-endian, C order; (np.ascontiguousarray would turn a 0-d array into 1-d)
        a = np.require(a.astype(a.dtype.newbyteorder("<"), copy=False), requirements="C")
        p = folder / f"input_{i}.npy"
        np.save(p, a, allow_pickle=False)
        paths.append(str(p))
    return paths


def _no_core_dumps() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _parse_stdout(stdout: str) -> dict[str, str]:
    info = {}
    for line in stdout.splitlines():
        key, sep, val = line.partition(": ")
        if sep:
            info[key.strip()] = val.strip()
    return info


def run_emulated(
    lib_path: str | os.PathLike,
    inputs: Iterable[np.ndarray],
    cpu: str = "cortex-a76",
    repeat: int = 0,
    *,
    function: str = "main",
    num_threads: int = 1,
    timeout: float | None = 600,
    verbose: bool = True,
) -> EmulatedOutputs:
    """Run the Relax function ``function`` of an aarch64 module library under qemu.

    ``lib_path``: a .so exported for an aarch64 target (e.g. by
    ``tvm_intlstm.target.export_library``).  ``inputs``: numpy arrays (bool, int8..int64,
    uint8..uint64, float16/32/64), passed in order.  ``cpu``: qemu's CPU model
    (:func:`qemu_cpus`; ``max`` has every feature).  ``repeat > 0`` also times that many
    calls after the first (``.median_us`` of the result).  ``num_threads`` sets
    TVM_NUM_THREADS in the emulated process.

    Returns the outputs as a list of arrays (a tuple result is flattened in order).
    Raises :class:`EmulationError`: qemu missing, SIGILL (an instruction the emulated CPU
    lacks, e.g. sdot without dotprod), or any other failure with the runner's stderr.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise EmulationError(f"module library {lib_path} does not exist")
    machine = elf_machine(lib_path)
    if machine != "aarch64":
        raise EmulationError(
            f"{lib_path} is a {machine} library, not aarch64: build it for an aarch64 target "
            "(e.g. \"llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76\") and export it with "
            "tvm_intlstm.target.export_library"
        )
    qemu = check_qemu(cpu)
    if repeat < 0:
        raise ValueError("repeat must be >= 0")
    runner = ensure_runner(verbose=verbose)
    libdir = runner.parent.parent / "lib"

    with tempfile.TemporaryDirectory(prefix="tvm_intlstm_emu_") as tmp:
        tmp = Path(tmp)
        in_paths = _save_inputs(list(inputs), tmp)
        out_dir = tmp / "out"
        out_dir.mkdir()
        cmd = [
            qemu, "-L", QEMU_SYSROOT, "-cpu", cpu,
            "-E", f"LD_LIBRARY_PATH={libdir}",
            "-E", f"TVM_NUM_THREADS={int(num_threads)}",
        ]
        if "LD_PRELOAD" in os.environ:
            cmd += ["-U", "LD_PRELOAD"]
        cmd += [str(runner), "-o", str(out_dir), "-f", function]
        if repeat:
            cmd += ["-r", str(int(repeat))]
        cmd += [str(lib_path.resolve()), *in_paths]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout,
                preexec_fn=_no_core_dumps,
            )
        except subprocess.TimeoutExpired as err:
            raise EmulationError(
                f"the emulated run did not finish within {timeout} s: {' '.join(cmd)}",
                cpu=cpu,
                stderr=(err.stderr or b"").decode(errors="replace")
                if isinstance(err.stderr, bytes) else (err.stderr or ""),
            ) from None
        rc = proc.returncode
        if rc in (-signal.SIGILL, 128 + signal.SIGILL) or "Illegal instruction" in proc.stderr:
            raise EmulationError(
                f"{lib_path.name} executed an instruction that the emulated CPU {cpu!r} does "
                f"not support (SIGILL), e.g. sdot/udot on a CPU without dotprod or smmla "
                f"without i8mm: build for a target matching that CPU (e.g. -mcpu={cpu} without "
                f"+dotprod), or emulate a CPU that has the feature (cortex-a76, max)."
                + (f"\n{proc.stderr.strip()}" if proc.stderr.strip() else ""),
                returncode=rc,
                stderr=proc.stderr,
                cpu=cpu,
                illegal_instruction=True,
            )
        if rc != 0:
            if rc < 0:
                try:
                    what = f"was killed by {signal.Signals(-rc).name}"
                except ValueError:
                    what = f"was killed by signal {-rc}"
            else:
                what = f"exited with status {rc}"
            raise EmulationError(
                f"the runner {what} running {lib_path.name} under qemu -cpu {cpu}:\n"
                f"{proc.stderr.strip()}\ncommand: {' '.join(cmd)}",
                returncode=rc,
                stderr=proc.stderr,
                cpu=cpu,
            )
        info = _parse_stdout(proc.stdout)
        n = int(info.get("num_outputs", "0"))
        result = EmulatedOutputs(
            np.load(out_dir / f"output_{i}.npy", allow_pickle=False) for i in range(n)
        )
        result.stdout = proc.stdout
        result.stderr = proc.stderr
        if repeat:
            result.median_us = float(info["median_us"])
            result.min_us = float(info["min_us"])
            result.mean_us = float(info["mean_us"])
        return result


# ----------------------------------------------------------------------------------------------
# Disassembly
# ----------------------------------------------------------------------------------------------


def _objdump_for(machine: str) -> str:
    if machine == "aarch64":
        cands = ["aarch64-linux-gnu-objdump"]
        if os.uname().machine in ("aarch64", "arm64"):
            cands.append("objdump")
        hint = "apt-get install binutils-aarch64-linux-gnu"
    else:
        cands = ["objdump", "x86_64-linux-gnu-objdump"]
        hint = "apt-get install binutils"
    cands.append("llvm-objdump")
    for c in cands:
        found = shutil.which(c)
        if found:
            return found
    raise EmulationError(f"no objdump for {machine} code: run `{hint}`")


def instruction_count(lib_path: str | os.PathLike, mnemonic: str) -> int:
    """How many instructions with this mnemonic (e.g. ``"sdot"``, ``"smmla"``,
    ``"vpdpbusd"``) the library's disassembly (objdump -d) contains."""
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise FileNotFoundError(f"{lib_path} does not exist")
    objdump = _objdump_for(elf_machine(lib_path))
    proc = subprocess.run([objdump, "-d", str(lib_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationError(f"{objdump} -d {lib_path} failed:\n{proc.stderr}")
    want = mnemonic.lower()
    count = 0
    for line in proc.stdout.splitlines():
        parts = line.split("\t")
        # objdump: "  addr:\t<bytes> \t<mnemonic>\t<operands>"
        if len(parts) >= 3 and parts[0].rstrip().endswith(":"):
            if parts[2].strip().split(" ")[0].lower() == want:
                count += 1
    return count


def check_uses_instruction(lib_path: str | os.PathLike, mnemonic: str = "sdot") -> bool:
    """True if the library's machine code contains at least one ``mnemonic`` instruction
    (disassembled with aarch64-linux-gnu-objdump for ARM libraries)."""
    return instruction_count(lib_path, mnemonic) > 0
