"""Main job: the SHIPPED integer char LM compiled for this machine, scored and timed (~1 minute).

    .venv/bin/python -m examples.char_lm.main [--windows 512] [--out examples/char_lm/runs/charlm_int.so]

No training and no FP weights needed. Steps:

1. load ``model/charlm_qat.qpt`` (int8 weights, data-only file) and its vocab;
2. compile it for this machine (tvm_intlstm's ``host`` target: LLVM's triple and ``-mcpu``), export
   the shared library (``--out``), load the exported library back and use THAT module from here on;
3. check it against the numpy reference (til.reference) bit for bit on a test window;
4. test BPC through the compiled module on a fixed subset of the test split (``--windows`` evenly
   spaced 128-char windows, default 512 = 65,536 scored chars, ~17 % of the split: the full split
   takes 45-120 s more on one core) and print it next to the FP figures. The FP figures are REPRINTED from
   ``model/metrics.json`` (written by evaluate.py from the FP checkpoint on the same subset and on the
   full split), because shipping FP weights only for that (6.7 MB in float16) would double the
   commit and scoring them in PyTorch costs 30+ s more;
5. latency at batch 1, T=128 (median of ``--reps`` runs): compiled integer module vs PyTorch FP32
   ``CharLM`` in the same process. The FP32 model is rebuilt from the shipped int8 weights times their
   scales (same architecture and shapes; dense FP32 latency does not depend on the values);
6. sizes: exported .so, int8 model file, int8 weights alone vs the FP32 state dict.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)

import torch

import tvm_intlstm as til

from .data import Vocab, load_splits
from .model import bpc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=C.SHIPPED_QPT)
    p.add_argument("--out", type=Path, default=C.RUNS / "charlm_int.so", help="exported library path")
    p.add_argument("--windows", type=int, default=C.SUBSET_WINDOWS, help="test windows to score (0 = all)")
    p.add_argument("--reps", type=int, default=20, help="timed runs per latency figure")
    a = p.parse_args(argv)
    t_all = time.time()

    # 1. shipped model + data
    q = til.load_quantized(a.model)
    vocab = Vocab.load(C.SHIPPED_VOCAB)
    metrics = C.read_json(C.SHIPPED_METRICS)
    _, _, test = load_splits()
    C.log(f"loaded {a.model.relative_to(C.REPO) if a.model.is_relative_to(C.REPO) else a.model} "
          f"({a.model.stat().st_size / 1e6:.2f} MB, vocab {vocab.size}); test split {test.size:,} chars")

    # 2. compile, export, reload
    target = C.host_target()
    C.log(f"compiling for {target} ...")
    t = time.time()
    cm0 = C.compile_host(q)
    t_compile = time.time() - t
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cm0.export_library(a.out)
    cm = til.load(a.out)
    C.log(f"compiled in {t_compile:.1f} s; exported {a.out} ({a.out.stat().st_size / 1e6:.2f} MB) and loaded it back")
    scale = C.logits_scale(cm)

    # 3. bit-exact vs the reference
    x = C.window_batch(test, C.eval_windows(test, C.SLICE_WINDOWS)[:1])
    t = time.time()
    same, _ = C.check_bitexact(cm, q, x)
    C.log(f"compiled module == numpy reference on a {list(x.shape)} test window: {same}  [{time.time() - t:.1f}s]")
    if not same:
        sys.exit("the compiled module disagrees with the reference")

    # 4. BPC through the compiled module
    n_win = None if a.windows <= 0 else a.windows
    starts = C.eval_windows(test, n_win)
    n_batches = -(-starts.size // C.BATCH)
    done = {"n": 0, "t": time.time(), "last": time.time()}
    deq = C.dequantized_fn(cm, scale)

    def progress_fn(xb):
        y = deq(xb)
        done["n"] += 1
        if time.time() - done["last"] > 5 or done["n"] == n_batches:
            C.log(f"  BPC batches {done['n']}/{n_batches} ({time.time() - done['t']:.0f}s)")
            done["last"] = time.time()
        return y

    C.log(f"test BPC through the compiled module: {starts.size} windows x {C.SEQ_LEN} chars "
          f"({'full split' if n_win is None or starts.size == (test.size - 1) // C.SEQ_LEN else 'fixed evenly spaced subset'})")
    t = time.time()
    int_bpc = bpc(progress_fn, test, C.SEQ_LEN, C.BATCH, max_windows=n_win)
    t_bpc = time.time() - t
    key = "full" if n_win is None else ("subset" if n_win == C.SUBSET_WINDOWS else None)
    fp_bpc = metrics.get("fp", {}).get(f"test_bpc_{key}") if key else None
    rec_int = metrics.get("qat", {}).get(f"test_bpc_{key}") if key else None

    # 5. latency, batch 1, T=128
    C.log(f"latency: batch 1, T={C.SEQ_LEN}, median of {a.reps} runs each ...")
    x1 = C.window_batch(test, starts[:1])
    fp32 = C.dequantized_fp32_model(q)
    x1_t = torch.from_numpy(x1)
    with torch.no_grad():
        ms_fp = C.median_ms(lambda: fp32(x1_t), a.reps)
        agree = float((fp32(x1_t).argmax(-1).numpy() == cm(x1).argmax(-1)).mean())
    ms_int = C.median_ms(lambda: cm(x1), a.reps)
    x8 = C.window_batch(test, starts[:8])
    ms_int8 = C.median_ms(lambda: cm(x8), max(3, a.reps // 4))
    with torch.no_grad():
        x8_t = torch.from_numpy(x8)
        ms_fp8 = C.median_ms(lambda: fp32(x8_t), max(3, a.reps // 4))

    # 6. sizes
    so_b = a.out.stat().st_size
    qpt_b = a.model.stat().st_size
    int8_w = sum(b.numel() for b in q.gm.buffers() if b.dtype == torch.int8)
    fp_sd = C.state_dict_bytes(fp32)
    n_params = sum(p_.numel() for p_ in fp32.parameters())

    print()
    print(f"== char LM, integer-only (tvm_intlstm), target {target}, 1 thread ==")
    print(f"test BPC ({'full split' if key == 'full' else f'{starts.size} evenly spaced windows of the test split'}):")
    if fp_bpc is not None:
        print(f"  FP32 PyTorch (recorded by evaluate.py)       {fp_bpc:.4f}")
    print(f"  integer, compiled module (this run)          {int_bpc:.4f}"
          + (f"   {C.rel_gap(int_bpc, fp_bpc):+.2f} % vs FP" if fp_bpc else ""))
    if rec_int is not None:
        print(f"  integer, recorded by evaluate.py             {rec_int:.4f}   ({'same' if abs(rec_int - int_bpc) < 1e-6 else 'DIFFERENT'})")
    fpm = metrics.get("fp", {})
    if "test_bpc_full" in fpm and "test_bpc_full" in metrics.get("qat", {}):
        f, i = fpm["test_bpc_full"], metrics["qat"]["test_bpc_full"]
        print(f"  full test split (recorded): FP {f:.4f}, integer {i:.4f} ({C.rel_gap(i, f):+.2f} %)")
    print(f"latency batch 1 x T={C.SEQ_LEN} (median of {a.reps}):  integer compiled {ms_int:.1f} ms, "
          f"PyTorch FP32 {ms_fp:.1f} ms  -> {ms_fp / ms_int:.2f}x")
    print(f"latency batch 8 x T={C.SEQ_LEN}:                    integer compiled {ms_int8:.1f} ms, "
          f"PyTorch FP32 {ms_fp8:.1f} ms  -> {ms_fp8 / ms_int8:.2f}x")
    print(f"  (FP32 = CharLM rebuilt from the int8 weights x scales; next-char argmax agreement with the "
          f"integer model on that window {agree * 100:.1f} %)")
    print(f"size: FP32 state dict {fp_sd / 1e6:.2f} MB ({n_params:,} params) | int8 weights {int8_w / 1e6:.2f} MB "
          f"({fp_sd / int8_w:.2f}x smaller) | model file {qpt_b / 1e6:.2f} MB ({fp_sd / qpt_b:.2f}x) | "
          f"exported .so {so_b / 1e6:.2f} MB ({fp_sd / so_b:.2f}x)")
    print(f"exported library: {a.out} (+ .json); BPC pass {t_bpc:.0f} s, compile {t_compile:.0f} s, "
          f"total {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
