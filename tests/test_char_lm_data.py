"""Fast tests of the char-LM data pipeline and BPC protocol (examples/char_lm).

Needs the corpus (Debian package python3.11-doc); when it is missing and we are
root with apt-get (as on CI, where .ci/run installs it first) ``ensure_corpus()`` installs it;
otherwise the tests fail with the install command (they never skip).
"""

import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # examples/ is not an installed package
    sys.path.insert(0, str(REPO))

from examples.char_lm import data as D  # noqa: E402
from examples.char_lm.model import CharLM, bpc  # noqa: E402


@pytest.fixture(scope="module")
def corpus_dir():
    try:
        return D.ensure_corpus()
    except D.CorpusNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def splits(corpus_dir, tmp_path_factory):
    # build into a private cache dir so the test never depends on / clobbers a stale cache
    d = tmp_path_factory.mktemp("char_lm_cache")
    return d, D.load_splits(data_dir=d, corpus_dir=corpus_dir)


@pytest.fixture(scope="module")
def texts(corpus_dir):
    return D.read_split_texts(corpus_dir)


# ----------------------------------------------------------------------- splits


def test_split_rule_is_crc32_of_relpath():
    for p in ["library/os.rst.txt", "tutorial/index.rst.txt", "whatsnew/3.3.rst.txt"]:
        h = zlib.crc32(p.encode()) % 100
        assert D.split_of(p) == ("train" if h < 90 else "valid" if h < 95 else "test")
    # documented examples
    assert D.split_of("whatsnew/3.3.rst.txt") == "valid"
    assert D.split_of("library/re.rst.txt") == "test"


def test_split_files_deterministic_and_disjoint(corpus_dir):
    files = D.list_corpus_files(corpus_dir)
    assert files == sorted(files) and len(files) == len(set(files)) > 100
    g1, g2 = D.split_files(files), D.split_files(list(files))
    assert g1 == g2
    sets = [set(g1[s]) for s in D.SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(files)
    n = len(files)
    assert 0.8 * n < len(g1["train"]) < 0.97 * n
    assert len(g1["valid"]) > 5 and len(g1["test"]) > 5


def test_load_splits_cached_and_deterministic(splits, corpus_dir, texts):
    d, (train, valid, test) = splits
    for a in (train, valid, test):
        assert a.dtype == np.int64 and a.ndim == 1
    assert train.size > 5_000_000 and valid.size > 100_000 and test.size > 100_000
    assert train.size > 10 * (valid.size + test.size)
    vocab = D.Vocab.load(d / "vocab.json")
    assert train.min() >= 0 and max(train.max(), valid.max(), test.max()) < vocab.size
    # second call hits the cache and returns identical arrays
    again = D.load_splits(data_dir=d, corpus_dir=corpus_dir)
    for a, b in zip((train, valid, test), again):
        np.testing.assert_array_equal(a, b)
    # the arrays are exactly the encoding of the documented concatenation
    np.testing.assert_array_equal(vocab.encode(texts["valid"]), valid)
    assert len(texts["train"]) == train.size


def test_vocab_from_train_min_count(splits, texts):
    d, _ = splits
    vocab = D.Vocab.load(d / "vocab.json")
    assert vocab.itos[0] == "<unk>" and vocab.min_count == D.MIN_COUNT
    assert 60 < vocab.size < 200
    cps, counts = np.unique(np.frombuffer(texts["train"].encode("utf-32-le"), "<u4"), return_counts=True)
    assert set(vocab.chars) == {chr(c) for c, k in zip(cps, counts) if k >= D.MIN_COUNT}
    assert vocab.chars == tuple(sorted(vocab.chars))
    for c in "\n aZ09()_.:`":
        assert c in vocab.stoi


# ----------------------------------------------------------------------- encode / decode


def test_encode_decode_round_trip():
    vocab = D.Vocab(tuple(sorted(set("hello world\n.é"))), 1)
    text = "hello world.\nhé"
    ids = vocab.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert (ids > 0).all()
    assert vocab.decode(ids) == text
    assert vocab.decode(torch.from_numpy(ids)) == text
    # unknown characters -> 0 -> U+FFFD
    ids2 = vocab.encode("hx☃")
    assert list(ids2[1:]) == [0, 0] and vocab.decode(ids2) == "h\ufffd\ufffd"
    assert vocab.encode("").shape == (0,)
    # JSON round trip
    assert D.Vocab.from_json(vocab.to_json()) == vocab


def test_encode_decode_corpus_round_trip(splits):
    d, (_, valid, _) = splits
    vocab = D.Vocab.load(d / "vocab.json")
    chunk = valid[:20000]
    text = vocab.decode(chunk)
    np.testing.assert_array_equal(vocab.encode(text), chunk)
    sample = "Return the number of items in a container.\n    >>> len([1, 2])\n"
    assert D.decode(D.encode(sample, vocab), vocab) == sample


# ----------------------------------------------------------------------- batching


def test_tbptt_batches_shapes_and_continuity():
    ids = np.arange(10_000, dtype=np.int64)
    B, T = 4, 16
    batches = list(D.tbptt_batches(ids, B, T, offset=3))
    L = (ids.size - 3 - 1) // B
    assert len(batches) == L // T == D.num_tbptt_batches(ids.size, B, T, 3)
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == np.int64
        np.testing.assert_array_equal(y, x + 1)  # next-character targets
    # row b of batch k+1 continues row b of batch k
    for (x0, _), (x1, _) in zip(batches, batches[1:]):
        np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)
    assert batches[0][0][0, 0] == 3
    assert list(D.tbptt_batches(ids[:10], B, T)) == []


def test_random_windows_shapes():
    ids = np.arange(1000, dtype=np.int64)
    it = D.random_windows(ids, 8, 32, np.random.default_rng(0))
    for _ in range(5):
        x, y = next(it)
        assert x.shape == y.shape == (8, 32) and x.dtype == np.int64
        np.testing.assert_array_equal(y, x + 1)
        assert y.max() < ids.size


# ----------------------------------------------------------------------- model / bpc


def test_bpc_uniform_model_is_log2_v():
    V = 100
    ids = np.random.default_rng(0).integers(0, V, 5_000)
    seen = []

    def uniform(x):
        seen.append(x.shape)
        return np.zeros((*x.shape, V), dtype=np.float32)

    assert bpc(uniform, ids, seq_len=64, batch=8) == pytest.approx(math.log2(V), abs=1e-9)
    assert set(seen) == {(8, 64)}  # always full fixed-shape batches (last one padded)

    # a module with zero head also predicts uniformly
    m = CharLM(V, embed_dim=8, hidden=16)
    torch.nn.init.zeros_(m.head.weight)
    torch.nn.init.zeros_(m.head.bias)
    assert bpc(m, ids, seq_len=32, batch=5) == pytest.approx(math.log2(V), abs=1e-6)
    assert bpc(m, ids, seq_len=32, batch=5, max_windows=7) == pytest.approx(math.log2(V), abs=1e-6)


def test_bpc_counts_each_target_once():
    # an oracle that puts all mass on the true next id gives ~0 BPC, which checks that
    # windows are aligned as documented (x = ids[kT:kT+T], y = ids[kT+1:kT+T+1])
    V, T = 7, 10
    ids = np.random.default_rng(1).integers(0, V, 203)
    pos = {}

    def oracle(x):
        out = np.full((*x.shape, V), -1e4)
        for b in range(x.shape[0]):
            start = pos[tuple(x[b])]
            out[b, np.arange(T), ids[start + 1 : start + T + 1]] = 0.0
        return out

    for k in range((ids.size - 1) // T):
        pos.setdefault(tuple(ids[k * T : k * T + T]), k * T)
    assert bpc(oracle, ids, seq_len=T, batch=3) < 1e-6


def test_charlm_shapes_and_fx_trace():
    m = CharLM(50, embed_dim=8, hidden=16)
    x = torch.randint(0, 50, (3, 11))
    assert m(x).shape == (3, 11, 50)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(x), m(x))
