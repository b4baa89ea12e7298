"""Post-training quantization of the shipped float G2P model to an integer-only encoder + decoder pair.

    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.quantize_ptq       # model/fp.pt -> runs/g2p_ptq.qpt
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.quantize_ptq --batches 16 --out runs/x.qpt

``tvm_intlstm.quantize_seq2seq`` (docs/seq2seq.md) on ``CALIB_BATCHES`` x ``CALIB_BATCH`` words of
the **train** split (``examples.g2p.data.train_batches`` with a fixed seed: words of similar length,
a little padding, as in training), the decoder calibrated step by step with teacher forcing
(``dec_in`` = BOS + the first pronunciation). The pair is checked on a few test words (the PyTorch
integer modules == the numpy reference, greedy) and written with ``tvm_intlstm.save_quantized``
(one data-only file holding both models); its size is printed against the float state dict's.

QAT of the pair (fine-tuning from this calibration): :mod:`examples.g2p.qat`.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tvm_intlstm as til  # noqa: E402

from . import data as D  # noqa: E402
from .model import load_checkpoint, max_decode_len  # noqa: E402

HERE = Path(__file__).resolve().parent
FP_CKPT = HERE / "model" / "fp.pt"
PTQ_QPT = HERE / "runs" / "g2p_ptq.qpt"
CALIB_BATCHES, CALIB_BATCH, CALIB_SEED = 8, 64, 1234


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def calib_batches(train, n: int = CALIB_BATCHES, batch: int = CALIB_BATCH, seed: int = CALIB_SEED) -> list:
    """``n`` (src, lengths, dec_in) int64 batches of train words (fixed seed)."""
    it = D.train_batches(train, batch, np.random.default_rng(seed))
    out = []
    for _ in range(n):
        b = next(it)
        out.append((torch.from_numpy(b.src), torch.from_numpy(b.lengths), torch.from_numpy(b.tgt_in)))
    return out


def ptq(model, calib, config=None):
    """The integer pair (til.QuantizedSeq2Seq) of a float G2P model."""
    return til.quantize_seq2seq(model.encoder, model.decoder, calib, config)


def state_dict_bytes(model) -> int:
    """Size of the float model's state dict as torch.save writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=FP_CKPT)
    p.add_argument("--out", type=Path, default=PTQ_QPT)
    p.add_argument("--batches", type=int, default=CALIB_BATCHES, help="calibration batches")
    p.add_argument("--batch", type=int, default=CALIB_BATCH, help="words per calibration batch")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    model, ckpt = load_checkpoint(a.checkpoint)
    log(f"FP checkpoint {a.checkpoint} (step {ckpt.get('step')}, {sum(p.numel() for p in model.parameters()):,} params)")
    train = D.load_split("train")
    calib = calib_batches(train, a.batches, a.batch)
    t0 = time.time()
    q = ptq(model, calib)
    log(f"PTQ on {a.batches} x {a.batch} train words (teacher-forced decoder) in {time.time() - t0:.1f} s; "
        f"enc scale {q.enc_scale:.6g}, logits scale {q.logits_scale:.6g}")

    test = D.load_split("test")
    words = [e for e in test if len(e.word) == 7][:8]           # a few test words of one length
    b = D.make_batch(words)
    ml = max_decode_len(b.src.shape[1])
    torch_int = til.greedy_decode(q, b.src, b.lengths, D.BOS, D.EOS, ml)
    ref = til.greedy_decode(q.reference(), b.src, b.lengths, D.BOS, D.EOS, ml)
    log(f"greedy, PyTorch integer pair == numpy reference on {len(words)} test words: {torch_int == ref}")
    if torch_int != ref:
        sys.exit("integer pair and reference disagree")
    for e, ids in list(zip(words, ref))[:3]:
        log(f"  {e.word}: {' '.join(D.PHONEME_VOCAB.decode(ids))}   (dictionary: {' '.join(e.pron)})")

    a.out.parent.mkdir(parents=True, exist_ok=True)
    til.save_quantized(q, a.out)
    fp_bytes, q_bytes = state_dict_bytes(model), a.out.stat().st_size
    log(f"wrote {a.out} ({q_bytes / 1e6:.2f} MB); FP32 state dict {fp_bytes / 1e6:.2f} MB: "
        f"{fp_bytes / q_bytes:.2f}x smaller")


if __name__ == "__main__":
    main(sys.argv[1:])
