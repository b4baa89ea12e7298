"""Quickstart: quantize a float 2-layer bidirectional LSTM tagger to integer-only arithmetic,
compile it with TVM for this machine, check the compiled module against the numpy reference bit for
bit, and compare accuracy and speed with the float PyTorch model.

    bash .ci/setup_venv.sh && .venv/bin/python examples/quickstart.py
"""
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

import tvm_intlstm as til


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 128, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(256, 20)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h)


def main():
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    torch.manual_seed(0)
    model = Tagger().eval()
    calib = [torch.randn(8, 50, 40) for _ in range(4)]
    t0 = time.perf_counter()
    qmodel = til.quantize(model, calib, til.QuantConfig(pwl_pieces=16))
    print(f"quantized in {time.perf_counter() - t0:.1f} s (PTQ, {len(calib)} calibration batches)")
    x = torch.randn(4, 64, 40)
    logits = qmodel(x)
    ref = til.reference(qmodel)(x.numpy())
    print(f"integer logits {tuple(logits.shape)} {logits.dtype}; bit-exact with the numpy reference: "
          f"{np.array_equal(logits.numpy(), ref)}")
    with torch.no_grad():
        yf = model(x)
    yd = qmodel.dequantize(logits)
    rel = ((yd - yf).norm() / yf.norm()).item()
    agree = (yd.argmax(-1) == yf.argmax(-1)).float().mean().item()
    print(f"vs float: relative L2 error {rel:.4f}, argmax agreement {agree * 100:.1f}%")

    cm = til.compile(qmodel, target="host", example_inputs=(x[:1],))
    y_tvm = cm(x.numpy())
    print(f"compiled module (one build, any batch/length) bit-exact with the reference: {np.array_equal(y_tvm, ref)}")
    torch.set_num_threads(1)
    x1 = torch.randn(1, 64, 40)
    x1n = x1.numpy()

    def med(fn, n=15):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    with torch.no_grad():
        t_fp = med(lambda: model(x1))
    t_int = med(lambda: cm(x1n))
    print(f"latency, batch 1, T=64, one thread: PyTorch FP32 {t_fp:.2f} ms, tvm_intlstm {t_int:.2f} ms "
          f"(ratio {t_int / t_fp:.2f})")
    with tempfile.TemporaryDirectory() as d:
        so = cm.export_library(os.path.join(d, "tagger.so"))
        fp_bytes = sum(p.numel() * 4 for p in model.parameters())
        print(f"exported library {os.path.getsize(so) / 1e6:.2f} MB vs FP32 weights {fp_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
