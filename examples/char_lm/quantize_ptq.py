"""Post-training quantization of the float CharLM to an integer-only model (tvm_intlstm.quantize).

    .venv/bin/python -m examples.char_lm.quantize_ptq                       # runs/fp.pt -> runs/charlm_ptq.qpt
    .venv/bin/python -m examples.char_lm.quantize_ptq --pieces 8 --method uniform --out runs/x.qpt

Calibration: ``CALIB_BATCHES`` x ``[CALIB_BATCH, 128]`` train windows at fixed random starts
(examples/char_lm/common.py). The result is checked bit for bit against the numpy reference on a
short test window and written with ``tvm_intlstm.save_quantized`` (a data-only file).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)

import numpy as np
import torch

import tvm_intlstm as til

from .data import load_splits
from .model import load_checkpoint, vocab_path_for


def ptq(fp_model, train, pieces: int = 16, method: str = "adaptive"):
    """The PTQ integer model of ``fp_model`` with the standard calibration batches."""
    return til.quantize(fp_model, C.calib_batches(train), til.QuantConfig(pwl_pieces=pieces, pwl_method=method))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=C.FP_CKPT)
    p.add_argument("--out", type=Path, default=C.PTQ_QPT)
    p.add_argument("--pieces", type=int, default=16)
    p.add_argument("--method", choices=["adaptive", "uniform"], default="adaptive")
    a = p.parse_args(argv)

    model, vocab, ck = load_checkpoint(a.ckpt)
    C.log(f"FP checkpoint {a.ckpt} (step {ck.get('step')}, valid est {ck.get('valid_bpc_est', float('nan')):.4f})")
    train, _, test = load_splits()
    t0 = time.time()
    q = ptq(model, train, a.pieces, a.method)
    C.log(f"PTQ ({a.pieces} {a.method} PWL pieces, {C.CALIB_BATCHES}x[{C.CALIB_BATCH},{C.SEQ_LEN}] calibration "
          f"windows) in {time.time() - t0:.1f} s; logits scale {C.logits_scale(q):.6g}")
    x = C.window_batch(test, [0], 64)
    same = np.array_equal(q(torch.from_numpy(x)).numpy(), til.reference(q)(x))
    C.log(f"torch integer forward == numpy reference on a [1, 64] test window: {same}")
    if not same:
        sys.exit("integer forward and reference disagree")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    til.save_quantized(q, a.out)
    vocab.save(vocab_path_for(a.out))
    C.log(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB) and {vocab_path_for(a.out).name}")


if __name__ == "__main__":
    main(sys.argv[1:])
