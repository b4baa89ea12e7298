"""Quickstart: quantize a float 2-layer bidirectional LSTM to integer-only arithmetic, check the
integer forward against the numpy reference bit for bit, and compare with the float model.

    bash .ci/setup_venv.sh && .venv/bin/python examples/quickstart.py

(The compiled-module main job replaces this once tvm_intlstm.compile lands: see README.)
"""
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


if __name__ == "__main__":
    main()
