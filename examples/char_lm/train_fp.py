"""Train the float CharLM on the CPython-docs corpus (time-budgeted, resumable).

Example (the reference run's 1,535 steps, reproducible by steps; one CPU thread, 17 min of
steps on a shared Zen 5 core; the first run, by time budget on another machine, took 70 min)::

    OMP_NUM_THREADS=1 python -m examples.char_lm.train_fp --steps 1535 --threads 1 \\
        --eval-every-steps 256 --out examples/char_lm/runs/fp.pt

Training: Adam (lr 2e-3, betas 0.9/0.999), gradient-norm clipping at 1.0, linear
warm-up over the first 100 steps then cosine decay to ``lr * min_lr_frac`` over the
*time* budget ``--minutes`` (the schedule is a function of elapsed training time, so it ends at
the budget whatever the machine's speed) or, with ``--steps``, over that many steps (the same
run on any machine, up to float rounding). By default every step draws ``batch`` windows
of ``seq_len`` characters at uniform random positions of the train split and runs
them from a zero LSTM state -- exactly the condition of the :func:`~examples.char_lm.model.bpc`
protocol (``--mode tbptt`` instead carries the state across contiguous chunks).

Every ``--eval-every`` seconds it prints a BPC estimate on ``--eval-windows`` evenly
spaced valid windows, saves the best model (by that estimate) to ``--out`` and the
full training state to ``<out stem>.last.pt``. When the budget is spent, the best
model is scored on the whole valid and test splits with the reference protocol and
the figures are stored in the checkpoint and in ``<out stem>.metrics.json``.

Files written next to ``--out`` (e.g. ``runs/fp.pt``):
  fp.pt            best checkpoint: model state_dict, model_config, vocab, train config, metrics
  fp.vocab.json    the vocabulary (same as data/vocab.json)
  fp.last.pt       latest full state (model, optimizer, RNGs, step, elapsed) for --resume
  fp.metrics.json  final full-split BPC figures

``--resume`` continues from ``fp.last.pt`` (same arguments; ``--minutes`` is the total
training time across all runs, so pass a larger value to train longer).
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
from .model import CharLM, bpc, generate, vocab_path_for


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples/char_lm/runs/fp.pt"))
    p.add_argument("--minutes", type=float, default=70.0, help="training-step time budget in minutes (excludes evaluations; total across resumes)")
    p.add_argument(
        "--steps", type=int, default=0,
        help="stop at this step count instead of the time budget (the cosine schedule then runs over steps, "
        "so the run is reproducible on any machine; --minutes is ignored)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--mode", choices=["windows", "tbptt"], default="windows")
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--eval-every", type=float, default=300.0, help="seconds between valid evaluations")
    p.add_argument(
        "--eval-every-steps", type=int, default=0,
        help="steps between valid evaluations (instead of --eval-every; with --steps it makes the saved best model reproducible)",
    )
    p.add_argument("--eval-windows", type=int, default=1024, help="valid windows per periodic evaluation")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--no-final-eval", action="store_true", help="skip the full valid/test evaluation at the end")
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.last.pt if it exists")
    p.add_argument(
        "--init", type=Path, default=None,
        help="start from this checkpoint's weights (fresh optimizer and schedule): float fine-tuning, e.g. the "
        "float control of a QAT run with the same recipe and batches",
    )
    return p.parse_args(argv)


def lr_at(step: int, frac_time: float, args) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    frac = min(max(frac_time, 0.0), 1.0)
    cos = args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * warm * cos


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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

    train, valid, test = D.load_splits()
    vocab = D.load_vocab()
    meta = D.corpus_meta()
    vocab.save(vocab_path_for(out))
    log(
        f"corpus: train {train.size:,} valid {valid.size:,} test {test.size:,} chars; "
        f"vocab {vocab.size}; threads {torch.get_num_threads()}"
    )

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = CharLM(vocab.size, args.embed_dim, args.hidden, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, elapsed, best, history = 0, 0.0, float("inf"), []
    tb_epoch, tb_pos = 0, 0

    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=False)["model"])
        log(f"initialised from {args.init}")
    if args.resume and last_path.exists():
        st = torch.load(last_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, elapsed, best, history = st["step"], st["elapsed_s"], st["best_valid_bpc_est"], st["history"]
        tb_epoch, tb_pos = st.get("tbptt_pos", (0, 0))
        rng.bit_generator.state = st["np_rng"]
        torch.set_rng_state(st["torch_rng"])
        log(f"resumed from {last_path}: step {step}, {elapsed / 60:.1f} min trained, best est {best:.4f}")
    elif args.resume:
        log(f"--resume: {last_path} not found, starting fresh")

    train_cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {model.config()} ({n_params:,} params); config {json.dumps(train_cfg)}")

    def ckpt_common() -> dict:
        return {
            "model": model.state_dict(),
            "model_config": model.config(),
            "vocab": vocab.to_json(),
            "train_config": train_cfg,
            "data_meta": meta,
            "step": step,
            "elapsed_s": elapsed,
            "history": history,
        }

    def evaluate_and_save(final: bool = False) -> None:
        nonlocal best
        t0 = time.time()
        est = bpc(model, valid, args.seq_len, args.eval_batch, max_windows=args.eval_windows)
        dt = time.time() - t0
        history.append({"step": step, "elapsed_s": round(elapsed, 1), "valid_bpc_est": est})
        improved = est < best
        if improved:
            best = est
            _atomic_save({**ckpt_common(), "valid_bpc_est": est}, out)
        _atomic_save(
            {
                **ckpt_common(),
                "optimizer": opt.state_dict(),
                "best_valid_bpc_est": best,
                "np_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "tbptt_pos": (tb_epoch, tb_pos),
            },
            last_path,
        )
        log(
            f"EVAL step {step} ({elapsed / 60:.1f} min): valid BPC (est, {args.eval_windows} windows) "
            f"{est:.4f}{'  *best, saved' if improved else ''}  [{dt:.0f}s]"
        )

    budget = args.minutes * 60.0

    def progress() -> float:
        # Fraction of the schedule done: by steps when a step count is given, else by training time.
        return step / args.steps if args.steps else elapsed / budget

    def eval_due() -> bool:
        if args.eval_every_steps:
            return step % args.eval_every_steps == 0
        return elapsed - last_eval >= args.eval_every

    metrics_path.unlink(missing_ok=True)  # stale once the model changes
    # ----- batch sources
    def tbptt_source():
        nonlocal tb_epoch, tb_pos
        while True:
            off = int(np.random.default_rng(args.seed + tb_epoch).integers(0, args.seq_len))
            it = D.tbptt_batches(train, args.batch, args.seq_len, offset=off)
            for k, xy in enumerate(it):
                if k < tb_pos:
                    continue
                tb_pos = k + 1
                yield xy
            tb_epoch, tb_pos = tb_epoch + 1, 0

    batches = D.random_windows(train, args.batch, args.seq_len, rng) if args.mode == "windows" else tbptt_source()
    state = None

    model.train()
    last_eval = elapsed
    win_loss, win_n, win_t0 = 0.0, 0, time.time()
    if step == 0:
        evaluate_and_save()  # the untrained baseline (~log2 V)
    while progress() < 1.0:
        t0 = time.time()
        lr = lr_at(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(batches)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if args.mode == "tbptt":
            logits, state = model.forward_with_state(x, state)
            state = tuple(s.detach() for s in state)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
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
            of_budget = f"step {step}/{args.steps} | {elapsed / 60:5.1f} min" if args.steps else f"step {step} | {elapsed / 60:5.1f}/{args.minutes:g} min"
            log(
                f"{of_budget} | lr {lr:.2e} | "
                f"train BPC {win_loss / win_n / math.log(2):.4f} | gnorm {gnorm:.2f} | "
                f"{wall / win_n:.2f} s/step | {win_n * args.batch * args.seq_len / wall:,.0f} chars/s"
            )
            win_loss, win_n, win_t0 = 0.0, 0, time.time()
        if eval_due():
            evaluate_and_save()
            last_eval = elapsed
            win_loss, win_n, win_t0 = 0.0, 0, time.time()  # keep eval time out of s/step
    if not history or history[-1]["step"] != step:
        evaluate_and_save()
    log(f"training budget spent: {step} steps, {elapsed / 60:.1f} min; best valid est {best:.4f}")

    if args.no_final_eval:
        return
    ck = torch.load(out, map_location="cpu", weights_only=False)
    model.load_state_dict(ck["model"])
    t0 = time.time()
    res = {
        "protocol": f"bpc(seq_len={args.seq_len}, non-overlapping windows, zero state per window)",
        "valid_bpc": bpc(model, valid, args.seq_len, args.eval_batch),
        "test_bpc": bpc(model, test, args.seq_len, args.eval_batch),
        "step": ck["step"],
        "elapsed_s": ck["elapsed_s"],
    }
    ck["metrics"] = res
    _atomic_save(ck, out)
    metrics_path.write_text(json.dumps(res, indent=1) + "\n")
    log(f"FINAL best checkpoint (step {ck['step']}): valid BPC {res['valid_bpc']:.4f}, test BPC {res['test_bpc']:.4f} [{time.time() - t0:.0f}s]")
    log("sample: " + repr(generate(model, vocab, "The ", 160)))


if __name__ == "__main__":
    main(sys.argv[1:])
