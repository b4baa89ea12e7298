"""Quantization-aware fine-tuning of the shipped float G2P model into an integer-only encoder +
decoder pair (tvm_intlstm.prepare_qat_seq2seq, docs/seq2seq.md).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python -m examples.g2p.qat --minutes 12   # the shipped run -> runs/g2p_qat.qpt
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.qat --steps 2000 --out runs/x.qpt

1. Load ``model/fp.pt`` and PTQ-calibrate the pair exactly as :mod:`examples.g2p.quantize_ptq`
   does (8 x 64 train words, seed 1234; the activation ranges stay fixed from here on).
2. Fine-tune with fake quantization (``QATSeq2Seq``: every layer on its integer grid with
   straight-through gradients, the decoder's ``enc`` input on the int8 grid of the encoder's output
   scale): Adam, ``--lr`` after a short warm-up, cosine decay to ``--min-lr-frac`` over the budget
   (``--minutes`` of step time, evaluations excluded, or ``--steps``), batch 64 train words
   (:func:`examples.g2p.data.train_batches`), cross-entropy over phonemes + EOS, gradient clipping 1.0.
3. Every ``--eval-every`` seconds of steps (and before the first step: the PTQ model) the pair is
   converted to the integer pair and **compiled for the host**; the dev split is decoded greedily
   through the compiled library (``--dev-words`` evenly spaced words, 0: all) and the integer pair
   with the best dev PER is kept. The PTQ model (step 0) is a candidate too, so QAT never ships a
   worse dev PER than PTQ.
4. The best integer pair is written with ``tvm_intlstm.save_quantized`` (one data-only file,
   ``--out``), with the run's history in ``<out stem>.json``.

Evaluate it on the test split with ``python -m examples.g2p.evaluate --model qat --qpt <out>``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tvm_intlstm as til  # noqa: E402

from . import data as D  # noqa: E402
from .evaluate_fp import score  # noqa: E402
from .model import load_checkpoint  # noqa: E402
from .quantize_ptq import CALIB_BATCH, CALIB_BATCHES, FP_CKPT, calib_batches, log, state_dict_bytes  # noqa: E402
from .train_fp import evenly_spaced  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
QAT_QPT = RUNS / "g2p_qat.qpt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=FP_CKPT, help="the FP model to start from")
    p.add_argument("--out", type=Path, default=QAT_QPT)
    p.add_argument("--minutes", type=float, default=12.0, help="budget of training-step time (evaluations excluded)")
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead (schedule over steps)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-batches", type=int, default=CALIB_BATCHES)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=float, default=120.0, help="seconds of steps between dev evaluations")
    p.add_argument("--eval-every-steps", type=int, default=0, help="steps between dev evaluations (instead)")
    p.add_argument("--dev-words", type=int, default=0, help="evaluate on this many evenly spaced dev words (0: all)")
    return p.parse_args(argv)


def lr_at(step: int, progress: float, a) -> float:
    warm = min(1.0, (step + 1) / max(1, a.warmup_steps))
    frac = min(max(progress, 0.0), 1.0)
    return a.lr * warm * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def dev_per(q, entries) -> tuple:
    """(first-pronunciation ErrorRates, seconds) of the integer pair ``q`` on ``entries``, greedy,
    through the library compiled for the host (batches of one word length)."""
    from .evaluate import decode_int
    t0 = time.time()
    lib = til.compile_seq2seq(q, "host", verbose=False)
    res = score(entries, decode_int(lib, entries))[0]
    return res, time.time() - t0


def _rel(path: Path) -> str:
    """A path relative to the repository when it is inside it (no machine paths in shipped files)."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parents[1]))
    except ValueError:
        return str(path)


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    model, ckpt = load_checkpoint(a.checkpoint)
    train, dev = D.load_split("train"), D.load_split("dev")
    dev_eval = evenly_spaced(dev, a.dev_words)
    log(f"FP checkpoint {a.checkpoint} (step {ckpt.get('step')}); train {len(train):,} words, dev "
        f"{len(dev_eval):,} evaluated")
    t0 = time.time()
    qat = til.prepare_qat_seq2seq(model.encoder, model.decoder, calib_batches(train, a.calib_batches, CALIB_BATCH))
    log(f"PTQ calibration ({a.calib_batches} x {CALIB_BATCH} train words) in {time.time() - t0:.1f} s; enc scale "
        f"{qat.enc_scale:.6g}; fake-quantized training from here")
    opt = torch.optim.Adam(qat.parameters(), lr=a.lr)

    step, elapsed, history = 0, 0.0, []
    best = {"per": float("inf")}
    budget = a.minutes * 60.0

    def evaluate_and_keep() -> None:
        q = qat.convert()
        res, secs = dev_per(q, dev_eval)
        history.append({"step": step, "elapsed_s": round(elapsed, 1), "dev_per": res.per, "dev_wer": res.wer})
        improved = res.per < best["per"]
        if improved:
            best.update(per=res.per, wer=res.wer, step=step, q=q)
        log(f"EVAL step {step} ({elapsed / 60:.1f} min): dev PER {100 * res.per:.2f} % WER {100 * res.wer:.2f} % "
            f"(integer pair, compiled library, greedy){'  *best' if improved else ''}  [{secs:.0f} s]")

    def progress() -> float:
        return step / a.steps if a.steps else elapsed / budget

    evaluate_and_keep()                      # step 0: the PTQ pair
    last_eval = elapsed
    batches = D.train_batches(train, a.batch, rng)
    qat.train()
    win_loss, win_n, win_t0 = 0.0, 0, time.time()
    while progress() < 1.0:
        t0 = time.time()
        lr = lr_at(step, progress(), a)
        for g in opt.param_groups:
            g["lr"] = lr
        b = next(batches)
        logits = qat(torch.from_numpy(b.src), torch.from_numpy(b.lengths), torch.from_numpy(b.tgt_in))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(b.tgt_out).reshape(-1),
                               ignore_index=D.PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(qat.parameters(), a.clip))
        opt.step()
        step += 1
        elapsed += time.time() - t0
        win_loss += loss.item()
        win_n += 1
        if step % a.log_every == 0:
            wall = time.time() - win_t0
            of = f"step {step}/{a.steps}" if a.steps else f"step {step} | {elapsed / 60:5.1f}/{a.minutes:g} min"
            log(f"{of} | lr {lr:.2e} | train loss {win_loss / win_n:.4f} | gnorm {gnorm:.2f} | {wall / win_n:.3f} s/step")
            win_loss, win_n, win_t0 = 0.0, 0, time.time()
        due = (step % a.eval_every_steps == 0) if a.eval_every_steps else (elapsed - last_eval >= a.eval_every)
        if due:
            evaluate_and_keep()
            last_eval = elapsed
            win_loss, win_n, win_t0 = 0.0, 0, time.time()
    if history[-1]["step"] != step:
        evaluate_and_keep()
    log(f"budget spent: {step} steps, {elapsed / 60:.1f} min; best dev PER {100 * best['per']:.2f} % at step "
        f"{best['step']} (step 0 = PTQ)")

    a.out.parent.mkdir(parents=True, exist_ok=True)
    til.save_quantized(best["q"], a.out)
    fp_bytes, q_bytes = state_dict_bytes(model), a.out.stat().st_size
    meta = {"checkpoint": _rel(a.checkpoint), "steps": step, "minutes_of_steps": round(elapsed / 60, 2),
            "best_step": best["step"], "best_dev_per": best["per"], "best_dev_wer": best["wer"],
            "dev_words": len(dev_eval), "history": history,
            "config": {k: (_rel(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "qpt_bytes": q_bytes, "fp_state_dict_bytes": fp_bytes}
    a.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"wrote {a.out} ({q_bytes / 1e6:.2f} MB; FP32 state dict {fp_bytes / 1e6:.2f} MB: "
        f"{fp_bytes / q_bytes:.2f}x smaller) and {a.out.with_suffix('.json').name}; to ship it: cp {a.out} "
        f"{HERE / 'model' / 'qat.qpt'} (evaluate.py's default)")


if __name__ == "__main__":
    main(sys.argv[1:])
