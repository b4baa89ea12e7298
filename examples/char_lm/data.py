"""Corpus, deterministic splits, character vocabulary and batching for the char LM.

Corpus
------
The reStructuredText sources of the CPython 3.11 documentation as shipped by the
Debian package ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources``,
497 ``*.rst.txt`` files, ~11 M characters of English prose, code samples and reST
markup). :func:`ensure_corpus` installs the package with ``apt-get`` when it is
missing (needs root; otherwise it raises with the command to run).

Splits (deterministic, no randomness involved)
----------------------------------------------
1. List every regular file under the corpus directory whose name ends in
   ``.txt``, as a POSIX path relative to that directory, sorted by that path.
2. Assign each *file* to a split by ``zlib.crc32(relpath.encode("utf-8")) % 100``:
   ``[0, 90)`` -> train, ``[90, 95)`` -> valid, ``[95, 100)`` -> test.
   Whole files go to one split, so no document leaks across splits.
3. Read each file as UTF-8, append ``"\\n"`` if it does not end with one, and
   concatenate the files of a split in sorted path order.

With python3.11-doc 3.11.2-6+deb12u9 this gives 446 / 28 / 23 files and
10,289,666 / 367,969 / 389,866 characters (train / valid / test).

Vocabulary
----------
Every character occurring at least ``MIN_COUNT = 25`` times in the *train* split,
sorted by code point, gets ids ``1..V-1``; id ``0`` is ``<unk>`` and stands for
every other character (in any split). With the corpus above V = 100
(99 characters + ``<unk>``); 354 train characters (0.003 %) map to ``<unk>``.
Ids are ``int64``. :func:`decode` renders ``<unk>`` as U+FFFD.

Cache
-----
:func:`load_splits` caches the three id arrays as ``train.npy``, ``valid.npy``,
``test.npy`` plus ``vocab.json``, ``splits.json`` (file lists) and ``meta.json``
under ``examples/char_lm/data/`` (git-ignored). The cache is rebuilt when the
corpus file list/sizes or the split/vocab parameters change.

Run ``python -m examples.char_lm.data`` to build the cache and print statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

CORPUS_PACKAGE = "python3.11-doc"
CORPUS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
DATA_DIR = Path(__file__).resolve().parent / "data"

SPLITS = ("train", "valid", "test")
#: crc32(relpath) % 100 below TRAIN_PCT -> train, below TRAIN_PCT + VALID_PCT -> valid, else test
TRAIN_PCT = 90
VALID_PCT = 5
#: a character must occur this many times in the train split to get its own id
MIN_COUNT = 25
UNK_ID = 0
UNK_TOKEN = "<unk>"
UNK_CHAR = "\ufffd"  # what decode() prints for <unk>
FORMAT_VERSION = 1


class CorpusNotFoundError(RuntimeError):
    """The corpus is not installed and could not be installed automatically."""


# --------------------------------------------------------------------------- corpus


def _corpus_present(corpus_dir: Path) -> bool:
    return corpus_dir.is_dir() and any(corpus_dir.rglob("*.txt"))


def ensure_corpus(corpus_dir: Path | str = CORPUS_DIR, install: bool = True) -> Path:
    """Make sure the corpus exists, installing ``python3.11-doc`` with apt-get if needed.

    Returns the corpus directory. Raises :class:`CorpusNotFoundError` with a clear
    message when the corpus is missing and cannot be installed (not root, no
    apt-get, ``install=False``, or the install failed).
    """
    corpus_dir = Path(corpus_dir)
    if _corpus_present(corpus_dir):
        return corpus_dir
    how = f"install it with:  sudo apt-get update && sudo apt-get install -y {CORPUS_PACKAGE}"
    if corpus_dir != CORPUS_DIR:
        raise CorpusNotFoundError(f"char-LM corpus directory {corpus_dir} is missing or empty")
    if not install:
        raise CorpusNotFoundError(f"char-LM corpus {corpus_dir} not found; {how}")
    if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise CorpusNotFoundError(
            f"char-LM corpus {corpus_dir} not found and cannot be installed automatically "
            f"(needs root and apt-get); {how}"
        )
    print(
        f"[char_lm] corpus {corpus_dir} not found: installing Debian package "
        f"{CORPUS_PACKAGE} with apt-get (one time, ~10 MB) ...",
        file=sys.stderr,
        flush=True,
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # wait for a dpkg lock held by another apt-get instead of failing at once
    lock = ["-o", "DPkg::Lock::Timeout=900"]
    install_cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *lock, CORPUS_PACKAGE]
    res = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:  # package lists may be missing/stale: update and retry once
        subprocess.run(["apt-get", "update", "-q", *lock], env=env, capture_output=True, text=True)
        res = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0 or not _corpus_present(corpus_dir):
        raise CorpusNotFoundError(
            f"installing {CORPUS_PACKAGE} failed (exit {res.returncode}); {how}\n"
            f"apt-get output (tail):\n{(res.stdout + res.stderr)[-2000:]}"
        )
    print(f"[char_lm] installed {CORPUS_PACKAGE}", file=sys.stderr, flush=True)
    return corpus_dir


def list_corpus_files(corpus_dir: Path | str = CORPUS_DIR) -> list[str]:
    """Sorted POSIX paths (relative to ``corpus_dir``) of all ``*.txt`` files."""
    corpus_dir = Path(corpus_dir)
    files = [p.relative_to(corpus_dir).as_posix() for p in corpus_dir.rglob("*.txt") if p.is_file()]
    return sorted(files)


def split_of(relpath: str) -> str:
    """The split ('train'/'valid'/'test') of a corpus file, from crc32 of its relative path."""
    h = zlib.crc32(relpath.encode("utf-8")) % 100
    if h < TRAIN_PCT:
        return "train"
    if h < TRAIN_PCT + VALID_PCT:
        return "valid"
    return "test"


def split_files(files: Sequence[str]) -> dict[str, list[str]]:
    """Group (already sorted) relative paths by split, keeping their order."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for f in files:
        out[split_of(f)].append(f)
    return out


def _read_doc(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text if text.endswith("\n") else text + "\n"


def read_split_texts(corpus_dir: Path | str = CORPUS_DIR) -> dict[str, str]:
    """The three splits as strings (files concatenated in sorted path order)."""
    corpus_dir = ensure_corpus(corpus_dir)
    groups = split_files(list_corpus_files(corpus_dir))
    return {s: "".join(_read_doc(corpus_dir / f) for f in groups[s]) for s in SPLITS}


# --------------------------------------------------------------------------- vocabulary


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@dataclass(frozen=True)
class Vocab:
    """Character vocabulary: ``chars[i]`` has id ``i + 1``; id 0 is ``<unk>``."""

    chars: tuple[str, ...]
    min_count: int = MIN_COUNT

    def __post_init__(self):
        if list(self.chars) != sorted(set(self.chars)) or any(len(c) != 1 for c in self.chars):
            raise ValueError("Vocab.chars must be distinct single characters sorted by code point")
        object.__setattr__(self, "_cps", np.array([ord(c) for c in self.chars], dtype=np.uint32))
        object.__setattr__(self, "_itos", (UNK_CHAR,) + tuple(self.chars))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    def __len__(self) -> int:
        return self.size

    @property
    def itos(self) -> list[str]:
        """Token strings by id (``'<unk>'`` for id 0)."""
        return [UNK_TOKEN, *self.chars]

    @property
    def stoi(self) -> dict[str, int]:
        return {c: i + 1 for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        """``int64`` ids of ``text``; characters outside the vocabulary map to 0 (<unk>)."""
        cps = _codepoints(text)
        if cps.size == 0 or self._cps.size == 0:
            return np.zeros(cps.size, dtype=np.int64)
        pos = np.searchsorted(self._cps, cps)
        pos_c = np.minimum(pos, self._cps.size - 1)
        hit = self._cps[pos_c] == cps
        return np.where(hit, pos_c + 1, UNK_ID).astype(np.int64)

    def decode(self, ids) -> str:
        """Text of ``ids`` (any int sequence/array); <unk> becomes U+FFFD."""
        itos = self._itos
        return "".join(itos[int(i)] for i in np.asarray(ids).reshape(-1))

    # -- (de)serialisation
    def to_json(self) -> dict:
        return {
            "format": "tvm_intlstm.char_lm.vocab/1",
            "size": self.size,
            "unk_id": UNK_ID,
            "unk_token": UNK_TOKEN,
            "min_count": self.min_count,
            "itos": self.itos,
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Vocab":
        itos = obj["itos"]
        if itos[0] != UNK_TOKEN:
            raise ValueError("vocab JSON: id 0 must be <unk>")
        return cls(tuple(itos[1:]), int(obj.get("min_count", MIN_COUNT)))

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path | str) -> "Vocab":
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def build_vocab(train_text: str, min_count: int = MIN_COUNT) -> Vocab:
    """Characters occurring at least ``min_count`` times in ``train_text``."""
    cps, counts = np.unique(_codepoints(train_text), return_counts=True)
    return Vocab(tuple(chr(int(c)) for c in cps[counts >= min_count]), min_count)


# --------------------------------------------------------------------------- cached splits


def _fingerprint(corpus_dir: Path, files: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(f"v{FORMAT_VERSION} {TRAIN_PCT} {VALID_PCT} {MIN_COUNT}\n".encode())
    for f in files:
        h.update(f"{f}\t{(corpus_dir / f).stat().st_size}\n".encode())
    return h.hexdigest()


def _cache_ok(data_dir: Path, fingerprint: str | None) -> bool:
    meta_p = data_dir / "meta.json"
    needed = [data_dir / f"{s}.npy" for s in SPLITS] + [data_dir / "vocab.json", meta_p]
    if not all(p.is_file() for p in needed):
        return False
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format_version") != FORMAT_VERSION:
        return False
    return fingerprint is None or meta.get("fingerprint") == fingerprint


def build_cache(data_dir: Path | str = DATA_DIR, corpus_dir: Path | str = CORPUS_DIR) -> None:
    """(Re)build the ``.npy`` / JSON cache from the corpus."""
    data_dir, corpus_dir = Path(data_dir), ensure_corpus(corpus_dir)
    files = list_corpus_files(corpus_dir)
    groups = split_files(files)
    texts = {s: "".join(_read_doc(corpus_dir / f) for f in groups[s]) for s in SPLITS}
    vocab = build_vocab(texts["train"], MIN_COUNT)
    data_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for s in SPLITS:
        ids = vocab.encode(texts[s])
        tmp = data_dir / f".{s}.tmp.npy"
        np.save(tmp, ids)
        os.replace(tmp, data_dir / f"{s}.npy")
        stats[s] = {"files": len(groups[s]), "chars": int(ids.size), "unk": int((ids == UNK_ID).sum())}
    vocab.save(data_dir / "vocab.json")
    (data_dir / "splits.json").write_text(json.dumps(groups, indent=1) + "\n")
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": _fingerprint(corpus_dir, files),
        "corpus_dir": str(corpus_dir),
        "corpus_package": CORPUS_PACKAGE,
        "split_rule": f"crc32(relpath)%100: <{TRAIN_PCT} train, <{TRAIN_PCT + VALID_PCT} valid, else test",
        "min_count": MIN_COUNT,
        "vocab_size": vocab.size,
        "splits": stats,
    }
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _prepare(data_dir: Path | str, corpus_dir: Path | str, rebuild: bool) -> Path:
    data_dir, corpus_dir = Path(data_dir), Path(corpus_dir)
    fp = None
    if _corpus_present(corpus_dir):
        fp = _fingerprint(corpus_dir, list_corpus_files(corpus_dir))
    # without the corpus, an existing cache is used as is
    if rebuild or not _cache_ok(data_dir, fp):
        build_cache(data_dir, corpus_dir)
    return data_dir


def load_splits(
    data_dir: Path | str = DATA_DIR, corpus_dir: Path | str = CORPUS_DIR, rebuild: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, valid, test)`` int64 id arrays (built and cached on first use)."""
    data_dir = _prepare(data_dir, corpus_dir, rebuild)
    return tuple(np.load(data_dir / f"{s}.npy") for s in SPLITS)  # type: ignore[return-value]


def load_vocab(path: Path | str | None = None) -> Vocab:
    """The vocabulary at ``path`` (a vocab JSON), or the default one of the cached corpus."""
    if path is None:
        path = _prepare(DATA_DIR, CORPUS_DIR, False) / "vocab.json"
    return Vocab.load(path)


def corpus_meta(data_dir: Path | str = DATA_DIR) -> dict:
    """The cache's ``meta.json`` (split sizes, vocab size, split rule, ...)."""
    return json.loads((_prepare(data_dir, CORPUS_DIR, False) / "meta.json").read_text())


_default_vocab: Vocab | None = None


def _vocab_or_default(vocab: Vocab | None) -> Vocab:
    global _default_vocab
    if vocab is not None:
        return vocab
    if _default_vocab is None:
        _default_vocab = load_vocab()
    return _default_vocab


def encode(text: str, vocab: Vocab | None = None) -> np.ndarray:
    """``int64`` ids of ``text`` (default vocabulary: the cached corpus's)."""
    return _vocab_or_default(vocab).encode(text)


def decode(ids, vocab: Vocab | None = None) -> str:
    """Text of ``ids`` (default vocabulary: the cached corpus's); <unk> -> U+FFFD."""
    return _vocab_or_default(vocab).decode(ids)


# --------------------------------------------------------------------------- batching


def num_tbptt_batches(n_ids: int, batch_size: int, seq_len: int, offset: int = 0) -> int:
    stream_len = (n_ids - offset - 1) // batch_size
    return max(stream_len, 0) // seq_len


def tbptt_batches(
    ids: np.ndarray, batch_size: int, seq_len: int, offset: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Truncated-BPTT batches over one pass of ``ids``.

    ``ids[offset:]`` is cut into ``batch_size`` contiguous streams of equal length
    ``L = (len(ids) - offset - 1) // batch_size``; the pass yields ``L // seq_len``
    pairs ``(x, y)`` of contiguous ``int64`` arrays of shape ``[batch_size, seq_len]``
    (batch_first), with ``y`` = ``x`` shifted by one character. Row ``b`` of batch
    ``k + 1`` continues row ``b`` of batch ``k``, so a recurrent state can be carried
    across batches. The tail that does not fill a whole chunk is dropped; vary
    ``offset`` (e.g. per epoch) to change the cut points.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError("ids must be 1-D")
    n = num_tbptt_batches(ids.size, batch_size, seq_len, offset)
    L = (ids.size - offset - 1) // batch_size
    if n == 0:
        return
    xs = ids[offset : offset + batch_size * L].reshape(batch_size, L)
    ys = ids[offset + 1 : offset + 1 + batch_size * L].reshape(batch_size, L)
    for k in range(n):
        t = k * seq_len
        yield np.ascontiguousarray(xs[:, t : t + seq_len]), np.ascontiguousarray(ys[:, t : t + seq_len])


def random_windows(
    ids: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless ``(x, y)`` batches of ``[batch_size, seq_len]`` windows at uniform random starts
    (for training from a fresh zero state per window, like the :func:`~examples.char_lm.model.bpc`
    protocol)."""
    ids = np.asarray(ids, dtype=np.int64)
    hi = ids.size - seq_len - 1
    if hi < 1:
        raise ValueError("ids too short for seq_len")
    ar = np.arange(seq_len)
    while True:
        starts = rng.integers(0, hi + 1, size=batch_size)
        idx = starts[:, None] + ar[None, :]
        yield ids[idx], ids[idx + 1]


def main() -> None:
    train, valid, test = load_splits()
    meta = corpus_meta()
    vocab = load_vocab()
    print(f"corpus: {meta['corpus_dir']} ({meta['corpus_package']}); split: {meta['split_rule']}")
    for s, a in zip(SPLITS, (train, valid, test)):
        st = meta["splits"][s]
        print(f"  {s:5s}: {st['files']:4d} files {a.size:>11,d} chars  ({st['unk']} <unk>)")
    print(f"vocab: {vocab.size} ids (min_count={vocab.min_count}, id 0 = <unk>)")
    print("chars:", repr("".join(vocab.chars)))


if __name__ == "__main__":
    main()
