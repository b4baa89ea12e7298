"""TVM RPC for tvm_intlstm modules: run and time an exported module on a remote device.

Two kinds of servers speak the same protocol (``tvm.rpc``):

* on a real board: ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (needs the
  ``apache-tvm`` wheel on the board), or the C++ server below built natively;
* on this machine, under qemu-aarch64: :class:`EmulatedRPCServer` (or
  :func:`start_emulated_server`) runs ``tvm_intlstm_rpc_server``, a small C++ program built
  against the aarch64 ``libtvm_runtime.so`` of the PyPI wheel (the source is
  :data:`RPC_SERVER_SOURCE`, ``rpc_server.cc`` next to this file; it is cross-compiled and cached
  like the emulation runner, see
  :mod:`tvm_intlstm.runtime.emulate`).  The aarch64 wheels contain no Python interpreter that
  qemu could run, but their ``libtvm_runtime.so`` has the whole RPC server side
  (``rpc.ServerLoop``, ``tvm.rpc.server.upload``/``download``/``remove``); the program adds
  the TCP accept loop, the handshake of ``tvm/rpc/server.py``, and the two functions Python's
  server registers (``tvm.rpc.server.workpath``, ``tvm.rpc.server.load_module``).

Client side (x86 Python): :func:`run_remote` uploads the library, loads it on the remote,
runs its Relax function through a remote ``relax.VirtualMachine`` and returns numpy outputs;
:func:`time_remote` also times it with ``time_evaluator`` on the remote device;
:func:`connect_vm` keeps one session open for many calls.  For tools that drive a server for a
long time (tuning over RPC, ``tvm_intlstm.tuning``): :func:`parse_rpc_address`
(``"host:port[:key]"``), :func:`check_server` (TCP connection and RPC handshake with timeouts,
:class:`RPCConnectError` saying what is wrong), :func:`open_session` (``tvm.rpc.connect`` with
that error) and :func:`is_session_death` (does an error mean the session is gone).  For a fleet
behind TVM's RPC tracker (``python -m tvm.exec.rpc_tracker``; boards run ``python -m
tvm.exec.rpc_server --tracker host:port --key <key>``): :func:`parse_tracker_address`
(``"tracker://host:port/key"``), :func:`check_tracker` (servers registered under the key) and
:func:`request_session` (a session with a free server, and which one it is).

The RPC server executes whatever library a client uploads: bind it to 127.0.0.1 (the default
here) or use it only on a trusted network.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tvm_intlstm.runtime.emulate import (
    QEMU_SYSROOT,
    EmulationError,
    build_aarch64_binary,
    build_key,
    check_qemu,
    _no_core_dumps,
    elf_machine,
    ensure_runtime,
)

__all__ = [
    "RPC_SERVER_SOURCE",
    "RPCServerError",
    "RPCConnectError",
    "RemoteSessionError",
    "EmulatedRPCServer",
    "RemoteVM",
    "RemoteTiming",
    "ensure_rpc_server",
    "start_emulated_server",
    "start_local_server",
    "connect_vm",
    "run_remote",
    "time_remote",
    "parse_rpc_address",
    "check_server",
    "open_session",
    "is_session_death",
    "parse_tracker_address",
    "check_tracker",
    "tracker_servers",
    "request_session",
]

_SERVER_NAME = "tvm_intlstm_rpc_server"


class RPCServerError(EmulationError):
    """The emulated RPC server could not be built or started, or died; the message says why
    (``stderr`` holds the server's log)."""


class RPCConnectError(ConnectionError):
    """The RPC server cannot be used: unreachable (nothing listens, host down, firewall), not a
    TVM RPC server, a different RPC key, or no answer to the handshake in time (e.g. busy with
    another client's session).  The message says which and how to start a server."""


class RemoteSessionError(RuntimeError):
    """The remote session ended while running the module (the session process on the
    device crashed, e.g. SIGILL for sdot on a CPU without dotprod, or a session timeout).
    The server's log says why (``EmulatedRPCServer.sessions()`` for the emulated one)."""


#: how to start a server on a board (quoted in error messages)
BOARD_SERVER_HINT = ("on the board: `python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090` "
                     "(apache-tvm of the same version as here; see docs/arm.md)")


#: C++ source of the RPC server run under qemu (or built natively on a board), shipped as package
#: data next to this file.
RPC_SERVER_SOURCE = Path(__file__).resolve().parent / "rpc_server.cc"


# ----------------------------------------------------------------------------------------------
# The aarch64 server binary
# ----------------------------------------------------------------------------------------------


def ensure_rpc_server(verbose: bool = True) -> Path:
    """Build (once) the aarch64 ``tvm_intlstm_rpc_server`` and return its path.

    Cached under ``<cache>/aarch64/tvm-<ver>_ffi-<ver>/rpc-server-<hash>/`` next to the
    runtime libraries it links (:func:`tvm_intlstm.runtime.emulate.ensure_runtime` downloads
    them first if needed).  About 10 s of cross-compilation the first time."""
    from tvm_intlstm.target import find_cross_compiler

    runtime = ensure_runtime(verbose=verbose)
    cxx = find_cross_compiler({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    out_dir = runtime / f"rpc-server-{build_key(RPC_SERVER_SOURCE.read_bytes(), cxx)}"
    return build_aarch64_binary(RPC_SERVER_SOURCE, out_dir, _SERVER_NAME, "RPC server", verbose,
                                RPCServerError)


# ----------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------


class EmulatedRPCServer:
    """A TVM RPC server for aarch64 running under ``qemu-aarch64 -cpu <cpu>`` on this machine.

    ``port=0`` (the default) lets the system pick a free port; ``.host``/``.port`` tell where
    it listens.  ``key`` is the RPC key clients must give (``tvm.rpc.connect(host, port,
    key=...)``).  Sessions are served one at a time, each in a forked process with its own
    temporary work directory; a session whose module executes an instruction the emulated
    CPU lacks (SIGILL) ends with an error on the client side, the server keeps running and
    notes it in :attr:`log`.  ``max_sessions > 0`` makes the server exit after that many.

    Use as a context manager (or call :meth:`close`): the server and any session still
    running are killed on exit.  Timings measured through it are qemu's speed, not a board's.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cpu: str = "cortex-a76",
        key: str = "",
        num_threads: int = 1,
        max_sessions: int = 0,
        startup_timeout: float = 120.0,
        verbose: bool = True,
    ):
        qemu = check_qemu(cpu, RPCServerError)
        if any(c.isspace() for c in key):
            raise ValueError(f"an RPC key cannot contain whitespace: {key!r}")
        binary = ensure_rpc_server(verbose=verbose)
        libdir = binary.parent.parent / "lib"
        self.cpu = cpu
        self.key = key
        self.host = host
        self.port: int | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="tvm_intlstm_rpc_")
        tmp = Path(self._tmp.name)
        (tmp / "work").mkdir()
        self._out_path = tmp / "server.out"
        self._log_path = tmp / "server.log"
        cmd = [
            qemu, "-L", QEMU_SYSROOT, "-cpu", cpu,
            "-E", f"LD_LIBRARY_PATH={libdir}",
            "-E", f"TVM_NUM_THREADS={int(num_threads)}",
        ]
        if "LD_PRELOAD" in os.environ:
            cmd += ["-U", "LD_PRELOAD"]
        cmd += [
            str(binary), "--host", host, "--port", str(int(port)), "--key", key,
            "--work-dir", str(tmp / "work"), "--max-sessions", str(int(max_sessions)),
        ]
        self.command = cmd
        with open(self._out_path, "wb") as out, open(self._log_path, "wb") as err:
            # a new session (process group) of its own, so that close() also ends the
            # forked session processes
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_no_core_dumps,
            )
        try:
            self._wait_listening(startup_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self._out_path.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("listening: "):
                    self.port = int(line.rsplit(":", 1)[1])
                    return
            rc = self._proc.poll()
            if rc is not None:
                raise RPCServerError(
                    f"the emulated RPC server exited with status {rc} before listening:\n"
                    f"{self.log.strip()}\ncommand: {' '.join(self.command)}",
                    returncode=rc, stderr=self.log, cpu=self.cpu,
                )
            if time.monotonic() > deadline:
                raise RPCServerError(
                    f"the emulated RPC server did not start listening within {timeout} s:\n"
                    f"{self.log.strip()}",
                    stderr=self.log, cpu=self.cpu,
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """Process id of qemu-aarch64 running the server (also its process group id)."""
        return self._proc.pid

    @property
    def log(self) -> str:
        """The server's stderr so far (one line per session start/end, load_module, errors)."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def sessions(self) -> list[str]:
        """How each finished session ended, in order: "exit status 0", or e.g.
        "killed by signal 4 (Illegal instruction): ..."."""
        out = []
        for line in self.log.splitlines():
            head, sep, how = line.partition(" ended: ")
            if sep and head.startswith("tvm_intlstm_rpc_server: session "):
                out.append(how)
        return out

    def connect(self, session_timeout: float = 0):
        """A ``tvm.rpc`` session with this server."""
        from tvm import rpc

        return rpc.connect(self.host, self.port, key=self.key, session_timeout=session_timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the server and every session process it started (SIGTERM, then SIGKILL)."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            # the server kills and reaps a running session on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc is not None:
            # forked sessions share the group; make sure none outlives the server
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmulatedRPCServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close(timeout=1.0)

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        return f"EmulatedRPCServer({self.host}:{self.port}, cpu={self.cpu!r}, {state})"


def start_emulated_server(host: str = "127.0.0.1", port: int = 0, **kwargs) -> EmulatedRPCServer:
    """Start an :class:`EmulatedRPCServer` (aarch64 under qemu) and return it once it listens."""
    return EmulatedRPCServer(host, port, **kwargs)


def start_local_server(host: str = "127.0.0.1", port: int = 9091, port_end: int = 9199,
                       key: str = ""):
    """TVM's own Python RPC server (``tvm.rpc.Server``, what ``python -m tvm.exec.rpc_server``
    runs on a board) on this machine, for x86_64 libraries: the same client code path as a
    board.  Returns the ``tvm.rpc.Server``; ``.port`` is the port it bound, ``.terminate()``
    stops it."""
    from tvm import rpc

    return rpc.Server(host=host, port=port, port_end=port_end, key=key, silent=True)


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------


def _prepare_inputs(lib_path: Path, inputs: Iterable) -> list[np.ndarray]:
    """The same input checks as CompiledModule, from the module's .json metadata."""
    from .inputs import check_inputs_for_library
    return check_inputs_for_library(lib_path, inputs)


def _flatten(value, out: list) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        out.append(value.numpy())
    elif isinstance(value, (list, tuple)) or (
        hasattr(value, "__len__") and hasattr(value, "__getitem__") and not hasattr(value, "numpy")
    ):
        for item in value:
            _flatten(item, out)
    elif isinstance(value, (bool, int, np.integer)):
        out.append(np.array(value, dtype=np.int64))
    elif isinstance(value, (float, np.floating)):
        out.append(np.array(value, dtype=np.float64))
    elif value is not None:
        out.append(np.asarray(value.numpy()))
    return out


class RemoteVM:
    """A Relax VM of an uploaded module on a remote device, over one RPC session.

    ``rvm(*inputs)`` returns the outputs as a list of numpy arrays (a tuple result flattened in
    order, like :func:`tvm_intlstm.runtime.emulate.run_emulated`); :meth:`time` times the
    function on the remote device with ``time_evaluator``.  Attributes: ``session``
    (``tvm.rpc.RPCSession``), ``device`` (remote CPU), ``vm`` (``relax.VirtualMachine``),
    ``lib_path``."""

    def __init__(self, session, lib_path: Path, function: str = "main"):
        from tvm import relax

        self.session = session
        self.lib_path = lib_path
        self.function = function
        name = lib_path.name
        session.upload(str(lib_path), target=name)
        self._rmod = session.load_module(name)
        self.device = session.cpu(0)
        self.vm = relax.VirtualMachine(self._rmod, self.device)

    def close(self) -> None:
        """Drop the remote objects and the session: the socket closes (once no remote
        tensor made by the caller is left), which ends the session on the server."""
        self.vm = None
        self._rmod = None
        self.device = None
        self.session = None

    def _args(self, inputs):
        import tvm

        return [tvm.runtime.tensor(a, self.device)
                for a in _prepare_inputs(self.lib_path, inputs)]

    def _invoke(self, args) -> list[np.ndarray]:
        # the stateful interface (set_input / invoke_stateful / get_outputs) is the one that
        # works over RPC for every result: a tuple returned by a direct call would arrive as
        # an opaque remote handle, get_outputs fetches its fields one by one
        # (VirtualMachine.get_outputs is not used: its recursive closure is a reference cycle
        # holding the VM, hence the session, until the garbage collector runs; a session
        # left open blocks a server that serves one session at a time)
        self.vm.set_input(self.function, *args)
        self.vm.invoke_stateful(self.function)
        return _flatten(self._output(()), [])

    def _output(self, idx: tuple):
        arity = self.vm["get_output_arity"](self.function, *idx)
        if arity == -1:
            return self.vm["get_output"](self.function, *idx)
        return tuple(self._output((*idx, i)) for i in range(arity))

    def __call__(self, *inputs) -> list[np.ndarray]:
        args = self._args(inputs)
        with _session_errors(self.lib_path):
            return self._invoke(args)

    def time(self, *inputs, number: int = 10, repeat: int = 3, min_repeat_ms: int = 0,
             with_outputs: bool = True) -> RemoteTiming:
        """Time ``number`` x ``repeat`` calls on the remote device (after one warm-up call,
        which also gives ``.outputs``)."""
        args = self._args(inputs)
        with _session_errors(self.lib_path):
            if with_outputs:
                outputs = self._invoke(args)
            else:
                self.vm.set_input(self.function, *args)
                outputs = []
            ev = self.vm.time_evaluator("invoke_stateful", self.device, number=number,
                                        repeat=repeat, min_repeat_ms=min_repeat_ms)
            res = ev(self.function)
        results_us = [float(r) * 1e6 for r in res.results]
        return RemoteTiming(
            median_us=float(np.median(results_us)), mean_us=float(np.mean(results_us)),
            min_us=float(np.min(results_us)), max_us=float(np.max(results_us)),
            std_us=float(np.std(results_us)), number=number, repeat=repeat,
            results_us=results_us, outputs=outputs,
        )


@contextlib.contextmanager
def _session_errors(lib_path: Path):
    """Turn "the remote end went away" errors of the RPC client into RemoteSessionError."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - tvm.error.* and socket errors
        msg = str(err)
        if is_session_death(err):
            raise RemoteSessionError(
                f"the remote session ended while running {lib_path.name}: the session process "
                "on the device died (e.g. SIGILL: an instruction the device's CPU lacks, such "
                "as sdot in a +dotprod build on a Cortex-A53/A72; or the session timeout); "
                f"see the RPC server's log.\n({msg.strip().splitlines()[-1] if msg else err!r})"
            ) from err
        raise


@dataclass
class RemoteTiming:
    """Result of :func:`time_remote`: microseconds per call of each of the ``repeat``
    measurements (each the mean of ``number`` calls), their statistics, and the outputs of
    the warm-up call."""

    median_us: float
    mean_us: float
    min_us: float
    max_us: float
    std_us: float
    number: int
    repeat: int
    results_us: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list, repr=False)


def _check_lib(lib_path) -> Path:
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise FileNotFoundError(f"module library {lib_path} does not exist")
    if elf_machine(lib_path) == "unknown":
        raise ValueError(f"{lib_path} is not a shared library (export it with export_library)")
    return lib_path


@contextlib.contextmanager
def connect_vm(lib_path: str | os.PathLike, host: str, port: int, *, key: str = "",
               function: str = "main", session_timeout: float = 0):
    """Context manager: connect to the RPC server at ``host:port``, upload ``lib_path`` and
    yield a :class:`RemoteVM` for it; the session is closed on exit.  ``session_timeout``
    (seconds, 0 = none) lets the server end a session that runs too long."""
    import tvm  # noqa: F401  (registers the RPC client functions)
    from tvm import rpc

    lib_path = _check_lib(lib_path)
    rvm = RemoteVM(rpc.connect(host, int(port), key=key, session_timeout=session_timeout),
                   lib_path, function)
    try:
        yield rvm
    finally:
        rvm.close()
        # any reference cycle still holding a remote object would keep the session open
        gc.collect()


def run_remote(lib_path: str | os.PathLike, inputs: Sequence, host: str, port: int, *,
               key: str = "", function: str = "main",
               session_timeout: float = 0) -> list[np.ndarray]:
    """Run the Relax function ``function`` of an exported module on the RPC server at
    ``host:port`` (a board, or :class:`EmulatedRPCServer`) and return its outputs as numpy
    arrays (flattened like :func:`tvm_intlstm.runtime.emulate.run_emulated`).  Inputs are
    checked against the module's .json metadata when it exists."""
    with connect_vm(lib_path, host, port, key=key, function=function,
                    session_timeout=session_timeout) as rvm:
        return rvm(*inputs)


def time_remote(lib_path: str | os.PathLike, inputs: Sequence, host: str, port: int, *,
                key: str = "", function: str = "main", number: int = 10, repeat: int = 3,
                min_repeat_ms: int = 0, session_timeout: float = 0) -> RemoteTiming:
    """Time ``function`` of an exported module on the RPC server at ``host:port`` with TVM's
    ``time_evaluator`` (the clock runs on the remote device, so network latency is not
    included).  Returns a :class:`RemoteTiming` (``median_us``, ..., and the ``outputs`` of
    the warm-up call)."""
    with connect_vm(lib_path, host, port, key=key, function=function,
                    session_timeout=session_timeout) as rvm:
        return rvm.time(*inputs, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)


# ----------------------------------------------------------------------------------------------
# Connections: addresses, a quick reachability check, sessions with clear errors
# ----------------------------------------------------------------------------------------------

_RPC_MAGIC = 0xFF271            # tvm.rpc.base.RPC_MAGIC
_RPC_CODE_SUCCESS = _RPC_MAGIC
_RPC_CODE_MISMATCH = _RPC_MAGIC + 2

#: substrings of the client's errors when the remote end of a session went away
#: (kShutdown / "code=1": the session process died, e.g. SIGILL or the server's session timeout;
#: RPCSessionTimeoutError: TVM's Python server ended the session)
_DEATH_MARKS = ("kShutdown", "RPCCode::kReturn) is false", "SockChannel", "Connection reset",
                "Broken pipe", "RPCSessionTimeoutError")


def is_session_death(err: BaseException) -> bool:
    """True when ``err`` (raised by a ``tvm.rpc`` call) means the remote session is gone: its
    process died (SIGILL, segfault), the server ended it (session timeout) or the connection
    broke.  The session cannot be used any more; a new one can be opened."""
    msg = str(err)
    return any(m in msg for m in _DEATH_MARKS) or isinstance(
        err, (ConnectionError, BrokenPipeError))


def parse_rpc_address(spec: str) -> tuple[str, int, str]:
    """``"host:port"`` or ``"host:port:key"`` (IPv6 hosts in brackets: ``"[::1]:9090"``) ->
    ``(host, port, key)``.  Raises ValueError with an example."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an RPC address is 'host:port' or 'host:port:key', got {spec!r}")
    s = spec.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1:end + 2] != ":":
            raise ValueError(f"an RPC address is 'host:port' or 'host:port:key' (IPv6: "
                             f"'[::1]:9090'), got {spec!r}")
        host, rest = s[1:end], s[end + 2:]
    else:
        host, sep, rest = s.partition(":")
        if not sep:
            raise ValueError(f"an RPC address is 'host:port' or 'host:port:key' (e.g. "
                             f"'192.168.1.50:9090' or 'rpi5.local:9090:rpi5'), got {spec!r}: "
                             "no port")
    port_s, _, key = rest.partition(":")
    try:
        port = int(port_s)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad port {port_s!r} in RPC address {spec!r} (expected 'host:port' "
                         "or 'host:port:key', port 1-65535)") from None
    if not host:
        raise ValueError(f"no host in RPC address {spec!r}")
    if any(c.isspace() for c in key):
        raise ValueError(f"an RPC key cannot contain whitespace: {key!r}")
    return host, port, key


def check_server(host: str, port: int, key: str = "", timeout: float = 10.0) -> float:
    """Check quickly that a TVM RPC server answers at ``host:port`` with ``key``: a TCP
    connection and the RPC handshake of ``tvm.rpc.connect``, each bounded by ``timeout``
    seconds (``tvm.rpc.connect`` itself can block for minutes on an address that drops
    packets, or forever on a server busy with another session).  Returns the round-trip
    seconds.  Raises :class:`RPCConnectError` saying what is wrong.

    The check opens (and at once closes) one session on the server."""
    import socket
    import struct

    where = f"{host}:{port}"
    t0 = time.perf_counter()
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.timeout:
        raise RPCConnectError(
            f"cannot reach the RPC server at {where}: no answer within {timeout:g} s (host down, "
            f"wrong address, or a firewall); {BOARD_SERVER_HINT}") from None
    except OSError as e:
        raise RPCConnectError(
            f"cannot reach the RPC server at {where}: {e.strerror or e} (is the server "
            f"running?); {BOARD_SERVER_HINT}") from None
    try:
        sock.settimeout(timeout)
        head = f"client:{key}".encode()
        sock.sendall(struct.pack("<ii", _RPC_MAGIC, len(head)) + head)

        def recv(n):
            got = b""
            while len(got) < n:
                chunk = sock.recv(n - len(got))
                if not chunk:
                    break
                got += chunk
            return got

        data = recv(4)
        if len(data) == 4 and struct.unpack("<i", data)[0] == _RPC_CODE_SUCCESS:
            # read the whole answer ([len, "server:<key>"]): closing with unread data would
            # reset the connection instead of ending the session the server just started
            (n,) = struct.unpack("<i", recv(4).ljust(4, b"\0"))
            recv(max(0, min(n, 4096)))
    except socket.timeout:
        raise RPCConnectError(
            f"the RPC server at {where} accepted the connection but did not answer the TVM RPC "
            f"handshake within {timeout:g} s: it serves one session at a time and may be busy "
            "with another client, or it is not a TVM RPC server") from None
    except OSError as e:
        raise RPCConnectError(f"the RPC server at {where} closed the connection during the "
                              f"handshake ({e.strerror or e}); is it a TVM RPC server?") from None
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    if len(data) < 4:
        raise RPCConnectError(f"{where} is not a TVM RPC server (it closed the connection "
                              "without answering the handshake)")
    (code,) = struct.unpack("<i", data)
    if code == _RPC_CODE_MISMATCH:
        raise RPCConnectError(
            f"the RPC server at {where} expects a different key than {key!r}: give the key it "
            "was started with (`--key` of the server; 'host:port:key')")
    if code != _RPC_CODE_SUCCESS:
        raise RPCConnectError(f"{where} is not a TVM RPC server (handshake answer {code:#x})")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# An RPC tracker: a fleet of boards registered under a device key
# ----------------------------------------------------------------------------------------------

#: how to start a tracker and register boards with it (quoted in error messages)
TRACKER_HINT = ("start a tracker with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190` "
                "and on each board `python -m tvm.exec.rpc_server --tracker <tracker host>:9190 "
                "--key <key>`")


def parse_tracker_address(spec: str) -> tuple[str, int, str]:
    """``"tracker://host:port/key"`` (IPv6 hosts in brackets) -> ``(host, port, key)``; the key
    (the ``--key`` the boards registered with) is required.  Raises ValueError with an example."""
    example = "e.g. 'tracker://192.168.1.10:9190/rpi5'"
    if not isinstance(spec, str) or not spec.startswith("tracker://"):
        raise ValueError(f"a tracker address is 'tracker://host:port/key' ({example}), got {spec!r}")
    addr, sep, key = spec[len("tracker://"):].partition("/")
    if not sep or not key.strip():
        raise ValueError(f"the tracker address {spec!r} has no device key: the tracker hands out "
                         f"the servers registered under a key, 'tracker://host:port/<key>' ({example})")
    host, port, extra = parse_rpc_address(addr)
    if extra:
        raise ValueError(f"bad tracker address {spec!r}: the key goes after '/' ({example})")
    if any(c.isspace() for c in key) or "/" in key:
        raise ValueError(f"bad device key {key!r} in tracker address {spec!r}")
    return host, port, key


def _tracker_socket(host: str, port: int, timeout: float):
    """A connection to the tracker at host:port after its handshake; RPCConnectError if none."""
    import socket
    import struct

    from tvm.rpc import base

    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.timeout:
        raise RPCConnectError(f"cannot reach the RPC tracker at {where}: no answer within "
                              f"{timeout:g} s; {TRACKER_HINT}") from None
    except OSError as e:
        raise RPCConnectError(f"cannot reach the RPC tracker at {where}: {e.strerror or e} (is "
                              f"the tracker running?); {TRACKER_HINT}") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        data = base.recvall(sock, 4)
    except (OSError, RuntimeError):
        sock.close()
        raise RPCConnectError(f"{where} did not answer the RPC tracker handshake within "
                              f"{timeout:g} s: is it a tracker (not a server)?") from None
    if struct.unpack("<i", data)[0] != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RPCConnectError(f"{where} is not an RPC tracker (a server? then use 'host:port' "
                              f"without tracker://)")
    return sock


def tracker_servers(host: str, port: int, key: str, timeout: float = 10.0) -> tuple[int, dict]:
    """(free servers, {key: number of registered servers}) of the tracker at host:port for device
    key `key`; RPCConnectError when the tracker cannot be reached."""
    from tvm.rpc import base

    sock = _tracker_socket(host, port, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except OSError as e:
        raise RPCConnectError(f"the RPC tracker at {host}:{port} did not answer a summary "
                              f"request ({e})") from None
    finally:
        sock.close()
    summary = value[1] if value and value[0] == base.TrackerCode.SUCCESS else {}
    counts: dict = {}
    for item in summary.get("server_info", []):
        k = str(item.get("key", "")).partition(":")[2]    # "server:<key>"
        counts[k] = counts.get(k, 0) + 1
    free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    return free, counts


def check_tracker(host: str, port: int, key: str, timeout: float = 10.0) -> int:
    """The number of servers registered at the tracker under `key` (at least one); raises
    RPCConnectError when the tracker cannot be reached or has none."""
    _, counts = tracker_servers(host, port, key, timeout)
    if not counts.get(key):
        others = ", ".join(f"{k!r} ({n})" for k, n in sorted(counts.items())) or "none"
        raise RPCConnectError(
            f"the RPC tracker at {host}:{port} has no server registered with key {key!r} "
            f"(keys there: {others}); on each board run `python -m tvm.exec.rpc_server --tracker "
            f"{host}:{port} --key {key}`")
    return counts[key]


def request_session(host: str, port: int, key: str, session_timeout: float = 0,
                    wait: float = 600.0):
    """A session with a free server of the tracker at host:port registered under `key`:
    (``tvm.rpc`` session, "server host:port").  Waits up to `wait` seconds for a server to become
    free (the tracker hands each server to one client at a time); RPCConnectError if none does or
    the tracker cannot be reached."""
    from tvm.rpc import base

    sock = _tracker_socket(host, port, min(float(wait), 10.0))
    try:
        sock.settimeout(wait)
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
        value = base.recvjson(sock)
    except OSError as e:
        raise RPCConnectError(
            f"no server with key {key!r} became free at the RPC tracker {host}:{port} within "
            f"{wait:g} s ({type(e).__name__}); check its servers (`python -m "
            f"tvm.exec.query_rpc_tracker --host {host} --port {port}`)") from None
    finally:
        sock.close()
    if not value or value[0] != base.TrackerCode.SUCCESS:
        raise RPCConnectError(f"the RPC tracker at {host}:{port} refused the request for key "
                              f"{key!r}: {value}")
    shost, sport, matchkey = value[1]
    return open_session(shost, int(sport), matchkey, session_timeout), f"{shost}:{sport}"


def open_session(host: str, port: int, key: str = "", session_timeout: float = 0):
    """``tvm.rpc.connect`` with its failures turned into :class:`RPCConnectError`."""
    import tvm  # noqa: F401  (registers the RPC client functions)
    from tvm import rpc

    try:
        return rpc.connect(host, int(port), key=key, session_timeout=session_timeout)
    except Exception as e:  # noqa: BLE001 - tvm errors of the C++ client
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        if "matches key" in msg:
            raise RPCConnectError(f"the RPC server at {host}:{port} expects a different key than "
                                  f"{key!r} ({msg})") from None
        if "Connect to" in msg and "failed" in msg:
            msg = "connection refused or host unreachable (is the server running?)"
        raise RPCConnectError(f"cannot open an RPC session with {host}:{port}: {msg}; "
                              f"{BOARD_SERVER_HINT}") from None
