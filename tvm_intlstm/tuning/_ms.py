"""MetaSchedule plumbing for our GEMM tasks: cheap imports, in-process builder and runner, progress.

Why not MetaSchedule's LocalBuilder / LocalRunner: both run every build or measurement in a fresh
popen worker, and a fresh worker must `import tvm` (13-27 s on these 2-core machines, torch is
imported by tvm_ffi) and, in LocalBuilder's default f_build, `import tvm.s_tir.tensor_intrin`,
which imports every backend's intrinsics and took minutes here. Our kernels build in a fraction of
a second, so `InProcessBuilder` and `InProcessRunner` build and time them in the tuning process
itself (a trial then costs well under a second plus the run time). The price is no timeout and no
isolation: a crash in LLVM would end the tuning session, which the append-only database makes
resumable (`tune(..., resume=True)`).

`fast_tensor_intrin()` is the other half: TuneContext's constructor imports
`tvm.s_tir.tensor_intrin` too. While the context manager is active, `tvm.s_tir.tensor_intrin` is
an empty package object (with the real `__path__`, so `import tvm.s_tir.tensor_intrin.x86` still
works and registers x86 only); our own intrinsic is registered by `gemm.register_intrinsics()`.
If the real package was imported already, nothing changes.

Tuning over RPC (for a board: `tune(..., rpc="board:9090")`): `RPCBuilder` builds like
`InProcessBuilder` but exports each candidate as a shared library for the target (cross-linked
with the aarch64 compiler, `tvm_intlstm.target.export_library`) into a temporary directory;
`RPCRunner` measures each one on the RPC server: one short session per candidate (connect,
upload, load, run once on the valid random inputs of `make_case` and check the output bit for
bit, then `time_evaluator` on the device), so that a candidate that kills its session (SIGILL,
a crash, the session timeout of `RPCConfig.timeout`) is one failed trial and the next candidate
simply gets a new session. When the server cannot be reached at all (after `RPCConfig.retries`
attempts) the runner raises `RPCConnectError`, which ends tuning; the database keeps what was
measured, so the same call resumes. `rpc_preflight` checks the server (reachable, right key,
can load and run a kernel built for the target) before any tuning starts.

Through TVM's RPC tracker (a fleet: `tune(..., rpc="tracker://host:9190/<key>")`): each candidate's
session is requested from the tracker, which hands it a free server registered under the key
(`runtime.rpc.request_session`), and `RPCRunner.run` measures the candidates of a batch in that
many threads at once (`RPCConfig.parallel`, default: the servers registered when the runner
starts), so several boards measure at the same time; the RPC calls wait on their sockets outside
the GIL. Counts per server are kept (`RPCRunner.per_server`) and reported.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ._stub import fast_tensor_intrin  # noqa: E402,F401  (re-exported)


# --- builder and runner -----------------------------------------------------------------------
_ARTIFACTS: dict[str, object] = {}
_COUNTER = itertools.count()
_LOCK = threading.Lock()
_PREFIX = "tvm_intlstm-inproc:"


def _build_each(build_inputs, keep, builder: str) -> list:
    """BuilderResults of both builders: each candidate compiled with tvm.compile in this process,
    keep(executable, target) stores it and returns its key or path; an error becomes the result's
    error message, prefixed by the builder's name."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.builder import BuilderResult  # pylint: disable=import-outside-toplevel

    results = []
    for bi in build_inputs:
        try:
            ex = tvm.compile(bi.mod, target=bi.target)
            results.append(BuilderResult(keep(ex, bi.target), None))
        except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
            results.append(BuilderResult(None, f"{builder}: {type(e).__name__}: {e}"))
    return results


def _classes():
    """Define the PyBuilder/PyRunner/PyMeasureCallback subclasses (after tvm is imported)."""
    from tvm.ir.utils import derived_object  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.builder import PyBuilder
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds each candidate with tvm.compile in this process; the artifact stays in memory."""

        def build(self, build_inputs):
            def keep(ex, _target):
                key = f"{_PREFIX}{next(_COUNTER)}"
                with _LOCK:
                    _ARTIFACTS[key] = ex
                return key

            return _build_each(build_inputs, keep, "InProcessBuilder")

    @derived_object
    class InProcessRunner(PyRunner):
        """Times each built candidate in this process (one thread: the kernels are serial) on
        valid data, and checks its output bit for bit against the numpy reference: a wrong
        schedule is reported as an error, never recorded as a result."""

        def __init__(self, number: int = 0, repeat: int = 3, min_repeat_ms: int = 50,
                     check: bool = True, weight_max: int = 127):
            super().__init__()
            self.number = number
            self.repeat = repeat
            self.min_repeat_ms = min_repeat_ms
            self.check = check
            self.weight_max = weight_max   # 64 for the 7-bit (vpmaddubsw) tasks
            self._cases: dict = {}

        def run(self, runner_inputs):
            futures = []
            for ri in runner_inputs:
                key = str(ri.artifact_path)
                with _LOCK:
                    ex = _ARTIFACTS.pop(key, None)
                try:
                    if ex is None:
                        raise RuntimeError(f"no in-process artifact {key}")
                    secs = self._measure(ex, [(str(a.dtype), tuple(int(v) for v in a.shape))
                                               for a in ri.args_info])
                    futures.append(LocalRunnerFuture(res=secs, error_message=None))
                except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
                    futures.append(LocalRunnerFuture(
                        res=None, error_message=f"InProcessRunner: {type(e).__name__}: {e}"))
            return futures

        def _case(self, sig):
            if sig not in self._cases:
                self._cases[sig] = make_case(sig, self.weight_max)
            return self._cases[sig]

        def _measure(self, ex, sig):
            import tvm  # pylint: disable=import-outside-toplevel

            inputs, expected = self._case(tuple(sig))
            dev = tvm.cpu()
            args = [tvm.runtime.tensor(a, dev) for a in inputs]
            args.append(tvm.runtime.empty(sig[-1][1], sig[-1][0], dev))
            mod = ex.mod
            name = mod.entry_name if hasattr(mod, "entry_name") else "main"
            f = ex[name] if name else ex["main"]
            f(*args)
            if self.check and not np.array_equal(args[-1].numpy(), expected):
                raise ValueError("wrong result: the scheduled kernel is not bit-exact")
            number = self.number
            if number <= 0:  # calibrate: about min_repeat_ms per repeat
                t0 = time.perf_counter()
                f(*args)
                dt = max(time.perf_counter() - t0, 1e-6)
                number = max(1, int(self.min_repeat_ms / 1e3 / dt))
            ev = mod.time_evaluator(name, dev, number=number, repeat=self.repeat)
            res = list(ev(*args).results)
            return [float(np.median(res))]

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        """Prints one line per measured batch: task, trials done, this batch's best, overall best."""

        def __init__(self, label: str, total: int, done0: int, best0: float | None, log=print):
            super().__init__()
            self.label = label
            self.total = total
            self.done = done0
            self.best = best0
            self.t0 = time.perf_counter()
            self.log = log

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            batch = []
            errors = 0
            for br, rr in zip(builder_results, runner_results):
                if br.error_msg is None and rr.error_msg is None and rr.run_secs:
                    batch.append(float(np.mean([float(v) for v in rr.run_secs])) * 1e6)
                else:
                    errors += 1
            self.done += len(measure_candidates)
            if batch:
                b = min(batch)
                self.best = b if self.best is None else min(self.best, b)
            best = "-" if self.best is None else f"{self.best:.1f} us"
            bb = "-" if not batch else f"{min(batch):.1f} us"
            self.log(f"[tvm_intlstm.tune] {self.label}: {self.done}/{self.total} trials, "
                     f"batch best {bb}, best {best}, {errors} failed, "
                     f"{time.perf_counter() - self.t0:.0f} s")

    return InProcessBuilder, InProcessRunner, ProgressCallback


# --- tuning over RPC -----------------------------------------------------------------------------
class RPCTuningError(RuntimeError):
    """The RPC server is reachable but cannot be tuned on: it cannot load or run a kernel built
    for the target (another architecture, another TVM version), or the unscheduled kernel gives
    a wrong result there."""


@dataclass(frozen=True)
class RPCConfig:
    """Where and how `tune(..., rpc=...)` measures: a TVM RPC server (`python -m
    tvm.exec.rpc_server` on the board, or tvm_intlstm.runtime.rpc.EmulatedRPCServer).

    host, port, key: the server (key: the `--key` it was started with, "" for none).
    timeout: seconds one candidate's session may last (the server ends longer sessions: a hung
        or very slow candidate becomes a failed trial); also bounds the connection check.
    number, repeat, min_repeat_ms: `time_evaluator` settings on the device: `repeat`
        measurements of `number` calls each, `number` raised until one measurement lasts at
        least `min_repeat_ms`; a candidate's time is the median of the `repeat` means.
    check: compare every candidate's output with the numpy reference (a wrong kernel is a
        failed trial, never a record).
    retries: attempts to reach the server again (1 s, 2 s, 4 s, ... apart) when it cannot be
        reached in the middle of tuning, before giving up with RPCConnectError.
    tracker: host:port is a TVM RPC tracker (`python -m tvm.exec.rpc_tracker`) and key the device
        key its servers registered with (`python -m tvm.exec.rpc_server --tracker host:port --key
        <key>`); each candidate gets a session with a free server.
    parallel: with a tracker, how many candidates are measured at once (0: as many as servers are
        registered under the key when measuring starts).

    `RPCConfig.parse` also takes "host:port", "host:port:key", "tracker://host:port/key" or a dict
    of these fields."""

    host: str
    port: int
    key: str = ""
    timeout: float = 60.0
    number: int = 1
    repeat: int = 3
    min_repeat_ms: int = 50
    check: bool = True
    retries: int = 3
    tracker: bool = False
    parallel: int = 0

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"RPCConfig.host must be a host name or address, got {self.host!r}")
        try:
            port = int(self.port)
        except (TypeError, ValueError):
            port = -1
        if not 0 < port < 65536:
            raise ValueError(f"RPCConfig.port must be 1-65535, got {self.port!r}")
        object.__setattr__(self, "port", port)
        if any(c.isspace() for c in str(self.key)):
            raise ValueError(f"an RPC key cannot contain whitespace: {self.key!r}")
        if not float(self.timeout) > 0:
            raise ValueError(f"RPCConfig.timeout must be > 0 seconds, got {self.timeout!r}")
        if int(self.number) < 1 or int(self.repeat) < 1 or int(self.min_repeat_ms) < 0 \
                or int(self.retries) < 0:
            raise ValueError("RPCConfig needs number >= 1, repeat >= 1, min_repeat_ms >= 0, "
                             f"retries >= 0; got {self}")
        if int(self.parallel) < 0:
            raise ValueError(f"RPCConfig.parallel must be >= 0 (0: one per server), got "
                             f"{self.parallel}")
        if self.tracker and not self.key:
            raise ValueError("tuning through an RPC tracker needs the device key its servers "
                             "registered with: 'tracker://host:9190/<key>'")

    @classmethod
    def parse(cls, spec) -> "RPCConfig":
        """An RPCConfig from an RPCConfig, "host:port[:key]" or a dict of the fields."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            from ..runtime.rpc import (  # pylint: disable=import-outside-toplevel
                parse_rpc_address, parse_tracker_address)

            if spec.strip().startswith("tracker://"):
                host, port, key = parse_tracker_address(spec.strip())
                return cls(host, port, key, tracker=True)
            host, port, key = parse_rpc_address(spec)
            return cls(host, port, key)
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown RPC option(s) {unknown}; known: "
                                 f"{sorted(cls.__dataclass_fields__)}")
            if "host" not in spec or "port" not in spec:
                raise ValueError(f"an RPC dict needs 'host' and 'port', got {spec}")
            return cls(**spec)
        raise TypeError("rpc must be 'host:port', 'host:port:key', 'tracker://host:port/key', a "
                        f"dict or an RPCConfig, got {type(spec).__name__}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.tracker:
            return f"tracker {host}:{self.port} (key {self.key!r})"
        return f"{host}:{self.port}" + (f" (key {self.key!r})" if self.key else "")


def _rpc_classes():
    """PyBuilder/PyRunner for tuning over RPC (after tvm is imported); see the module doc."""
    from tvm.ir.utils import derived_object  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.builder import PyBuilder
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    from ..runtime.rpc import (RPCConnectError,  # pylint: disable=import-outside-toplevel
                               is_session_death, open_session, request_session, tracker_servers)
    from ..target import export_library  # pylint: disable=import-outside-toplevel

    @derived_object
    class RPCBuilder(PyBuilder):
        """Builds each candidate with tvm.compile in this process and exports it as a shared
        library for the target (cross-linked for aarch64) into `work_dir`."""

        def __init__(self, work_dir: str):
            super().__init__()
            self.work_dir = work_dir

        def build(self, build_inputs):
            def keep(ex, target):
                path = os.path.join(self.work_dir, f"cand{next(_COUNTER)}.so")
                export_library(ex, path, target)
                return path

            return _build_each(build_inputs, keep, "RPCBuilder")

    @derived_object
    class RPCRunner(PyRunner):
        """Measures each built candidate on the RPC server of `config` (an RPCConfig), one
        session per candidate; removes the candidate's library afterwards. `log` gets a line
        per session that died. A server that cannot be reached raises RPCConnectError (kept in
        `.fatal` too)."""

        def __init__(self, config: RPCConfig, log=None, weight_max: int = 127):
            super().__init__()
            self.config = config
            self.weight_max = weight_max
            self.log = log or (lambda _msg: None)
            self.fatal = None
            self.sessions = 0
            self.deaths = 0
            self.per_server: dict = {}   # server address -> sessions opened there (tracker)
            self._cases: dict = {}
            self._lock = threading.Lock()
            self._workers = 0

        def workers(self) -> int:
            """Candidates measured at once: 1 for a server, `parallel` (or the servers registered
            under the key, asked once) for a tracker."""
            cfg = self.config
            if not cfg.tracker:
                return 1
            if not self._workers:
                n = int(cfg.parallel)
                if n == 0:
                    _, counts = tracker_servers(cfg.host, cfg.port, cfg.key,
                                                timeout=min(float(cfg.timeout), 10.0))
                    n = counts.get(cfg.key, 0)
                self._workers = max(1, n)
            return self._workers

        def _run_one(self, ri):
            path = str(ri.artifact_path)
            sig = [(str(a.dtype), tuple(int(v) for v in a.shape)) for a in ri.args_info]
            try:
                return LocalRunnerFuture(res=self.measure(path, sig), error_message=None)
            except RPCConnectError:
                raise
            except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
                return LocalRunnerFuture(res=None,
                                         error_message=f"RPCRunner: {type(e).__name__}: {e}")
            finally:
                with contextlib.suppress(OSError):
                    os.remove(path)

        def run(self, runner_inputs):
            runner_inputs = list(runner_inputs)
            try:
                n = self.workers()
                if n <= 1 or len(runner_inputs) <= 1:
                    return [self._run_one(ri) for ri in runner_inputs]
                # several boards behind a tracker: one thread per board, each candidate in a
                # session with whichever server the tracker hands out
                with ThreadPoolExecutor(max_workers=min(n, len(runner_inputs)),
                                        thread_name_prefix="tvm_intlstm_rpc") as pool:
                    done = [pool.submit(self._run_one, ri) for ri in runner_inputs]
                    return [f.result() for f in done]
            except RPCConnectError as e:
                self.fatal = e
                raise

        def _case(self, sig):
            with self._lock:
                if sig not in self._cases:
                    self._cases[sig] = make_case(sig, self.weight_max)
                return self._cases[sig]

        def _open(self):
            cfg = self.config
            if cfg.tracker:
                # (a free server; waits while all are busy, e.g. with another client's trials)
                sess, server = request_session(cfg.host, cfg.port, cfg.key,
                                               session_timeout=cfg.timeout,
                                               wait=max(60.0, 3 * float(cfg.timeout)))
            else:
                sess, server = open_session(cfg.host, cfg.port, cfg.key,
                                            session_timeout=cfg.timeout), cfg.address
            with self._lock:
                self.sessions += 1
                self.per_server[server] = self.per_server.get(server, 0) + 1
            return sess

        def _connect(self):
            cfg = self.config
            delay = 1.0
            for attempt in range(int(cfg.retries) + 1):
                try:
                    return self._open()
                except RPCConnectError as e:
                    if attempt == int(cfg.retries):
                        raise RPCConnectError(
                            f"lost the RPC server at {cfg.address} ({int(cfg.retries) + 1} "
                            f"attempts): {e}. What was measured is in the database: run the "
                            "same tuning again to resume") from None
                    self.log(f"[tvm_intlstm.tune] RPC server {cfg.address} not reachable, "
                             f"retrying in {delay:g} s ({e})")
                    time.sleep(delay)
                    delay *= 2
            raise AssertionError("unreachable")

        def measure(self, path: str, sig, number=None, repeat=None, min_repeat_ms=None):
            """[median seconds] of the kernel `main` of the library `path` on the remote device,
            after checking its output (see RPCConfig); raises on any failure."""
            import tvm  # pylint: disable=import-outside-toplevel

            cfg = self.config
            sig = tuple(sig)
            inputs, expected = self._case(sig)
            name = os.path.basename(path)
            sess = self._connect()
            t0 = time.perf_counter()
            rmod = dev = ev = None
            args: list = []
            try:
                sess.upload(path, target=name)
                rmod = sess.load_module(name)
                dev = sess.cpu(0)
                args = [tvm.runtime.tensor(a, dev) for a in inputs]
                args.append(tvm.runtime.empty(sig[-1][1], sig[-1][0], dev))
                rmod["main"](*args)
                if cfg.check and not np.array_equal(args[-1].numpy(), expected):
                    raise ValueError("wrong result on the device: the scheduled kernel is not "
                                     "bit-exact")
                ev = rmod.time_evaluator(
                    "main", dev, number=int(cfg.number if number is None else number),
                    repeat=int(cfg.repeat if repeat is None else repeat),
                    min_repeat_ms=int(cfg.min_repeat_ms if min_repeat_ms is None
                                      else min_repeat_ms))
                res = [float(v) for v in ev(*args).results]
            except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
                if not is_session_death(e):
                    raise
                dt = time.perf_counter() - t0
                with self._lock:
                    self.deaths += 1
                why = (f"longer than the session timeout of {cfg.timeout:g} s"
                       if dt >= 0.95 * float(cfg.timeout) else
                       "the session process crashed on the device, e.g. SIGILL: an "
                       "instruction its CPU lacks")
                last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
                msg = f"the remote session died after {dt:.1f} s ({why}) [{last}]"
                self.log(f"[tvm_intlstm.tune] candidate {name}: {msg}; next candidate in a "
                         "new session")
                raise RuntimeError(msg) from None
            finally:
                # drop every remote object now: the session closes when the last one goes, and
                # a server that serves one session at a time waits for that
                del args[:]
                ev = rmod = dev = sess = None  # noqa: F841
            return [float(np.median(res))]

    return RPCBuilder, RPCRunner


_CLS = None
_RPC_CLS = None


def rpc_classes():
    """(RPCBuilder, RPCRunner)."""
    global _RPC_CLS  # pylint: disable=global-statement
    if _RPC_CLS is None:
        _RPC_CLS = _rpc_classes()
    return _RPC_CLS


def rpc_preflight(config: RPCConfig, target, mod, log=print) -> float:
    """Before tuning over RPC: check that the server at `config` answers (RPCConnectError if
    not, within min(config.timeout, 10) s), then build the unscheduled kernel `mod` (a task's workload)
    for `target`, export it (cross-linked: ToolchainError without the cross compiler), run it on
    the device and check its output (RPCTuningError if the device cannot). Returns the seconds
    per call of that unscheduled kernel."""
    import tempfile  # pylint: disable=import-outside-toplevel

    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo  # pylint: disable=import-outside-toplevel

    from ..runtime.rpc import (  # pylint: disable=import-outside-toplevel
        RPCConnectError, check_server, check_tracker)
    from ..target import export_library, target_to_string  # pylint: disable=import-outside-toplevel

    t0 = time.perf_counter()
    if config.tracker:
        servers = check_tracker(config.host, config.port, config.key,
                                timeout=min(config.timeout, 10.0))
        rtt = time.perf_counter() - t0
        where = f"RPC {config.address}: {servers} server(s) registered"
    else:
        rtt = check_server(config.host, config.port, config.key, timeout=min(config.timeout, 10.0))
        where = f"RPC server {config.address}: reachable"
    _, Runner = rpc_classes()
    with tempfile.TemporaryDirectory(prefix="tvm_intlstm_rpc_probe_") as d:
        ex = tvm.compile(mod, target=target)
        path = export_library(ex, os.path.join(d, "tvm_intlstm_probe.so"), target)
        sig = [(str(a.dtype), tuple(int(v) for v in a.shape))
               for a in ArgInfo.from_prim_func(mod["main"])]
        runner = Runner(config)
        try:
            secs = runner.measure(path, sig, number=1, repeat=1, min_repeat_ms=0)[0]
        except RPCConnectError:
            raise
        except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
            last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            raise RPCTuningError(
                f"the RPC server at {config.address} cannot run a kernel built for "
                f"{target_to_string(target)}: {last}. Check that the device has that CPU "
                f"(architecture and features) and runs apache-tvm {tvm.__version__} (a module "
                "must be loaded by the runtime of the release that compiled it)") from None
    log(f"[tvm_intlstm.tune] {where} ({rtt * 1e3:.0f} ms handshake), the unscheduled kernel "
        f"runs there in {secs * 1e6:.1f} us")
    return secs


def classes():
    global _CLS  # pylint: disable=global-statement
    if _CLS is None:
        _CLS = _classes()
    return _CLS


def make_case(sig, weight_max: int = 127):
    """Valid inputs and the reference output for a GEMM kernel signature [(dtype, shape), ...]:
    (x, W, b, M, s, y) for requantizing kernels, (x, W, b, y) for int32 ones; W packed when its
    shape is 4-D: [., ., 8, 2] for gemm_blocks(packed=True), [., ., lanes, 4] for the u8 kernels
    of x86_wide (which also take the corrected bias). Weights in [-weight_max, weight_max] (64 for
    the 7-bit vpmaddubsw tasks, whose kernels are exact only there)."""
    from ..reference import ops as R  # pylint: disable=import-outside-toplevel

    from .gemm import pack_weights  # pylint: disable=import-outside-toplevel
    from .x86_wide import KQUAD, prepare_weights_wide  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(12345)
    (_, (N, K)), (_, wshape), (_, (O,)) = sig[0], sig[1], sig[2]
    x = rng.integers(-128, 128, (N, K)).astype(np.int8)
    wm = int(weight_max)
    W = rng.integers(-wm, wm + 1, (O, K)).astype(np.int8)
    b = rng.integers(-(2**20), 2**20, O).astype(np.int32)
    acc = R.linear_acc(x, W, b)
    if len(wshape) == 4 and wshape[3] == KQUAD:
        wk, b = prepare_weights_wide("avx2", W, b, lanes=wshape[2])
    else:
        wk = pack_weights(W) if len(wshape) == 4 else W
    if len(sig) == 6:
        M = rng.integers(2**30, 2**31 - 1, O).astype(np.int32)
        s = rng.integers(8, 24, O).astype(np.int32)
        bits = int(sig[-1][0][3:])
        return (x, wk, b, M, s), R.requantize(acc, M, s, bits)
    if len(sig) == 4:
        return (x, wk, b), acc
    raise ValueError(f"not a GEMM kernel signature: {sig}")
