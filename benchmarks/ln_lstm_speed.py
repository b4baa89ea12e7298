"""Layer-norm LSTM: the compiled integer module against the same float model in PyTorch.

The float model is `tvm_intlstm.nn.LayerNormLSTM` (Ba et al.'s LN-LSTM, nn.LSTM's interface; PyTorch
has no fused LN-LSTM, so its time loop is Python over nn.Linear / LayerNorm calls). Its PTQ integer
model is compiled for the host (default kernels, 8-bit weights) and both run on the same float input
(T, B, I), one thread, interleaved round by round (the ratio of one round cancels the load drift of
a shared machine); the compiled output is asserted equal to the numpy reference first.

    .venv/bin/python benchmarks/ln_lstm_speed.py [--rounds 9] [--hidden 256] [--input 128] [--steps 64]
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tvm_intlstm as til  # noqa: E402
from tvm_intlstm.nn import LayerNormLSTM  # noqa: E402


class Model(nn.Module):
    def __init__(self, I, H):
        super().__init__()
        self.lstm = LayerNormLSTM(I, H)

    def forward(self, x):
        return self.lstm(x)[0]


def sample(fn, seconds=0.15):
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if time.perf_counter() - t0 > seconds:
            return (time.perf_counter() - t0) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Model(a.input, a.hidden).eval()
    g = torch.Generator().manual_seed(1)
    q = til.quantize(model, [torch.randn(a.steps, 4, a.input, generator=g) for _ in range(2)])
    ex = (torch.randn(a.steps, 1, a.input, generator=g),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = til.compile(q, "host", example_inputs=ex, verbose=False)
    print(f"LN-LSTM {a.input}->{a.hidden}, T={a.steps}, one thread, target host ({cm.target}); "
          f"median of {a.rounds} interleaved rounds")
    print("| B | PyTorch FP32 (ms) | tvm_intlstm compiled (ms) | speed-up (median of round ratios) |")
    print("|---:|---:|---:|---:|")
    for B in (int(b) for b in a.batches.split(",")):
        x = torch.randn(a.steps, B, a.input, generator=g)
        xn = x.numpy()
        assert np.array_equal(cm(xn), til.reference(q)(xn)), "compiled != reference"
        tf, tc = [], []
        for _ in range(a.rounds):
            with torch.no_grad():
                tf.append(sample(lambda: model(x)))
            tc.append(sample(lambda: cm(xn)))
        ratio = float(np.median(np.array(tf) / np.array(tc)))
        print(f"| {B} | {np.median(tf):.3f} | {np.median(tc):.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
