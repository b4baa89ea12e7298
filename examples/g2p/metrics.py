"""Phoneme error rate (PER) and word error rate (WER).

* PER = sum over words of the Levenshtein distance (substitutions, insertions, deletions, each 1)
  between the predicted and the reference phoneme sequences, divided by the summed reference
  lengths.
* WER = fraction of words whose predicted sequence is not exactly the reference.

Single reference (the headline figures): the word's first pronunciation, the training target.
Multi-reference (``refs`` with several variants): each word is scored against its closest variant
(smallest distance; ties go to the shorter variant, the smaller PER denominator is not favoured
otherwise), and a word is correct if it equals any variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass
class ErrorRates:
    per: float          # phoneme error rate, fraction (0.071 = 7.1 %)
    wer: float          # word error rate, fraction
    words: int
    phonemes: int       # summed reference length
    edits: int          # summed edit distance
    wrong_words: int

    def as_dict(self) -> dict:
        return dict(per=self.per, wer=self.wer, words=self.words, phonemes=self.phonemes,
                    edits=self.edits, wrong_words=self.wrong_words)


def error_rates(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> ErrorRates:
    """PER/WER of ``hyps`` against one reference per word."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(edit_distance(list(r), list(h)) for r, h in zip(refs, hyps))
    wrong = sum(list(r) != list(h) for r, h in zip(refs, hyps))
    n_ph = sum(len(r) for r in refs)
    return ErrorRates(edits / max(n_ph, 1), wrong / max(len(refs), 1), len(refs), n_ph, edits, wrong)


def error_rates_multi(ref_sets: Sequence[Sequence[Sequence]], hyps: Sequence[Sequence]) -> ErrorRates:
    """PER/WER with each word scored against its closest reference variant."""
    closest = [min(refs, key=lambda r: (edit_distance(list(r), list(h)), len(r))) for refs, h in zip(ref_sets, hyps)]
    return error_rates(closest, hyps)
