"""Tuned vs default GEMM kernel, one thread, same process, interleaved runs.

    python -m tvm_intlstm.tuning.bench --log-dir tuning_logs/znver3 --target "llvm -mcpu=znver3" \\
        --gemm 256,2048,int16 --rows 1,8,64,512

Both kernels are the symbolic-N functions the compiler would use (the tuned one replayed from the
database by apply_tuning_logs), checked bit for bit against the numpy reference first. Each figure
is the median of `rounds` interleaved measurements (each a time_evaluator median), so that load
from other processes hits both kernels alike.
"""
from __future__ import annotations

import argparse
import os


def bench(log_dir, target, K, O, out_dtype, rows=(64,), rounds=5, log=print):
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel

    from .. import kernels as KK  # pylint: disable=import-outside-toplevel
    from ._ms import make_case  # pylint: disable=import-outside-toplevel
    from .gemm import pack_weights  # pylint: disable=import-outside-toplevel
    from .tune import _target, apply_tuning_logs  # pylint: disable=import-outside-toplevel

    tgt = _target(target)
    tuned = apply_tuning_logs(log_dir, tgt).get(K, O, out_dtype)
    if tuned is None:
        raise ValueError(f"no tuned schedule for K={K} O={O} {out_dtype} in {log_dir}")
    if out_dtype == "int32":
        default = KK.linear_i32(K, O, True, target=tgt)
    else:
        default = KK.linear_requant(K, O, out_dtype, True, target=tgt)
    kd, kt = KK.build_kernel(default, tgt), KK.build_kernel(tuned, tgt)
    out = []
    for N in rows:
        n_in = 3 if out_dtype == "int32" else 5
        sig = tuple([("int8", (N, K)), ("int8", (O, K))] + [("int32", (O,))] * (n_in - 2)
                    + [(out_dtype, (N, O))])
        inputs, ref = make_case(sig)
        args = [tvm.runtime.tensor(a) for a in inputs] + [tvm.runtime.empty((N, O), out_dtype,
                                                                           tvm.cpu())]
        # the tuned kernel takes the weights pre-packed (done once at compile time)
        targs = list(args)
        targs[1] = tvm.runtime.tensor(pack_weights(inputs[1]))
        for k, a in ((kd, args), (kt, targs)):
            k(*a)
            if not np.array_equal(a[-1].numpy(), ref):
                raise AssertionError(f"{k.name} is not bit-exact at N={N}")
        number = max(1, int(20000 / max(1, N * K * O // 4096)))
        td, tt = [], []
        for _ in range(rounds):
            td.append(kd.time_us(*args, number=number, repeat=5))
            tt.append(kt.time_us(*targs, number=number, repeat=5))
        d, t = float(np.median(td)), float(np.median(tt))
        log(f"K={K} O={O} {out_dtype} N={N}: default {d:.1f} us, tuned {t:.1f} us "
            f"({d / t:.2f}x), {2 * N * K * O / t / 1e3:.1f} GOP/s tuned")
        out.append((N, d, t))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--target", default="llvm -mcpu=znver3")
    ap.add_argument("--gemm", default="256,2048,int16", help="K,O,DTYPE")
    ap.add_argument("--rows", default="64", help="comma-separated row counts")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    K, O, dt = a.gemm.split(",")
    bench(a.log_dir, a.target, int(K), int(O), dt, [int(v) for v in a.rows.split(",")], a.rounds)


if __name__ == "__main__":
    main()
