"""Fast test of the quantized G2P path (examples/g2p/quantize_ptq.py, evaluate.py): a tiny randomly
initialised G2P model of the same shape (BiLSTM encoder of 2 layers, attention LSTM decoder step),
PTQ with til.quantize_seq2seq on teacher-forced batches, one compile for the host
(VerifyIntegerOnly), and compiled greedy decoding == reference greedy decoding on a few words,
batched by length as evaluate.py does. No dictionary files needed (the words are given here)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # examples/ is not an installed package
    sys.path.insert(0, str(REPO))

import tvm_intlstm as til  # noqa: E402
from examples.g2p import data as D  # noqa: E402
from examples.g2p.evaluate import compile_host, decode_int, pronounce_int  # noqa: E402
from examples.g2p.model import G2P  # noqa: E402
from examples.g2p.quantize_ptq import ptq  # noqa: E402

WORDS = {
    "cat": "K AE T", "dog": "D AO G", "sun": "S AH N", "tree": "T R IY", "fish": "F IH SH",
    "house": "HH AW S", "apple": "AE P AH L", "it's": "IH T S", "a": "AH", "through": "TH R UW",
    "quantize": "K W AA N T AY Z", "phoneme": "F OW N IY M", "colonel": "K ER N AH L",
}


def _entries():
    return [D.Entry(w, (tuple(p.split()),)) for w, p in WORDS.items()]


@pytest.fixture(scope="module")
def pair_and_lib():
    torch.manual_seed(0)
    model = G2P(embed_dim=8, enc_hidden=12, enc_layers=2, dec_hidden=10).eval()
    entries = _entries()
    calib = []
    for k in range(0, len(entries), 5):   # padded batches of mixed lengths, as in training
        b = D.make_batch(entries[k:k + 5])
        calib.append((torch.from_numpy(b.src), torch.from_numpy(b.lengths), torch.from_numpy(b.tgt_in)))
    q = ptq(model, calib)
    return model, q, compile_host(q)        # compile_host runs VerifyIntegerOnly


def test_compiled_greedy_equals_reference(pair_and_lib):
    _, q, lib = pair_and_lib
    entries = _entries()
    got = decode_int(lib, entries, batch=4)
    ref = decode_int(q.reference(), entries, batch=4)
    assert got == ref
    assert any(got)   # a random model still emits some phonemes for some word
    # a word alone gives its row of the batch (one-length batches: no padding either way)
    for e, h in zip(entries[:3], got[:3]):
        assert pronounce_int(lib, e.word) == h


def test_ptq_pair_logits_close_to_float(pair_and_lib):
    model, q, lib = pair_and_lib
    b = D.make_batch([e for e in _entries() if len(e.word) == 3])
    src, lengths = torch.from_numpy(b.src), torch.from_numpy(b.lengths)
    with torch.no_grad():
        f = model(src, lengths, torch.from_numpy(b.tgt_in))[:, :1].numpy()
    enc = lib.encode(b.src, b.lengths)
    logits, _, _ = lib.decode_step(b.tgt_in[:, :1], *lib.zero_state(len(b.src)), enc, b.lengths)
    assert logits.dtype == np.int32
    err = np.abs(logits * lib.logits_scale - f).max() / np.abs(f).max()
    assert err < 0.1, err


def test_saved_pair_round_trip(pair_and_lib, tmp_path):
    _, q, lib = pair_and_lib
    path = tmp_path / "g2p.qpt"
    til.save_quantized(q, path)
    q2 = til.load_quantized(path)
    b = D.make_batch([e for e in _entries() if len(e.word) == 5])
    a = til.greedy_decode(q.reference(), b.src, b.lengths, D.BOS, D.EOS, 8)
    assert til.greedy_decode(q2.reference(), b.src, b.lengths, D.BOS, D.EOS, 8) == a


# the shipped QAT-integer model (examples/g2p/qat.py, docs/g2p.md): loads (data-only model file),
# compiles for the host (VerifyIntegerOnly) and pronounces words identically through the compiled
# library and the numpy reference; the words' phonemes are pinned (what the model said when shipped)
SHIPPED_QAT = REPO / "examples" / "g2p" / "model" / "qat.qpt"
SHIPPED_SAYS = {
    "quantization": "K W AA N T AH Z EY SH AH N", "phoneme": "F OW N IY M", "through": "TH R UW",
    "colonel": "K ER N AH L", "tvm": "T IY V IY EH M",
}


def test_shipped_qat_model():
    from examples.g2p.evaluate import QAT_SHIPPED
    assert QAT_SHIPPED == SHIPPED_QAT and SHIPPED_QAT.is_file(), "examples/g2p/model/qat.qpt is shipped"
    q = til.load_quantized(SHIPPED_QAT)
    assert isinstance(q, til.QuantizedSeq2Seq)
    lib = compile_host(q)
    ref = q.reference()
    for word, phonemes in SHIPPED_SAYS.items():
        got = pronounce_int(lib, word)
        assert got == pronounce_int(ref, word), word
        assert " ".join(got) == phonemes, (word, got)
