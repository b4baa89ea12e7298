"""Quantization-aware fine-tuning of the float CharLM (tvm_intlstm.prepare_qat), time-budgeted.

    .venv/bin/python -m examples.char_lm.qat --minutes 9.3 --out examples/char_lm/runs/charlm_qat_fast.qpt

(without ``--out`` it overwrites the shipped model, model/charlm_qat.qpt). Starts from the FP
checkpoint, ``prepare_qat`` with the same calibration batches as PTQ (so the activation ranges, cell
formats and PWL tables are PTQ's and step 0 *is* the PTQ model), then trains the fake-quantized model
(straight-through gradients, PWL tables in float, spec numerics) on random train windows from a zero
state -- the BPC protocol's condition: Adam, ``--lr`` (small: the FP run ended at 1e-4) with a linear
warm-up and a cosine decay to 0 over the time budget (``--minutes``; or over ``--steps`` steps, which
makes a run reproducible on any machine), gradient clipping at 1.

Model selection uses the EXACT deployed arithmetic: every ``--eval-every`` minutes of training (and
at step 0 and the end) the QAT model is converted (saved to ``runs/<out stem>.latest.qpt``), compiled
for this machine and scored on ``--eval-windows`` evenly spaced VALID windows through the compiled
module, in a child process (isolates the training run from a crash in the compiler); the best one
(step 0 included, so QAT never ships a model worse than PTQ on valid) is written with
``tvm_intlstm.save_quantized`` to ``--out`` together with the vocab JSON. The test split is not
looked at here (evaluate.py). Evaluations are not part of the budget; their time is logged and
summed separately (``runs/<out stem>.json``: per evaluation the step, the training minutes and the
wall minutes since the first step, evaluations included).

The QAT LSTM runs its time loop fused (``QuantConfig(qat_lstm="fused")``, the default): a [16, 128]
step of this model costs ~0.35 s on one (shared Zen 5) core, ~1.4x a float step; the Python-loop
path, ``--qat-lstm loop``, ~1.9 s. docs/char_lm.md has the run of the default budget.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)

import numpy as np
import torch
import torch.nn.functional as F

import tvm_intlstm as til

from .data import load_splits, random_windows
from .model import bpc, load_checkpoint


def int_valid_bpc(qpt: Path, n_windows: int) -> float:
    """Valid BPC of a saved integer model through the compiled module (load -> compile -> bpc)."""
    q = til.load_quantized(qpt)
    cm = C.compile_host(q)
    _, valid, _ = load_splits()
    return bpc(C.dequantized_fn(cm, C.logits_scale(cm)), valid, C.SEQ_LEN, C.BATCH, max_windows=n_windows)


def int_valid_bpc_child(qpt: Path, n_windows: int) -> float:
    """int_valid_bpc in a child process: a crash inside TVM (seen once: an abort after
    "BlockBuilder destroyed with remaining blocks" in the 4th compile of a long QAT process) then
    costs one evaluation instead of the whole run. Returns nan if the child fails."""
    cmd = [sys.executable, "-m", "examples.char_lm.qat", "--score", str(qpt), "--eval-windows", str(n_windows)]
    res = subprocess.run(cmd, cwd=C.REPO, capture_output=True, text=True)
    for line in reversed(res.stdout.splitlines()):
        if line.startswith("{"):
            return float(json.loads(line)["valid_int_bpc"])
    C.log(f"WARNING: evaluation child failed (exit {res.returncode}): {(res.stdout + res.stderr)[-800:]}")
    return math.nan


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=C.FP_CKPT)
    p.add_argument("--out", type=Path, default=C.SHIPPED_QPT)
    p.add_argument("--minutes", type=float, default=9.3, help="training time budget (evaluations excluded)")
    p.add_argument("--steps", type=int, default=0,
                   help="stop at this step count and run the schedule over steps instead of time (--minutes ignored)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=C.SEQ_LEN)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--pieces", type=int, default=16)
    p.add_argument("--method", choices=["adaptive", "uniform"], default="adaptive")
    p.add_argument("--qat-lstm", choices=["fused", "loop"], default="fused", help="QuantConfig.qat_lstm")
    p.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between evaluations")
    p.add_argument("--eval-windows", type=int, default=384, help="valid windows per evaluation")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", type=Path, default=None, help=argparse.SUPPRESS)  # child-process evaluation
    a = p.parse_args(argv)
    if a.score is not None:
        print(json.dumps({"valid_int_bpc": int_valid_bpc(a.score, a.eval_windows)}), flush=True)
        return

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    fp_model, vocab, ck = load_checkpoint(a.ckpt)
    train, valid, _ = load_splits()
    budget_txt = f"{a.steps} steps" if a.steps else f"{a.minutes:g} min of steps"
    C.log(f"FP checkpoint {a.ckpt} (step {ck.get('step')}); QAT ({a.qat_lstm} LSTM): batch {a.batch}x{a.seq_len}, "
          f"lr {a.lr:g}, budget {budget_txt}, evaluation every {a.eval_every:g} min")
    t0 = time.time()
    cfg = til.QuantConfig(pwl_pieces=a.pieces, pwl_method=a.method, qat_lstm=a.qat_lstm)
    qat = til.prepare_qat(fp_model, cfg, calib_data=C.calib_batches(train))
    C.log(f"prepare_qat + calibration: {time.time() - t0:.0f} s")
    fp_est = bpc(fp_model, valid, C.SEQ_LEN, C.BATCH, max_windows=a.eval_windows)
    C.log(f"FP valid BPC ({a.eval_windows} windows): {fp_est:.4f}")

    history = []
    best = {"bpc": math.inf, "step": None}

    latest = C.RUNS / f"{a.out.stem}.latest.qpt"
    summary_path = C.RUNS / f"{a.out.stem}.json"
    eval_seconds = 0.0
    t_start = time.time()  # "wall minutes" run from step 0's evaluation and count the evaluations too

    def evaluate(step: int, train_s: float) -> None:
        nonlocal eval_seconds
        t = time.time()
        latest.parent.mkdir(parents=True, exist_ok=True)
        til.save_quantized(til.convert(qat), latest)
        v = int_valid_bpc_child(latest, a.eval_windows)
        dt = time.time() - t
        eval_seconds += dt
        wall_min = (t - t_start) / 60  # when the evaluated weights existed
        history.append({"step": step, "train_min": round(train_s / 60, 3), "wall_min": round(wall_min, 3),
                        "valid_int_bpc": v, "eval_s": round(dt, 1)})
        mark = ""
        if v < best["bpc"]:
            best.update(bpc=v, step=step)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(latest, a.out)
            mark = f"  *best, saved {a.out.name}"
        C.log(f"EVAL step {step} ({train_s / 60:.1f} min of steps, {wall_min:.1f} min wall): integer valid BPC "
              f"({a.eval_windows} windows, compiled module) {v:.4f} ({C.rel_gap(v, fp_est):+.2f}% vs FP){mark}  [{dt:.0f}s]")

    evaluate(0, 0.0)  # = the PTQ model (same calibration, untouched weights)
    qat.train()
    opt = torch.optim.Adam([q for q in qat.parameters() if q.requires_grad], lr=a.lr)
    batches = random_windows(train, a.batch, a.seq_len, rng)
    budget = 60.0 * a.minutes
    step, elapsed, last_eval = 0, 0.0, 0.0

    def progress() -> float:
        return step / a.steps if a.steps else elapsed / budget

    win_loss, win_n, win_t = 0.0, 0, 0.0
    while progress() < 1.0:
        t = time.time()
        lr = a.lr * min(1.0, (step + 1) / a.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(progress(), 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = (torch.from_numpy(v) for v in next(batches))
        logits = qat(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(qat.parameters(), a.clip)
        opt.step()
        step += 1
        dt = time.time() - t
        elapsed += dt
        win_loss, win_n, win_t = win_loss + loss.item(), win_n + 1, win_t + dt
        if step % a.log_every == 0:
            of_budget = f"step {step}/{a.steps} | {elapsed / 60:5.1f} min" if a.steps else \
                f"step {step} | {elapsed / 60:5.1f}/{a.minutes:g} min"
            C.log(f"{of_budget} | lr {lr:.2e} | fake-quant train BPC "
                  f"{win_loss / win_n / math.log(2):.4f} | {win_t / win_n:.2f} s/step")
            win_loss, win_n, win_t = 0.0, 0, 0.0
        if elapsed - last_eval >= 60.0 * a.eval_every and progress() < 1.0:
            evaluate(step, elapsed)
            last_eval = elapsed
            qat.train()
    evaluate(step, elapsed)
    wall = time.time() - t_start
    C.log(f"QAT done: {step} steps in {elapsed / 60:.1f} min of training ({elapsed / max(step, 1):.2f} s/step) + "
          f"{eval_seconds / 60:.1f} min in {len(history)} evaluations = {wall / 60:.1f} min wall; "
          f"best integer valid BPC {best['bpc']:.4f} at step {best['step']} (FP {fp_est:.4f}, {C.rel_gap(best['bpc'], fp_est):+.2f}%)")
    vocab.save(C.SHIPPED_VOCAB if a.out == C.SHIPPED_QPT else a.out.with_suffix(".vocab.json"))
    C.write_json(summary_path, {"args": {k: str(v) for k, v in vars(a).items()}, "steps": step,
                                "train_minutes": elapsed / 60, "eval_minutes": eval_seconds / 60,
                                "wall_minutes": wall / 60, "fp_valid_bpc_est": fp_est,
                                "best": best, "history": history})
    C.log(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB), {summary_path.relative_to(C.REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
