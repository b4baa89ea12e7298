"""Encoder-decoder models (issue 18 item 4, docs/seq2seq.md): a BiLSTM encoder and an attention LSTM
decoder step quantized as a pair (the decoder's enc input is the encoder's int8 output, input kind
"act"), compiled into one library with encode and decode_step, equal to the numpy reference bit for
bit; greedy and beam-search drivers give the same outputs on the compiled library and on the
reference; export / load, model files and clear errors. Small random models: one compile."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm import seq2seq as s2s
from tvm_intlstm.nn import LuongAttention
from tvm_intlstm.passes import VerifyIntegerOnly
from tvm_intlstm.quant.state_format import StateError

SRC_V, TGT_V, E, HE, HD = 13, 11, 6, 8, 10
BOS = 1


class Encoder(nn.Module):
    def __init__(self, takes_lengths=True):
        super().__init__()
        self.takes_lengths = takes_lengths
        self.emb = nn.Embedding(SRC_V, E)
        self.lstm = nn.LSTM(E, HE, batch_first=True, bidirectional=True)

    def forward(self, src, lengths):
        y, _ = self.lstm(self.emb(src))
        return y


class EncoderNoLengths(Encoder):
    def forward(self, src):
        y, _ = self.lstm(self.emb(src))
        return y


class DecoderStep(nn.Module):
    def __init__(self, score="general", hidden=HD):
        super().__init__()
        self.emb = nn.Embedding(TGT_V, E)
        self.lstm = nn.LSTM(E, hidden, batch_first=True)
        self.attn = LuongAttention(hidden, 2 * HE, score)
        self.out = nn.Linear(hidden + 2 * HE, TGT_V)

    def forward(self, prev, h0, c0, enc, lengths):
        y, (h, c) = self.lstm(self.emb(prev), (h0, c0))
        ctx, _ = self.attn(y, enc, lengths)
        return self.out(torch.cat([y, ctx], -1)), h, c


def _calib(seed, n=4, B=4, S=7, T=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, SRC_V, (B, S), generator=g), torch.randint(1, S + 1, (B,), generator=g),
             torch.randint(0, TGT_V, (B, T), generator=g)) for _ in range(n)]


def _sources(rng, lengths, S=None):
    S = S or max(lengths)
    return rng.integers(0, SRC_V, (len(lengths), S)), np.asarray(lengths, np.int64)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return s2s.quantize_seq2seq(Encoder().eval(), DecoderStep().eval(), _calib(1))


@pytest.fixture(scope="module")
def lib(pair):
    return s2s.compile_seq2seq(pair, "host", verbose=False)


def _eq(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: output {k}"
        np.testing.assert_array_equal(g, w, err_msg=f"{what}: output {k}")


# ------------------------------------------------------------------------------------------------
# quantization of the pair


def test_pair_kinds_and_torch_equals_reference(pair):
    assert pair.encoder.input_kinds == ["ids", "lengths"]     # the unused lengths: kind "lengths"
    assert pair.decoder.input_kinds == ["ids", "state_h", "state_c", "act", "lengths"]
    assert pair.decoder.input_scales == {3: pair.enc_scale} == {3: pair.encoder.output_info.scale}
    ref = pair.reference()
    rng = np.random.default_rng(2)
    src, ln = _sources(rng, [5, 1, 3])
    enc = ref.encode(src, ln)
    assert enc.dtype == np.int8 and enc.shape == (3, 5, 2 * HE)
    np.testing.assert_array_equal(pair.encode(src, ln).numpy(), enc)
    h, c = ref.zero_state(3)
    prev = rng.integers(0, TGT_V, (3, 1))
    want = ref.decode_step(prev, h, c, enc, ln)
    assert [w.dtype for w in want] == [np.int32, np.int8, np.int16]
    _eq([t.numpy() for t in pair.decode_step(prev, h, c, enc, ln)], want, "torch decode_step")


def test_dot_score_and_encoder_without_lengths():
    """Luong dot attention (decoder hidden == encoder features) and forward(src) encoders."""
    torch.manual_seed(5)
    q = s2s.quantize_seq2seq(EncoderNoLengths().eval(), DecoderStep("dot", 2 * HE).eval(), _calib(6, n=2))
    assert q.encoder.input_kinds == ["ids"] and not q.encoder_takes_lengths
    rng = np.random.default_rng(7)
    src, ln = _sources(rng, [4, 2])
    ref = q.reference()
    assert s2s.greedy_decode(q, src, ln, BOS, -1, 4) == s2s.greedy_decode(ref, src, ln, BOS, -1, 4)


def test_ptq_close_to_float(pair):
    """The integer decoder step's logits follow the float pair's (teacher-forced first step)."""
    torch.manual_seed(0)
    enc_f, dec_f = Encoder().eval(), DecoderStep().eval()   # the same seed: the same float weights
    src, ln, dec_in = _calib(9, n=1)[0]
    with torch.no_grad():
        f_logits, _, _ = dec_f(dec_in[:, :1], torch.zeros(1, 4, HD), torch.zeros(1, 4, HD), enc_f(src, ln), ln)
    ref = pair.reference()
    enc = ref.encode(src, ln)
    logits, _, _ = ref.decode_step(dec_in[:, :1].numpy(), *ref.zero_state(4), enc, ln.numpy())
    err = np.abs(logits * pair.logits_scale - f_logits.numpy()).max() / np.abs(f_logits.numpy()).max()
    assert err < 0.1, err


# ------------------------------------------------------------------------------------------------
# the compiled library


def test_library_is_integer_only(lib):
    mod = lib.ir_module
    names = {gv.name_hint for gv in mod.functions}
    assert {"encode", "decode_step"} <= names
    VerifyIntegerOnly()(mod)       # raises FloatOpError otherwise
    for name in ("encode", "decode_step"):
        assert all(not str(p.ty.dtype).startswith("float") for p in mod[name].params), name
    # no quantize kernel anywhere: the encoder's int8 output feeds the decoder unchanged
    assert not any(f.attrs is not None and "intlstm.boundary" in f.attrs
                   for f in mod.functions.values() if hasattr(f, "buffer_map"))


def test_compiled_equals_reference(pair, lib):
    ref = pair.reference()
    rng = np.random.default_rng(11)
    for lengths, S in (([1], 1), ([4, 1, 7], 7), ([9, 9], 9), ([2, 5, 3, 1, 6], 8)):
        src, ln = _sources(rng, lengths, S)
        enc = lib.encode(src, ln)
        _eq([enc], [ref.encode(src, ln)], f"encode lengths {lengths}")
        h, c = lib.zero_state(len(lengths))
        fmt_h, fmt_c = lib.state_formats()
        for T in (1, 1, 3):             # several steps, then 3 teacher-forced steps in one call
            prev = rng.integers(0, TGT_V, (len(lengths), T))
            got = lib.decode_step(prev, h, c, enc, ln)
            _eq(got, ref.decode_step(prev, h, c, enc, ln), f"decode_step lengths {lengths} T={T}")
            assert got[0].shape == (len(lengths), T, TGT_V)
            h, c = got[1], got[2]
        # random states in the decoder's formats
        h, c = lib.quantize_state(*(rng.standard_normal((1, len(lengths), HD)).astype(np.float32) for _ in "hc"))
        prev = rng.integers(0, TGT_V, (len(lengths), 1))
        _eq(lib.decode_step(prev, h, c, enc, ln), ref.decode_step(prev, h, c, enc, ln), "random states")


def _with_eos(ref, src, ln):
    """An EOS token that ends some sources early and not others (the random model's own outputs)."""
    first = s2s.greedy_decode(ref, src, ln, BOS, -1, 6)
    return first[0][2]


def test_greedy_compiled_equals_reference(pair, lib):
    ref = pair.reference()
    rng = np.random.default_rng(12)
    src, ln = _sources(rng, [6, 1, 4, 9, 2], 9)
    eos = _with_eos(ref, src, ln)
    want = s2s.greedy_decode(ref, src, ln, BOS, eos, 12)
    assert len(want[0]) <= 2 and len({len(w) for w in want}) > 1     # EOS ends sources at different steps
    assert s2s.greedy_decode(lib, src, ln, BOS, eos, 12) == want
    assert s2s.greedy_decode(pair, src, ln, BOS, eos, 12) == want
    # each source alone (same padding) decodes as in the batch: rows are independent
    for b in range(len(ln)):
        assert s2s.greedy_decode(lib, src[b:b + 1], ln[b:b + 1], BOS, eos, 12) == [want[b]]


def test_beam_search(pair, lib):
    ref = pair.reference()
    rng = np.random.default_rng(13)
    src, ln = _sources(rng, [5, 1, 8, 3], 8)
    eos = _with_eos(ref, src, ln)
    want = s2s.beam_search(ref, src, ln, BOS, eos, 10, beam=3, return_all=True)
    assert s2s.beam_search(lib, src, ln, BOS, eos, 10, beam=3, return_all=True) == want
    assert s2s.beam_search(lib, src, ln, BOS, eos, 10, beam=3, return_all=True) == want   # deterministic
    for hyps in want:
        assert 1 <= len(hyps) and all(isinstance(h, s2s.Hypothesis) for h in hyps)
        norms = [h.normalized for h in hyps]
        assert norms == sorted(norms, reverse=True)
        for h in hyps:
            n = len(h.tokens) + (1 if h.finished else 0)
            assert h.normalized == pytest.approx(h.score / n) and h.score <= 0
            assert eos not in h.tokens and len(h.tokens) <= 10
    assert any(h.finished for hyps in want for h in hyps)
    assert s2s.beam_search(lib, src, ln, BOS, eos, 10, beam=3) == [list(h[0].tokens) for h in want]
    # beam 1 is greedy decoding (log-softmax keeps the order of the int32 logits)
    assert s2s.beam_search(lib, src, ln, BOS, eos, 10, beam=1) == s2s.greedy_decode(lib, src, ln, BOS, eos, 10)
    # length_penalty 0 ranks by the raw sum of log-probabilities
    raw = s2s.beam_search(lib, src, ln, BOS, eos, 10, beam=3, length_penalty=0.0, return_all=True)
    assert all(h[0].normalized == h[0].score for h in raw)


def test_log_softmax64():
    logits = np.array([[0, 100, -100], [7, 7, 7]], np.int32)
    lp = s2s.log_softmax64(logits, 0.01)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0)
    assert lp.dtype == np.float64 and lp[1, 0] == lp[1, 1] == lp[1, 2]


def test_export_and_load(pair, lib, tmp_path):
    path = lib.export_library(tmp_path / "s2s.so")
    for loaded in (til.load(path), s2s.load_seq2seq(path)):
        assert isinstance(loaded, s2s.CompiledSeq2Seq)
        assert loaded.enc_scale == lib.enc_scale and loaded.logits_scale == lib.logits_scale
        rng = np.random.default_rng(14)
        src, ln = _sources(rng, [3, 1, 6])
        enc = loaded.encode(src, ln)
        _eq([enc], [lib.encode(src, ln)], "loaded encode")
        h, c = loaded.zero_state(3)
        prev = np.full((3, 1), BOS)
        _eq(loaded.decode_step(prev, h, c, enc, ln), lib.decode_step(prev, h, c, enc, ln), "loaded decode_step")
        assert s2s.greedy_decode(loaded, src, ln, BOS, 2, 5) == s2s.greedy_decode(pair.reference(), src, ln, BOS, 2, 5)
    from tvm_intlstm.compiler import load as load_one_model
    with pytest.raises(ValueError, match="encoder-decoder library"):
        load_one_model(path)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")),
                    reason="needs the aarch64 tools of .ci/install_arm.sh")
def test_rpi5_build_under_qemu(pair, tmp_path):
    """The pair compiled for the rpi5 preset (aarch64, cross-compiled, one .so with encode and
    decode_step): encode and greedy decode steps run under qemu-aarch64 give the reference's bits."""
    from tvm_intlstm.runtime.emulate import run_emulated
    lib = s2s.compile_seq2seq(pair, "rpi5", verbose=False)
    path = lib.export_library(tmp_path / "s2s_rpi5.so")
    meta = json.loads(open(path + ".json").read())
    assert meta["format"] == s2s.SEQ2SEQ_FORMAT and "aarch64" in json.dumps(meta["target"])
    ref = pair.reference()
    rng = np.random.default_rng(21)
    src, ln = _sources(rng, [4, 1, 6])

    def emu(function, args):
        return run_emulated(path, [np.ascontiguousarray(a) for a in args], cpu="cortex-a76", function=function,
                            verbose=False)

    (enc,) = emu("encode", (src, ln))
    _eq([enc], [ref.encode(src, ln)], "aarch64 encode")
    h, c = ref.zero_state(3)
    prev = np.full((3, 1), BOS, np.int64)
    for step in range(3):            # greedy steps, the state carried across calls
        got = emu("decode_step", (prev, h, c, enc, ln))
        want = ref.decode_step(prev, h, c, enc, ln)
        _eq(got, want, f"aarch64 decode_step {step}")
        logits, h, c = want
        prev = np.argmax(logits[:, -1], axis=-1)[:, None].astype(np.int64)
    # T = 2 teacher-forced steps in one call
    prev2 = rng.integers(0, TGT_V, (3, 2))
    _eq(emu("decode_step", (prev2, h, c, enc, ln)), ref.decode_step(prev2, h, c, enc, ln), "aarch64 T=2")


def test_model_file_round_trip(pair, tmp_path):
    path = til.save_quantized(pair, tmp_path / "pair.qpt")
    q2 = til.load_quantized(path)
    assert isinstance(q2, s2s.QuantizedSeq2Seq) and q2.decoder.input_scales == pair.decoder.input_scales
    rng = np.random.default_rng(15)
    src, ln = _sources(rng, [4, 2])
    assert s2s.greedy_decode(q2, src, ln, BOS, 3, 6) == s2s.greedy_decode(pair, src, ln, BOS, 3, 6)
    # the decoder alone: its int8 input keeps kind and scale
    one = til.load_quantized(til.save_quantized(pair.decoder, tmp_path / "dec.qpt"))
    assert one.input_kinds[3] == "act" and one.input_scales == pair.decoder.input_scales


# ------------------------------------------------------------------------------------------------
# misuse


def test_errors(pair, lib):
    rng = np.random.default_rng(16)
    src, ln = _sources(rng, [3, 2])
    enc = lib.encode(src, ln)
    h, c = lib.zero_state(2)
    prev = np.full((2, 1), BOS)
    for runner in (lib, pair.reference(), pair):
        with pytest.raises(s2s.Seq2SeqError, match="int8 output"):
            runner.decode_step(prev, h, c, enc.astype(np.float32), ln)
        with pytest.raises(s2s.Seq2SeqError, match=r"in \[1, S\]"):
            runner.encode(src, np.array([0, 2]))
        with pytest.raises(s2s.Seq2SeqError, match=r"in \[1, S\]"):
            runner.encode(src, np.array([3, 4]))
        with pytest.raises(s2s.Seq2SeqError, match=r"in \[1, S\]"):
            runner.decode_step(prev, h, c, enc, np.array([3, 4]))
        with pytest.raises(s2s.Seq2SeqError, match="batch"):
            runner.decode_step(prev[:1], h, c, enc, ln)
        with pytest.raises(s2s.Seq2SeqError, match="src must be int64"):
            runner.encode(src.astype(np.float32), ln)
    for runner in (lib, pair.reference()):
        with pytest.raises((StateError, TypeError), match="h0"):   # the states' own checks (docs/stateful.md)
            runner.decode_step(prev, h.astype(np.int16), c, enc, ln)
    # the compiled function's own input check (below the driver's): an int8 activation input
    with pytest.raises(TypeError, match="int8 activations"):
        lib._decode(prev, h, c, enc.astype(np.int16), ln)
    with pytest.raises(TypeError, match="int8 activations"):
        pair.decoder(torch.from_numpy(prev), *pair.zero_state(2), torch.from_numpy(enc).float(), torch.from_numpy(ln))
    with pytest.raises(TypeError, match="QuantizedSeq2Seq"):
        s2s.compile_seq2seq(pair.decoder, "host")
    with pytest.raises(TypeError, match="drivers take"):
        s2s.greedy_decode(pair.decoder, src, ln, BOS, 2, 3)
    with pytest.raises(ValueError, match="beam"):
        s2s.beam_search(lib, src, ln, BOS, 2, 3, beam=0)
    with pytest.raises(ValueError, match="max_len"):
        s2s.greedy_decode(lib, src, ln, BOS, 2, 0)


def test_quantize_errors():
    class NoState(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DecoderStep()

        def forward(self, prev, enc, lengths):
            return self.inner(prev, torch.zeros(1, prev.shape[0], HD), torch.zeros(1, prev.shape[0], HD), enc, lengths)

    with pytest.raises(s2s.Seq2SeqError, match="decoder step takes 3 inputs"):
        s2s.quantize_seq2seq(Encoder(), NoState(), _calib(1, n=1))
    with pytest.raises(TypeError, match="dec_in"):
        s2s.quantize_seq2seq(Encoder(), DecoderStep(), [(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 3]))])
    with pytest.raises(s2s.Seq2SeqError, match=r"in \[1, S\]"):
        s2s.quantize_seq2seq(Encoder(), DecoderStep(), [(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 3]),
                                                         torch.zeros(2, 2, dtype=torch.int64))])
    with pytest.raises(ValueError, match="empty"):
        s2s.quantize_seq2seq(Encoder(), DecoderStep(), [])
