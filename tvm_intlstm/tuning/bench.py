"""Tuned vs default GEMM kernel, one thread, same process, interleaved runs.

    python -m tvm_intlstm.tuning.bench --log-dir tuning_logs/znver3 --target "llvm -mcpu=znver3" \\
        --gemm 256,2048,int16 --rows 1,8,64,512

Both kernels are the symbolic-N functions the compiler would use (the default one with pre-packed
weights and a baked per-tensor shift, the tuned one replayed from the database by
apply_tuning_logs), checked bit for bit against the numpy reference first. `--gemm K,O,DTYPE,w7`:
the 7-bit (u8 x s8) kernels. Each figure
is the median of `rounds` interleaved measurements (each a time_evaluator median), so that load
from other processes hits both kernels alike.
"""
from __future__ import annotations

import argparse
import os


def compare(target, K, O, out_dtype, N, tuned, w7=False, rounds=5):
    """(default us, tuned us, tuned / default) of one GEMM at N rows, one thread, `rounds`
    interleaved measurements: the medians of each, and the median of the per-round ratios (the
    steadier figure on a shared machine). The default kernel is built as the compiler builds it
    for the quantizer's models (`baselines.default_kernel`: pre-packed weights, one shift per tensor
    baked in; every channel gets that shift here); `tuned` is a replayed record
    (replay it with scale=(None, baselines.COMPARE_SHIFT) to compare like with like). Both are checked
    bit for bit against the numpy reference first. w7=True: the 7-bit (u8 x s8) kernels, on
    weights in [-64, 64]."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel

    from .. import kernels as KK  # pylint: disable=import-outside-toplevel
    from ..reference import ops as R  # pylint: disable=import-outside-toplevel
    from ._ms import make_case  # pylint: disable=import-outside-toplevel
    from .baselines import (COMPARE_SHIFT, default_kernel,  # pylint: disable=import-outside-toplevel
                            tuned_weights)
    from .targets import as_target  # pylint: disable=import-outside-toplevel

    tgt = as_target(target)
    default = default_kernel(K, O, out_dtype, tgt, w7)
    kd, kt = KK.build_kernel(default, tgt), KK.build_kernel(tuned, tgt)
    n_in = 3 if out_dtype == "int32" else 5
    sig = tuple([("int8", (N, K)), ("int8", (O, K))] + [("int32", (O,))] * (n_in - 2)
                + [(out_dtype, (N, O))])
    (x, W, b, *req), ref = make_case(sig, 64 if w7 else 127)
    if req:
        req[1] = np.full(O, COMPARE_SHIFT, np.int32)
        ref = R.requantize(R.linear_acc(x, W, b), req[0], req[1], int(out_dtype[3:]))
    wd, bd, _ = KK.prepare_weights(default, W, b)
    wt, bt = tuned_weights(W, b, w7)
    nd = tvm.runtime.tensor
    res = tvm.runtime.empty((N, O), out_dtype, tvm.cpu())
    args = [nd(x), nd(wd), nd(bd)] + [nd(r) for r in req] + [res]
    targs = [nd(x), nd(wt), nd(bt)] + [nd(r) for r in req] + [res]
    for k, a in ((kd, args), (kt, targs)):
        k(*a)
        if not np.array_equal(a[-1].numpy(), ref):
            raise AssertionError(f"{k.name} is not bit-exact at N={N}")
    number = max(1, int(20000 / max(1, N * K * O // 4096)))
    td, tt = [], []
    for _ in range(int(rounds)):
        td.append(kd.time_us(*args, number=number, repeat=5))
        tt.append(kt.time_us(*targs, number=number, repeat=5))
    return (float(np.median(td)), float(np.median(tt)),
            float(np.median([b / a for a, b in zip(td, tt)])))


def bench(log_dir, target, K, O, out_dtype, rows=(64,), rounds=5, log=print, w7=False):
    """`compare` of the database's tuned kernel per row count: [(N, default us, tuned us)]
    (logs one line per row count)."""
    from .baselines import COMPARE_SHIFT  # pylint: disable=import-outside-toplevel
    from .replay import apply_tuning_logs  # pylint: disable=import-outside-toplevel
    from .targets import as_target  # pylint: disable=import-outside-toplevel

    tgt = as_target(target)
    tuned = apply_tuning_logs(log_dir, tgt).get(K, O, out_dtype, w7=w7,
                                               scale=(None, COMPARE_SHIFT))
    if tuned is None:
        raise ValueError(f"no tuned schedule for K={K} O={O} {out_dtype}{' w7' if w7 else ''} in "
                         f"{log_dir} (or the default kernel was faster when it was tuned)")
    out = []
    for N in rows:
        d, t, r = compare(tgt, K, O, out_dtype, N, tuned, w7, rounds)
        log(f"K={K} O={O} {out_dtype}{' w7' if w7 else ''} N={N}: default {d:.1f} us, tuned "
            f"{t:.1f} us (per-round ratio tuned / default {r:.3f}), "
            f"{2 * N * K * O / t / 1e3:.1f} GOP/s tuned")
        out.append((N, d, t))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--target", default="llvm -mcpu=znver3")
    ap.add_argument("--gemm", default="256,2048,int16", help="K,O,DTYPE[,w7]")
    ap.add_argument("--rows", default="64", help="comma-separated row counts")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    K, O, dt, *w7 = a.gemm.split(",")
    bench(a.log_dir, a.target, int(K), int(O), dt, [int(v) for v in a.rows.split(",")], a.rounds,
          w7=w7 == ["w7"])


if __name__ == "__main__":
    main()
