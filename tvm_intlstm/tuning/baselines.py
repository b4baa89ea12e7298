"""The compiler's default kernel as the baseline a tuned kernel must beat (defaults.json)."""
from __future__ import annotations

import os

import numpy as np

from . import gemm as G
from . import x86_wide
from .targets import as_target, target_str
from .tasks import GemmTask, default_key

# --- the default kernel as the baseline -------------------------------------------------------------
# A tuned kernel is only worth applying if it beats the default (hand-written, packed-weight) kernel
# the compiler would otherwise use. tune() measures that default for each task on the tuning machine
# and records it in <log_dir>/defaults.json ({target key: {"K,O,dtype,rows[,w7]": seconds}}), on
# the clock of the best record: default and best tuned kernel are timed interleaved and the file
# gets best_secs * APPLY_MARGIN / (tuned / default) (see tune's `baseline`); apply_tuning_logs()
# then skips tuned records whose time is not below it. Re-running tune (even with nothing left to
# do) re-decides. Logs without the file (older ones) apply as before.
DEFAULTS_FILE = "defaults.json"
COMPARE_SHIFT = 40       # the per-tensor shift of the default-vs-tuned timings (a typical one)
COMPARE_ROUNDS = 9       # interleaved rounds of that timing
APPLY_MARGIN = 0.98      # a record applies if tuned / default (per-round median) is below this


def default_kernel(K, O, out_dtype, target, w7: bool = False):
    """The compiler's default (hand-written, packed-weight) kernel of a GEMM as it builds it for the
    quantizer's models: per-channel multipliers and one shift per tensor baked in, COMPARE_SHIFT
    here (in [32, 62]; the value does not change the time). The baseline of tuned kernels."""
    from .. import kernels as KN  # pylint: disable=import-outside-toplevel

    if out_dtype == "int32":
        return KN.linear_i32(K, O, True, target=target, packed=True, w7=w7)
    return KN.linear_requant(K, O, out_dtype, True, target=target, packed=True, w7=w7,
                             shift_hi=True, scale=(None, COMPARE_SHIFT))


def tuned_weights(W, bias, w7: bool = False):
    """(packed W, bias) as a tuned kernel takes them, from int8 W [O, K] and the bias (numpy, or
    None for zeros with w7): gemm.pack_weights(W) and the bias unchanged, or for the 7-bit kernels
    x86_wide.pack_weights_vnni(W, 8) and the bias corrected by -128 rowsum(W)."""
    if w7:
        return x86_wide.prepare_weights_wide("avx2", W, bias, lanes=8)
    return G.pack_weights(W), bias


def time_default_kernel(task: "GemmTask", target, repeat: int = 5, min_repeat_ms: int = 50) -> float:
    """Median seconds of the compiler's default kernel for `task` (host-runnable target only),
    on the same kind of inputs as the tuning trials."""
    import tvm  # pylint: disable=import-outside-toplevel

    from .. import kernels as KN  # pylint: disable=import-outside-toplevel

    tgt = as_target(target)
    isa = KN.resolve_isa(tgt)
    w7 = task.w7_kernel(isa)
    f = default_kernel(task.K, task.O, task.out_dtype, tgt, w7)
    kern = KN.build_kernel(f, tgt)
    from ._ms import make_case  # pylint: disable=import-outside-toplevel
    vec = ("int32", (task.O,))
    sig = ([("int8", (task.rows, task.K)), ("int8", (task.O, task.K)), vec]
           + ([vec, vec] if task.out_dtype != "int32" else [])
           + [(task.out_dtype, (task.rows, task.O))])
    (x, W, b, *rest), _ = make_case(sig, task.trial_weight_max(isa))   # natural W: trials' inputs
    wk, bk, _ = KN.prepare_weights(f, W, b)
    args = [x, wk, bk, *rest]
    out = np.zeros((task.rows, task.O), task.out_dtype)
    nd = [tvm.runtime.tensor(a) for a in args + [out]]
    fn = kern.module.time_evaluator(kern.name, tvm.cpu(), number=0, repeat=int(repeat),
                                    min_repeat_ms=int(min_repeat_ms))
    return float(np.median(fn(*nd).results))


def _defaults_path(log_dir: str) -> str:
    return os.path.join(log_dir, DEFAULTS_FILE)


def read_defaults(log_dir: str) -> dict:
    """{target key string: {"K,O,dtype,rows[,w7]": seconds}} from defaults.json ({} if
    absent or not JSON). Times must be positive finite numbers: a negative, zero or non-finite
    time would make every tuned record "faster than the default" (or none), silently; such a file
    raises ValueError naming it."""
    import json  # pylint: disable=import-outside-toplevel
    import math  # pylint: disable=import-outside-toplevel
    path = _defaults_path(log_dir)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    for tkey, times in data.items():
        if not isinstance(times, dict):
            raise ValueError(f"{path}: entry {tkey!r} must map task keys to default-kernel times in "
                             f"seconds, got {type(times).__name__}")
        for k, v in times.items():
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v <= 0):
                raise ValueError(f"{path}: default-kernel time {v!r} of {tkey!r} / {k!r} is not a positive "
                                 "finite number of seconds; fix or delete the file (tune re-measures it)")
    return data


def record_default(log_dir: str, tgt, task: "GemmTask", secs: float, w7: bool = False) -> None:
    import json  # pylint: disable=import-outside-toplevel
    data = read_defaults(log_dir)
    data.setdefault(target_str(tgt), {})[default_key(task.K, task.O, task.out_dtype, task.rows,
                                                       w7)] = secs
    tmp = _defaults_path(log_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, _defaults_path(log_dir))
