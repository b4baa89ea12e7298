"""QAT of an encoder-decoder pair (prepare_qat_seq2seq / convert_seq2seq, docs/seq2seq.md): a small
random BiLSTM encoder + attention LSTM decoder step on a toy copy task; the QAT pair trains (the
loss falls in a few dozen steps), converts into the QuantizedSeq2Seq quantize_seq2seq returns, whose
compiled library equals its numpy reference bit for bit (greedy, encode, decode_step); the QAT pair
in eval mode runs that integer pair, and its fake-quantized forward stays close to it; clear
errors. One compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvm_intlstm as til
from tvm_intlstm import seq2seq as s2s
from tvm_intlstm.nn import LuongAttention

PAD, BOS, EOS = 0, 1, 2
V, E, HE, HD = 9, 8, 12, 16          # tokens 3..8 are the symbols to copy
STEPS = 80


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, HE, batch_first=True, bidirectional=True)

    def forward(self, src, lengths):
        y, _ = self.lstm(self.emb(src))
        return y


class DecoderStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, HD, batch_first=True)
        self.attn = LuongAttention(HD, 2 * HE, "general")
        self.out = nn.Linear(HD + 2 * HE, V)

    def forward(self, prev, h0, c0, enc, lengths):
        y, (h, c) = self.lstm(self.emb(prev), (h0, c0))
        ctx, _ = self.attn(y, enc, lengths)
        return self.out(torch.cat([y, ctx], -1)), h, c


def copy_batch(rng, B=16, S=5):
    """Sources of one length S (S-1 symbols + EOS); dec_in = BOS + symbols, target = symbols + EOS."""
    sym = rng.integers(3, V, (B, S - 1))
    src = np.concatenate([sym, np.full((B, 1), EOS)], 1)
    dec_in = np.concatenate([np.full((B, 1), BOS), sym], 1)
    tgt = np.concatenate([sym, np.full((B, 1), EOS)], 1)
    lengths = np.full(B, S)
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in (src, lengths, dec_in, tgt))


def _calib(seed=1, n=4):
    rng = np.random.default_rng(seed)
    return [copy_batch(rng, S=int(rng.integers(3, 8)))[:3] for _ in range(n)]


def _loss(logits, tgt):
    return F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    qat = til.prepare_qat_seq2seq(Encoder(), DecoderStep(), _calib())
    assert isinstance(qat, s2s.QATSeq2Seq) and qat.training
    opt = torch.optim.Adam(qat.parameters(), lr=2e-2)
    rng = np.random.default_rng(2)
    losses = []
    for step in range(STEPS):
        src, lengths, dec_in, tgt = copy_batch(rng, B=32, S=int(rng.integers(3, 8)))
        loss = _loss(qat(src, lengths, dec_in), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    q = s2s.convert_seq2seq(qat)
    return qat, q, losses


@pytest.fixture(scope="module")
def lib(trained):
    return s2s.compile_seq2seq(trained[1], "host", verbose=False)


def test_qat_pair_trains(trained):
    qat, q, losses = trained
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print("losses", [round(x, 3) for x in losses[::5]])
    assert last < 0.6 * first, (first, last)
    # every parameter of both models is trained (the decoder's through its fake-quantized enc input)
    assert all(p.grad is not None for p in qat.parameters())


def test_convert_gives_the_ptq_kind_of_pair(trained):
    qat, q, _ = trained
    assert isinstance(q, s2s.QuantizedSeq2Seq)
    assert q.enc_scale == qat.enc_scale
    assert list(q.decoder.input_kinds) == s2s.DECODER_KINDS
    assert q.decoder.input_scales[3] == q.enc_scale
    # til.convert and qat.convert give the same (cached) pair; quantize_seq2seq's twin
    assert til.convert(qat) is q and qat.convert() is q and s2s.convert_seq2seq(q) is q
    ptq = s2s.quantize_seq2seq(Encoder(), DecoderStep(), _calib())
    assert type(ptq) is type(q) and ptq.decoder.input_kinds == q.decoder.input_kinds


def test_compiled_equals_reference(trained, lib):
    _, q, _ = trained
    ref = q.reference()
    rng = np.random.default_rng(5)
    src, lengths, dec_in, _ = (t.numpy() for t in copy_batch(rng, B=6, S=6))
    lengths = np.array([6, 5, 4, 6, 2, 1])        # padded sources too
    got = s2s.greedy_decode(lib, src, lengths, BOS, EOS, 10)
    assert got == s2s.greedy_decode(ref, src, lengths, BOS, EOS, 10) == s2s.greedy_decode(q, src, lengths, BOS, EOS, 10)
    enc = lib.encode(src, lengths)
    np.testing.assert_array_equal(enc, ref.encode(src, lengths))
    for a, b in zip(lib.decode_step(dec_in, *lib.zero_state(6), enc, lengths),
                    ref.decode_step(dec_in, *ref.zero_state(6), enc, lengths)):
        np.testing.assert_array_equal(a, b)
    assert s2s.beam_search(lib, src, lengths, BOS, EOS, 10, beam=3) == s2s.beam_search(ref, src, lengths, BOS, EOS,
                                                                                       10, beam=3)


def test_trained_pair_copies(trained, lib):
    """The integer pair learned the task (greedy through the compiled library)."""
    rng = np.random.default_rng(7)
    src, lengths, _, tgt = (t.numpy() for t in copy_batch(rng, B=32, S=4))
    got = s2s.greedy_decode(lib, src, lengths, BOS, EOS, 8)
    word_acc = np.mean([g == list(t[:3]) for g, t in zip(got, tgt)])
    assert word_acc > 0.25, word_acc      # chance: 6^-3 < 0.005


def test_eval_mode_is_the_integer_pair_and_fake_quant_is_close(trained):
    qat, q, _ = trained
    rng = np.random.default_rng(9)
    src, lengths, dec_in, _ = copy_batch(rng, B=32, S=6)
    qat.eval()
    try:
        with torch.no_grad():
            got = qat(src, lengths, dec_in)
            fake = qat.fake_forward(src, lengths, dec_in)
    finally:
        qat.train()
    enc = q.encode(src, lengths)
    logits, _, _ = q.decode_step(dec_in, *q.zero_state(32), enc, lengths)
    want = logits.float() * q.logits_scale
    assert torch.equal(got, want)          # eval mode runs the converted integer pair exactly
    # the fake-quantized encoder output is the integer encoder's on its grid
    with torch.no_grad():
        fenc = qat.encode(src, lengths)
    enc_diff = (fenc / qat.enc_scale - enc.float()).abs()
    enc_err, enc_frac = enc_diff.max().item(), (enc_diff > 0.5).float().mean().item()
    assert enc_err <= 1.0 and enc_frac < 0.02, (enc_err, enc_frac)   # measured: 1 step on ~0.3 % of the values
    # and the fake-quantized logits are close to the integer ones
    rel = ((fake - want).abs().max() / want.abs().max()).item()
    assert rel < 0.02, rel                   # measured 1.4e-3
    agree = (fake.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"fake-quant vs integer: enc max |diff| {enc_err} int8 steps on {enc_frac:.2%} of the values, logits max rel diff {rel:.2e}, "
          f"argmax agreement {agree:.4f}")
    assert agree > 0.97, agree


def test_parameters_change_reconverts(trained):
    qat, q, _ = trained
    qat2 = til.prepare_qat_seq2seq(Encoder(), DecoderStep(), _calib())
    a = qat2.convert()
    assert qat2.convert() is a
    with torch.no_grad():
        next(qat2.parameters()).add_(0.5)
    assert qat2.convert() is not a


def test_errors(trained, tmp_path):
    qat, q, _ = trained
    calib = _calib(n=1)
    with pytest.raises(TypeError, match="already quantized"):
        til.prepare_qat_seq2seq(q.encoder, DecoderStep(), calib)
    with pytest.raises(TypeError, match="already quantized"):
        til.prepare_qat_seq2seq(Encoder(), til.prepare_qat(DecoderStep()), calib)
    with pytest.raises(TypeError, match="already prepared"):
        til.prepare_qat_seq2seq(qat.encoder, DecoderStep(), calib)
    with pytest.raises(TypeError, match="whole encoder-decoder pair"):
        til.prepare_qat_seq2seq(qat, DecoderStep(), calib)
    with pytest.raises(TypeError, match="whole encoder-decoder pair"):
        til.quantize_seq2seq(q, DecoderStep(), calib)
    with pytest.raises(ValueError, match="needs calib_data"):
        til.prepare_qat_seq2seq(Encoder(), DecoderStep(), None)
    with pytest.raises(ValueError, match="empty"):
        til.prepare_qat_seq2seq(Encoder(), DecoderStep(), [])
    with pytest.raises(s2s.Seq2SeqError, match="decoder step takes 3 inputs"):
        class NoState(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = DecoderStep()

            def forward(self, prev, enc, lengths):
                z = torch.zeros(1, prev.shape[0], HD)
                return self.inner(prev, z, z, enc, lengths)
        til.prepare_qat_seq2seq(Encoder(), NoState(), calib)
    with pytest.raises(TypeError, match="convert_seq2seq takes a QATSeq2Seq"):
        s2s.convert_seq2seq(Encoder())
    with pytest.raises(TypeError, match="convert takes a QATModel"):
        til.convert(Encoder())
    with pytest.raises(TypeError, match="convert it first"):
        s2s.compile_seq2seq(qat, "host")
    with pytest.raises(TypeError, match="convert the QAT pair first"):
        s2s.greedy_decode(qat, np.zeros((1, 2), np.int64), np.array([2]), BOS, EOS, 3)
    with pytest.raises(TypeError, match="convert it first"):
        til.save_quantized(qat, tmp_path / "x.qpt")
    src, lengths, dec_in, _ = copy_batch(np.random.default_rng(0), B=2, S=3)
    with pytest.raises(s2s.Seq2SeqError, match="dec_in"):
        qat(src, lengths, dec_in[:1])
    with pytest.raises(s2s.Seq2SeqError, match=r"in \[1, S\]"):
        qat(src, torch.tensor([0, 3]), dec_in)


def test_save_and_load_converted(trained, tmp_path):
    _, q, _ = trained
    til.save_quantized(q, tmp_path / "pair.qpt")
    q2 = til.load_quantized(tmp_path / "pair.qpt")
    src, lengths, _, _ = (t.numpy() for t in copy_batch(np.random.default_rng(3), B=4, S=5))
    assert s2s.greedy_decode(q2.reference(), src, lengths, BOS, EOS, 8) == s2s.greedy_decode(
        q.reference(), src, lengths, BOS, EOS, 8)
