"""Per-call latency of a compiled LSTM with the default (serial) kernels and with the thread-pool
kernels (`compile(..., threads=True)`), on an idle machine and with CPU-bound processes competing
for the cores.

    .venv/bin/python benchmarks/threads_under_load.py [--input 64 --hidden 128 --seq 16 --batch 1]
        [--threads 2] [--hogs 2] [--calls 2000] [--target host]

The parent quantizes a random nn.LSTM(input, hidden), compiles it twice (threads=False, the
default, and threads=True), exports both, then for each load condition (no extra load; `--hogs`
busy-loop processes it starts and stops itself) runs one worker subprocess per module with
TVM_NUM_THREADS=--threads. A worker checks its output against the quantized model's reference,
warms up, then times `--calls` single calls. Printed: median / p90 / p99 / max microseconds per
call and the total, as a markdown table. The threaded recurrent kernel ends every time step with
a barrier: when a worker's core is taken by another process the step waits for the scheduler
(docs/compiler.md "Threads"), which is why compile() picks the serial kernels unless asked.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys, time
import numpy as np
import tvm_intlstm as til
lib, x_path, ref_path, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cm = til.load(lib)
x = np.load(x_path)
assert (cm(x) == np.load(ref_path)).all(), "not bit-exact"
for _ in range(max(50, calls // 20)):
    cm(x)
t = np.empty(calls)
t_all = time.perf_counter()
for i in range(calls):
    t0 = time.perf_counter()
    cm(x)
    t[i] = time.perf_counter() - t0
total = time.perf_counter() - t_all
us = t * 1e6
print(json.dumps({"median": float(np.median(us)), "p90": float(np.percentile(us, 90)),
                  "p99": float(np.percentile(us, 99)), "max": float(us.max()), "total_s": total}))
"""


def build(a, d):
    import numpy as np
    import torch
    from torch import nn

    import tvm_intlstm as til

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(a.input, a.hidden)

        def forward(self, x):
            return self.lstm(x)[0]

    torch.manual_seed(0)
    q = til.quantize(M().eval(), [torch.randn(a.seq, 4, a.input) for _ in range(2)])
    x = torch.randn(a.seq, a.batch, a.input)
    np.save(os.path.join(d, "x.npy"), x.numpy())
    np.save(os.path.join(d, "ref.npy"), til.reference(q)(x.numpy()))
    libs = {}
    for name, threads in (("serial (default)", False), ("threads=True", True)):
        cm = til.compile(q, target=a.target, example_inputs=(x,), verbose=False, threads=threads)
        libs[name] = cm.export_library(os.path.join(d, f"m_{int(threads)}.so"))
    return libs


def run_worker(a, d, lib):
    env = dict(os.environ, TVM_NUM_THREADS=str(a.threads), PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", WORKER, lib, os.path.join(d, "x.npy"),
                        os.path.join(d, "ref.npy"), str(a.calls)], env=env, capture_output=True,
                       text=True, timeout=3600, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stdout + r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="TVM_NUM_THREADS of the workers")
    ap.add_argument("--hogs", type=int, default=2, help="busy-loop processes of the loaded case")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--target", default="host")
    a = ap.parse_args()
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        libs = build(a, d)
        for hogs in (0, a.hogs):
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                     for _ in range(hogs)]
            try:
                time.sleep(0.5 if hogs else 0)
                for name, lib in libs.items():
                    res = run_worker(a, d, lib)
                    rows.append((hogs, name, res))
                    print(f"hogs={hogs} {name}: {res}", file=sys.stderr, flush=True)
            finally:
                for p in procs:   # only the processes started above
                    p.kill()
                    p.wait()
    print(f"\nLSTM {a.input}->{a.hidden}, T={a.seq}, B={a.batch}, target {a.target}, "
          f"TVM_NUM_THREADS={a.threads}, {a.calls} calls, {os.cpu_count()} CPUs, "
          f"load average before: {load0:.1f}\n")
    print("| busy-loop processes | kernels | median us | p90 us | p99 us | max us | total s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for hogs, name, r in rows:
        print(f"| {hogs} | {name} | {r['median']:.0f} | {r['p90']:.0f} | {r['p99']:.0f} | "
              f"{r['max']:.0f} | {r['total_s']:.2f} |")


if __name__ == "__main__":
    main()
