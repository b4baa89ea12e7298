"""PER / WER of the float G2P model on a split (greedy and beam search), and per-word latency.

    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate_fp                     # test split
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate_fp --mixed-batches 64  # + padded batches
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate_fp --word quantization

Words are decoded in batches of one source length each (:func:`examples.g2p.data.eval_batches`),
so no word sees padding in the encoder and a word's output is the one it gets alone. The headline
figures use the first pronunciation as the reference; the multi-reference figures score each word
against its closest variant (:mod:`examples.g2p.metrics`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import data as D
from .metrics import ErrorRates, error_rates, error_rates_multi
from .model import beam_decode, greedy_decode, load_checkpoint

RUNS = Path(__file__).resolve().parent / "runs"


def mixed_length_batches(entries: Sequence[D.Entry], batch: int):
    """Consecutive entries (alphabetical: mixed lengths, padded): what a deployment batching words
    as they come would run; the encoder's reverse direction then starts in the padding."""
    for k in range(0, len(entries), batch):
        sel = np.arange(k, min(k + batch, len(entries)))
        yield sel, D.make_batch([entries[i] for i in sel])


def decode_entries(model, entries: Sequence[D.Entry], beam: int = 1, batch: int = 256,
                   mixed_lengths: bool = False) -> list[list[str]]:
    """Predicted phonemes of every entry's word (in ``entries`` order); by default in batches of
    one length (each word as if alone), with ``mixed_lengths`` in padded batches."""
    hyps: list[list[str]] = [[] for _ in entries]
    batches = mixed_length_batches(entries, batch) if mixed_lengths else D.eval_batches(entries, batch)
    for sel, b in batches:
        src, lengths = torch.from_numpy(b.src), torch.from_numpy(b.lengths)
        ids = greedy_decode(model, src, lengths) if beam == 1 else beam_decode(model, src, lengths, beam)
        for i, row in zip(sel, ids):
            hyps[i] = D.PHONEME_VOCAB.decode(row)
    return hyps


def score(entries: Sequence[D.Entry], hyps) -> tuple[ErrorRates, ErrorRates]:
    """(first-pronunciation figures, closest-variant figures)."""
    return error_rates([e.pron for e in entries], hyps), error_rates_multi([e.prons for e in entries], hyps)


def evaluate(model, entries: Sequence[D.Entry], beam: int = 1) -> ErrorRates:
    """First-pronunciation PER/WER (the model-selection and headline figure)."""
    return score(entries, decode_entries(model, entries, beam))[0]


def pronounce(model, word: str, beam: int = 1) -> list[str]:
    src = torch.tensor([D.encode_word(word)])
    lengths = torch.tensor([src.shape[1]])
    ids = greedy_decode(model, src, lengths) if beam == 1 else beam_decode(model, src, lengths, beam)
    return D.PHONEME_VOCAB.decode(ids[0])


def word_latency_ms(model, entries: Sequence[D.Entry], beam: int, n: int = 200) -> float:
    """Median ms to pronounce one word alone (batch 1), over ``n`` evenly spaced words."""
    step = max(1, len(entries) // n)
    times = []
    for e in entries[::step][:n]:
        t0 = time.perf_counter()
        pronounce(model, e.word, beam)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the trained FP model is shipped (examples/g2p/model/fp.pt: the quantizer starts from it and the
    # PER/WER comparison needs it); a new train_fp run writes runs/fp.pt
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).resolve().parent / "model" / "fp.pt")
    p.add_argument("--split", choices=D.SPLITS, default="test")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--word", action="append", help="print the pronunciation of this word (repeatable) and exit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--mixed-batches", type=int, default=0, metavar="B",
                   help="also report greedy figures in padded batches of B consecutive (mixed-length) words")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, ckpt = load_checkpoint(args.checkpoint)
    if args.word:
        for w in args.word:
            print(f"{w}: {' '.join(pronounce(model, w, args.beam))}")
        return
    entries = D.load_split(args.split)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {ckpt['model_config']} ({n_params:,} params), step {ckpt['step']}; {args.split}: {len(entries):,} words")
    out = {}
    for beam in sorted({1, args.beam}):
        t0 = time.time()
        hyps = decode_entries(model, entries, beam)
        dt = time.time() - t0
        single, multi = score(entries, hyps)
        lat = word_latency_ms(model, entries, beam)
        name = "greedy" if beam == 1 else f"beam {beam}"
        print(f"{name:7s}: PER {100 * single.per:.2f} %  WER {100 * single.wer:.2f} %   "
              f"closest variant: PER {100 * multi.per:.2f} %  WER {100 * multi.wer:.2f} %   "
              f"[{dt:.1f} s for the split; {lat:.2f} ms per word alone, median]")
        out["greedy" if beam == 1 else f"beam{beam}"] = {"first": single.as_dict(), "closest": multi.as_dict(),
                                                         "ms_per_word_batch1": lat}
    if args.mixed_batches:
        hyps = decode_entries(model, entries, 1, args.mixed_batches, mixed_lengths=True)
        single, multi = score(entries, hyps)
        alone = decode_entries(model, entries, 1)
        changed = sum(a != h for a, h in zip(alone, hyps))
        print(f"greedy, padded mixed-length batches of {args.mixed_batches}: PER {100 * single.per:.2f} %  "
              f"WER {100 * single.wer:.2f} %  ({changed} of {len(entries)} words decoded differently than alone)")
        out["greedy_mixed_batches"] = {"batch": args.mixed_batches, "first": single.as_dict(),
                                       "closest": multi.as_dict(), "words_changed": changed}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
