"""Train the float G2P model (teacher forcing, one CPU thread), select by dev PER.

Example (the reference run, docs/g2p.md)::

    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.train_fp --minutes 35 --threads 1

Training: Adam (lr 2e-3), gradient-norm clipping at 1.0, linear warm-up over 200 steps then cosine
decay to ``lr * min_lr_frac`` over the budget: ``--minutes`` of training steps (evaluations
excluded; the schedule follows elapsed step time, so it ends at the budget whatever the machine's
speed) or, with ``--steps``, that many steps (the same run on any machine, up to float rounding).
Batches: :func:`examples.g2p.data.train_batches` (words of similar length), cross-entropy over the
target phonemes + EOS (PAD ignored).

Every ``--eval-every`` seconds of steps (or ``--eval-every-steps``) it decodes the whole dev split
greedily and saves the model with the best dev PER to ``--out``; at the end the best model is
scored on the test split (greedy and beam search, :mod:`examples.g2p.evaluate_fp`) and the figures
go into the checkpoint and ``<out stem>.metrics.json``.

Files next to ``--out`` (``examples/g2p/runs/``, git-ignored): ``fp.pt`` (best: state_dict,
model_config, train config, history, metrics), ``fp.last.pt`` (latest state with the optimizer,
for ``--resume``), ``fp.metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .evaluate_fp import decode_entries, evaluate, score
from .model import G2P

RUNS = Path(__file__).resolve().parent / "runs"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RUNS / "fp.pt")
    p.add_argument("--minutes", type=float, default=35.0, help="budget of training-step time (evaluations excluded)")
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead (schedule over steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.02)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--enc-hidden", type=int, default=256)
    p.add_argument("--enc-layers", type=int, default=2)
    p.add_argument("--dec-hidden", type=int, default=256)
    p.add_argument("--score", choices=["general", "dot"], default="general")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--eval-every", type=float, default=180.0, help="seconds of steps between dev evaluations")
    p.add_argument("--eval-every-steps", type=int, default=0, help="steps between dev evaluations (instead of --eval-every)")
    p.add_argument("--dev-words", type=int, default=0, help="evaluate on this many evenly spaced dev words (0: all)")
    p.add_argument("--beam", type=int, default=3, help="beam of the final test evaluation")
    p.add_argument("--no-final-eval", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.last.pt")
    return p.parse_args(argv)


def lr_at(step: int, progress: float, args) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    frac = min(max(progress, 0.0), 1.0)
    return args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evenly_spaced(entries, n: int):
    if not n or n >= len(entries):
        return entries
    return [entries[i] for i in np.unique(np.linspace(0, len(entries) - 1, n).round().astype(int))]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    last_path = out.with_name(out.stem + ".last.pt")
    metrics_path = out.with_name(out.stem + ".metrics.json")

    train, dev, test = (D.load_split(s) for s in D.SPLITS)
    dev_eval = evenly_spaced(dev, args.dev_words)
    log(f"words: train {len(train):,} dev {len(dev):,} (evaluating {len(dev_eval):,}) test {len(test):,}; "
        f"threads {torch.get_num_threads()}")

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = G2P(args.embed_dim, args.enc_hidden, args.enc_layers, args.dec_hidden, args.score, args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, elapsed, best, history = 0, 0.0, float("inf"), []
    if args.resume and last_path.exists():
        st = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, elapsed, best, history = st["step"], st["elapsed_s"], st["best_dev_per"], st["history"]
        rng.bit_generator.state = st["np_rng"]
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed from {last_path}: step {step}, {elapsed / 60:.1f} min, best dev PER {best:.4f}")
    train_cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {model.config()} ({n_params:,} params); config {json.dumps(train_cfg)}")

    def ckpt_common() -> dict:
        return {"model": model.state_dict(), "model_config": model.config(), "train_config": train_cfg,
                "split_sha256": D.SPLIT_SHA256, "step": step, "elapsed_s": elapsed, "history": history}

    def evaluate_and_save() -> None:
        nonlocal best
        t0 = time.time()
        res = evaluate(model, dev_eval, beam=1)
        model.train()
        history.append({"step": step, "elapsed_s": round(elapsed, 1), "dev_per": res.per, "dev_wer": res.wer})
        improved = res.per < best
        if improved:
            best = res.per
            _atomic_save({**ckpt_common(), "dev_per": res.per, "dev_wer": res.wer}, out)
        _atomic_save({**ckpt_common(), "optimizer": opt.state_dict(), "best_dev_per": best,
                      "np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, last_path)
        log(f"EVAL step {step} ({elapsed / 60:.1f} min): dev PER {100 * res.per:.2f} % WER {100 * res.wer:.2f} % "
            f"(greedy){'  *best, saved' if improved else ''}  [{time.time() - t0:.0f} s]")

    budget = args.minutes * 60.0

    def progress() -> float:
        return step / args.steps if args.steps else elapsed / budget

    def eval_due() -> bool:
        if args.eval_every_steps:
            return step % args.eval_every_steps == 0
        return elapsed - last_eval >= args.eval_every

    metrics_path.unlink(missing_ok=True)
    batches = D.train_batches(train, args.batch, rng)
    model.train()
    last_eval = elapsed
    win_loss, win_n, win_t0 = 0.0, 0, time.time()
    while progress() < 1.0:
        t0 = time.time()
        lr = lr_at(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = lr
        b = next(batches)
        logits = model(torch.from_numpy(b.src), torch.from_numpy(b.lengths), torch.from_numpy(b.tgt_in))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(b.tgt_out).reshape(-1),
                               ignore_index=D.PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step()
        step += 1
        elapsed += time.time() - t0
        win_loss += loss.item()
        win_n += 1
        if step % args.log_every == 0:
            wall = time.time() - win_t0
            of = f"step {step}/{args.steps}" if args.steps else f"step {step} | {elapsed / 60:5.1f}/{args.minutes:g} min"
            log(f"{of} | lr {lr:.2e} | train loss {win_loss / win_n:.4f} | gnorm {gnorm:.2f} | {wall / win_n:.3f} s/step "
                f"| epoch {step * args.batch / len(train):.2f}")
            win_loss, win_n, win_t0 = 0.0, 0, time.time()
        if eval_due():
            evaluate_and_save()
            last_eval = elapsed
            win_loss, win_n, win_t0 = 0.0, 0, time.time()
    if not history or history[-1]["step"] != step:
        evaluate_and_save()
    log(f"budget spent: {step} steps, {elapsed / 60:.1f} min; best dev PER {100 * best:.2f} %")
    if args.no_final_eval:
        return
    ck = torch.load(out, map_location="cpu", weights_only=False)
    model.load_state_dict(ck["model"])
    model.eval()
    t0 = time.time()
    metrics = {"step": ck["step"], "elapsed_s": ck["elapsed_s"]}
    for split, entries in (("dev", dev), ("test", test)):
        for beam in (1, args.beam):
            res, multi = score(entries, decode_entries(model, entries, beam))
            key = f"{split}_{'greedy' if beam == 1 else f'beam{beam}'}"
            metrics[key] = res.as_dict()
            metrics[key + "_multiref"] = multi.as_dict()
            log(f"FINAL {key}: PER {100 * res.per:.2f} % WER {100 * res.wer:.2f} % "
                f"(closest of the variants: PER {100 * multi.per:.2f} % WER {100 * multi.wer:.2f} %)")
    ck["metrics"] = metrics
    _atomic_save(ck, out)
    metrics_path.write_text(json.dumps(metrics, indent=1) + "\n")
    log(f"final evaluation {time.time() - t0:.0f} s; metrics in {metrics_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
