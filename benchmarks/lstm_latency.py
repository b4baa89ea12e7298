"""Latency of one compiled integer-only LSTM against PyTorch FP32 nn.LSTM, measured in the same run.

    TVM_NUM_THREADS=1 .venv/bin/python benchmarks/lstm_latency.py [--input 256 --hidden 512 --seq 64 --batch 1]
        [--target "llvm -mcpu=znver3" --tuning-logs tuning_logs/znver3]

Prints medians of repeated runs (milliseconds) and the ratio. One thread for both (torch.set_num_threads(1),
TVM_NUM_THREADS=1), since the kernels' default schedules are single-threaded.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tvm_intlstm as til  # noqa: E402


class LSTMModel(nn.Module):
    def __init__(self, I, H, layers):
        super().__init__()
        self.lstm = nn.LSTM(I, H, num_layers=layers)

    def forward(self, x):
        return self.lstm(x)[0]


def median_ms(fn, repeat=15, number=3):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--target", default="host")
    ap.add_argument("--tuning-logs", default=None, help="also compile with these tuning logs and compare")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LSTMModel(a.input, a.hidden, a.layers).eval()
    calib = [torch.randn(a.seq, 4, a.input) for _ in range(2)]
    print(f"quantizing {a.layers}-layer LSTM {a.input}->{a.hidden} ...", flush=True)
    q = til.quantize(model, calib)
    ex = (torch.randn(a.seq, 1, a.input),)
    cms = {"untuned": til.compile(q, target=a.target, example_inputs=ex)}
    if a.tuning_logs:
        cms["tuned"] = til.compile(q, target=a.target, example_inputs=ex, tuning_logs=a.tuning_logs)
    names = list(cms)
    print("| batch | T | PyTorch FP32 (ms) | " + " | ".join(f"tvm_intlstm {n} (ms) | ratio" for n in names)
          + " | bit-exact |")
    print("|---:|---:|---:|" + "---:|---:|" * len(names) + "---|")
    for B in a.batch or [1, 8]:
        x = torch.randn(a.seq, B, a.input)
        xn = x.numpy()
        with torch.no_grad():
            t_fp = median_ms(lambda: model(x))
        cells, exact = [], True
        for n in names:
            t = median_ms(lambda: cms[n](xn))
            cells.append(f"{t:.2f} | {t / t_fp:.2f}")
            exact &= bool(np.array_equal(cms[n](xn), q(x).numpy()))
        print(f"| {B} | {a.seq} | {t_fp:.2f} | " + " | ".join(cells) + f" | {exact} |", flush=True)


if __name__ == "__main__":
    main()
