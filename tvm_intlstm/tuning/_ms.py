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
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import sys
import threading
import time
import types

import numpy as np

_TI = "tvm.s_tir.tensor_intrin"


@contextlib.contextmanager
def fast_tensor_intrin():
    """Make `import tvm.s_tir.tensor_intrin` a no-op for the duration (see module doc)."""
    if _TI in sys.modules:
        yield
        return
    spec = importlib.util.find_spec(_TI)
    stub = types.ModuleType(_TI, "tvm_intlstm stub: backend intrinsics not imported")
    stub.__path__ = list(spec.submodule_search_locations or [])
    stub.__spec__ = spec
    stub.__file__ = spec.origin
    stub.__tvm_intlstm_stub__ = True
    sys.modules[_TI] = stub
    import tvm.s_tir as s_tir_pkg  # pylint: disable=import-outside-toplevel

    had_attr = hasattr(s_tir_pkg, "tensor_intrin")
    old_attr = getattr(s_tir_pkg, "tensor_intrin", None)
    s_tir_pkg.tensor_intrin = stub
    try:
        yield
    finally:
        if sys.modules.get(_TI) is stub:
            del sys.modules[_TI]
            # submodules imported through the stub stay importable on their own
            if had_attr:
                s_tir_pkg.tensor_intrin = old_attr
            elif getattr(s_tir_pkg, "tensor_intrin", None) is stub:
                delattr(s_tir_pkg, "tensor_intrin")


# --- builder and runner -----------------------------------------------------------------------
_ARTIFACTS: dict[str, object] = {}
_COUNTER = itertools.count()
_LOCK = threading.Lock()
_PREFIX = "tvm_intlstm-inproc:"


def _classes():
    """Define the PyBuilder/PyRunner/PyMeasureCallback subclasses (after tvm is imported)."""
    from tvm.ir.utils import derived_object  # pylint: disable=import-outside-toplevel
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds each candidate with tvm.compile in this process; the artifact stays in memory."""

        def build(self, build_inputs):
            import tvm  # pylint: disable=import-outside-toplevel

            results = []
            for bi in build_inputs:
                try:
                    ex = tvm.compile(bi.mod, target=bi.target)
                    key = f"{_PREFIX}{next(_COUNTER)}"
                    with _LOCK:
                        _ARTIFACTS[key] = ex
                    results.append(BuilderResult(key, None))
                except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {e}"))
            return results

    @derived_object
    class InProcessRunner(PyRunner):
        """Times each built candidate in this process (one thread: the kernels are serial) on
        valid data, and checks its output bit for bit against the numpy reference: a wrong
        schedule is reported as an error, never recorded as a result."""

        def __init__(self, number: int = 0, repeat: int = 3, min_repeat_ms: int = 50,
                     check: bool = True):
            super().__init__()
            self.number = number
            self.repeat = repeat
            self.min_repeat_ms = min_repeat_ms
            self.check = check
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
                self._cases[sig] = make_case(sig)
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


_CLS = None


def classes():
    global _CLS  # pylint: disable=global-statement
    if _CLS is None:
        _CLS = _classes()
    return _CLS


def make_case(sig):
    """Valid inputs and the reference output for a GEMM kernel signature [(dtype, shape), ...]:
    (x, W, b, M, s, y) for requantizing kernels, (x, W, b, y) for int32 ones; W packed when its
    shape is 4-D (gemm_blocks(packed=True))."""
    from ..reference import ops as R  # pylint: disable=import-outside-toplevel

    from .gemm import pack_weights  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(12345)
    (_, (N, K)), (_, wshape), (_, (O,)) = sig[0], sig[1], sig[2]
    x = rng.integers(-128, 128, (N, K)).astype(np.int8)
    W = rng.integers(-127, 128, (O, K)).astype(np.int8)
    wk = pack_weights(W) if len(wshape) == 4 else W
    b = rng.integers(-(2**20), 2**20, O).astype(np.int32)
    acc = R.linear_acc(x, W, b)
    if len(sig) == 6:
        M = rng.integers(2**30, 2**31 - 1, O).astype(np.int32)
        s = rng.integers(8, 24, O).astype(np.int32)
        bits = int(sig[-1][0][3:])
        return (x, wk, b, M, s), R.requantize(acc, M, s, bits)
    if len(sig) == 4:
        return (x, wk, b), acc
    raise ValueError(f"not a GEMM kernel signature: {sig}")
