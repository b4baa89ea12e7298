"""Accuracy and speed cost of 7-bit weights (QuantConfig(weight_bits=7)) on the char LM.

    .venv/bin/python -m examples.char_lm.weight_bits          # ~5 min on one core

7-bit GEMM weights ([-63, 63]) let the AVX2 kernels use vpmaddubsw on unsigned activations (exact,
docs/integer_spec.md section 4), with half the instructions per multiply-add of the exact
full-range vpmaddwd kernel. This script measures what the lost weight bit costs.

Protocol: the FP weights are not shipped, so the float model is the shipped QAT model's int8 weights
times their scales (`common.dequantized_fp32_model`, close to the trained FP model). That float model
is PTQ-quantized twice with the standard calibration batches, once with weight_bits=8 and once with
weight_bits=7 (everything else equal), each compiled for this machine and scored through the compiled
module on the SUBSET_WINDOWS = 512 test windows; batch-1 latency over one 128-char window is measured
in the same run, interleaved (median of rounds). Writes ``runs/weight_bits.json`` and the table between
the ``weight_bits`` markers of docs/char_lm.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from . import common as C  # noqa: I001  (sets the thread counts first)

import tvm_intlstm as til

from .data import load_splits
from .evaluate import update_doc
from .model import bpc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=C.SUBSET_WINDOWS)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    t_all = time.time()
    train, _, test = load_splits()
    shipped = til.load_quantized(C.SHIPPED_QPT)
    fp = C.dequantized_fp32_model(shipped)
    t = time.time()
    fp_bpc = bpc(fp, test, C.SEQ_LEN, C.BATCH, max_windows=a.windows)
    C.log(f"float model (dequantized shipped weights): test BPC ({a.windows} windows) {fp_bpc:.4f}  "
          f"[{time.time() - t:.0f}s]")
    x1 = C.window_batch(test, [0], C.SEQ_LEN)
    rows, cms = [], {}
    for bits in (8, 7):
        t = time.time()
        q = til.quantize(fp, C.calib_batches(train), til.QuantConfig(weight_bits=bits))
        cm = C.compile_host(q)
        ok, _ = C.check_bitexact(cm, q, x1)
        if not ok:
            raise SystemExit(f"compiled module differs from the integer model (weight_bits={bits})")
        b = bpc(C.dequantized_fn(cm, C.logits_scale(cm)), test, C.SEQ_LEN, C.BATCH, max_windows=a.windows)
        cms[bits] = cm
        rows.append({"weight_bits": bits, "test_bpc_subset": b, "vs_float_pct": C.rel_gap(b, fp_bpc)})
        C.log(f"weight_bits={bits}: test BPC {b:.4f} ({C.rel_gap(b, fp_bpc):+.2f} % vs float)  [{time.time() - t:.0f}s]")
    # latency, interleaved rounds (machines are shared: compare within the run)
    times = {8: [], 7: []}
    for bits in (8, 7):
        for _ in range(3):
            cms[bits](x1)
    for _ in range(a.rounds):
        for bits in (8, 7):
            t0 = time.perf_counter()
            cms[bits](x1)
            times[bits].append(time.perf_counter() - t0)
    for r in rows:
        r["latency_ms_b1"] = float(np.median(times[r["weight_bits"]]) * 1e3)
    speedup = rows[0]["latency_ms_b1"] / rows[1]["latency_ms_b1"]
    res = {"protocol": f"PTQ of the dequantized shipped model, bpc(seq_len={C.SEQ_LEN}, batch={C.BATCH}, "
                       f"max_windows={a.windows}), latency batch 1 x {C.SEQ_LEN} chars, median of {a.rounds} "
                       f"interleaved rounds, one thread, compiled for {C.host_target()}",
           "float_test_bpc_subset": fp_bpc, "rows": rows, "speedup_7_over_8": speedup,
           "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - t_all)}
    C.write_json(C.RUNS / "weight_bits.json", res)
    lines = ["| weight bits | test BPC (512 windows) | vs float | latency, batch 1 x 128 chars |",
             "|---:|---:|---:|---:|",
             f"| float (dequantized) | {fp_bpc:.4f} | | |"]
    for r in rows:
        lines.append(f"| {r['weight_bits']} | {r['test_bpc_subset']:.4f} | {r['vs_float_pct']:+.2f} % | "
                     f"{r['latency_ms_b1']:.2f} ms |")
    lines.append("")
    lines.append(f"7-bit weights are {speedup:.2f}x faster end to end here. Command: "
                 f"`.venv/bin/python -m examples.char_lm.weight_bits` ({res['date']}, {res['seconds']} s).")
    block = "\n".join(lines)
    print(block)
    if not update_doc(block, "weight_bits"):
        C.log("docs/char_lm.md has no weight_bits markers: table not written there")


if __name__ == "__main__":
    with torch.no_grad():
        main()
