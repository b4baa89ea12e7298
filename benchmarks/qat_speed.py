"""QAT training-step time against float training, in one run (issue 19).

    .venv/bin/python benchmarks/qat_speed.py                    # char LM + BiLSTM tagger, batch 16/64, 1/2 threads
    .venv/bin/python benchmarks/qat_speed.py --loop             # also the old Python-loop QAT path (slow)
    .venv/bin/python benchmarks/qat_speed.py --models charlm --batches 16 --threads 1 --steps 7

A step is forward + cross-entropy + backward + Adam step. For each (model, batch, threads) the float
model and its `prepare_qat` version (calibrated on one batch, train mode) alternate step by step
(after warm-up), so drifting machine load hits both alike; the table gives the median step times and
their ratio (the headline figure), and the fastest steps and their ratio (less sensitive to other
jobs on a shared machine).

Models:
- charlm: Embedding(100, 64) -> LSTM(64, 256, num_layers=2) -> Linear(256, 100), 128 characters.
- tagger: Embedding(5000, 64) -> bidirectional LSTM(64, 256, num_layers=2) -> Linear(512, 20),
  64 tokens.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tvm_intlstm as til  # noqa: E402


class CharLM(nn.Module):
    def __init__(self, V=100, E=64, H=256):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, num_layers=2, batch_first=True)
        self.head = nn.Linear(H, V)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


class Tagger(nn.Module):
    def __init__(self, V=5000, E=64, H=256, tags=20):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * H, tags)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


MODELS = {"charlm": (CharLM, 100, 100, 128), "tagger": (Tagger, 5000, 20, 64)}  # cls, vocab, classes, T


def _stepper(model, x, y, n_cls):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, n_cls), y.reshape(-1))
        loss.backward()
        opt.step()
        return time.perf_counter() - t0
    return step


def bench(name, batch, threads, steps, warmup, qat_lstm):
    torch.set_num_threads(threads)
    cls, V, n_cls, T = MODELS[name]
    torch.manual_seed(0)
    fm = cls()
    x = torch.randint(0, V, (batch, T))
    y = torch.randint(0, n_cls, (batch, T))
    qm = til.prepare_qat(fm, til.QuantConfig(qat_lstm=qat_lstm), calib_data=[x])
    f_step, q_step = _stepper(fm, x, y, n_cls), _stepper(qm, x, y, n_cls)
    for _ in range(warmup):
        f_step(), q_step()
    tf, tq = [], []
    for _ in range(steps):
        tf.append(f_step())
        tq.append(q_step())
    return tf, tq


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["charlm", "tagger"], choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=9, help="timed steps per configuration (median, min)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loop", action="store_true", help="also time the Python-loop QAT path (3 steps)")
    a = p.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"torch {torch.__version__}, CPU {cpu!r}, {os.cpu_count()} logical CPUs; step = forward + "
          f"backward + Adam; {a.steps} alternating steps after {a.warmup} warm-up")
    print("| model | batch | threads | QAT path | float ms (median) | QAT ms (median) | QAT / float (medians) "
          "| float ms (min) | QAT ms (min) | QAT / float (mins) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        for batch in a.batches:
            for threads in a.threads:
                paths = [("fused", a.steps, a.warmup)] + ([("loop", 3, 1)] if a.loop else [])
                for path, steps, warmup in paths:
                    tf, tq = bench(name, batch, threads, steps, warmup, path)
                    mf, mq = statistics.median(tf), statistics.median(tq)
                    print(f"| {name} | {batch} | {threads} | {path} | {mf * 1e3:.1f} | {mq * 1e3:.1f} | "
                          f"**{mq / mf:.2f}** | {min(tf) * 1e3:.1f} | {min(tq) * 1e3:.1f} | {min(tq) / min(tf):.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
