"""Test PER / WER of the FP and an integer G2P model (QAT or PTQ), the integer pair running THROUGH THE COMPILED
LIBRARY (tvm_intlstm.compile_seq2seq for this machine), after checking that its greedy outputs equal
the numpy reference's (QuantizedSeq2Seq.reference()) on the whole test split; and decode latency per
word of the compiled library against the FP PyTorch model, in the same run, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate                     # model/qat.qpt (shipped), test split
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate --model ptq         # runs/g2p_ptq.qpt
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate --ref-words 500     # reference check on a subset
    OMP_NUM_THREADS=1 .venv/bin/python -m examples.g2p.evaluate --word quantization --word tvm

Protocol (as :mod:`examples.g2p.evaluate_fp`): greedy decoding, words in batches of **one** source
length (:func:`examples.g2p.data.eval_batches`, 256 words at most), so no word sees padding in the
encoder and each word's output is the one it gets alone (docs/g2p.md, "Padding"); at most
``max_decode_len(S)`` phonemes. The integer driver is ``til.greedy_decode`` (integer argmax of the
int32 logits); the same driver runs the reference. Latency: median ms to pronounce one word alone
(batch 1: encode + the decode steps) over 200 evenly spaced test words, for the compiled library and
for the FP PyTorch model (``evaluate_fp.word_latency_ms``), interleaved in one run.

Models (``--model``): ``qat`` (the default) is the shipped QAT-integer pair ``model/qat.qpt``
(:mod:`examples.g2p.qat`); ``ptq`` is ``runs/g2p_ptq.qpt``, which is made first by
:mod:`examples.g2p.quantize_ptq` when missing (a few seconds); ``--qpt`` names another file. So
``--word`` is a one-command demo from a fresh checkout. Writes ``runs/g2p_eval_<model>.json``. The
library is also exported to ``runs/<qpt stem>.so`` (+ ``.so.json``), which ``--word`` reuses when it
is newer than the model file (else it compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tvm_intlstm as til  # noqa: E402

from . import data as D  # noqa: E402
from .evaluate_fp import decode_entries, score  # noqa: E402
from .model import load_checkpoint, max_decode_len  # noqa: E402
from .quantize_ptq import FP_CKPT, PTQ_QPT, log, state_dict_bytes  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
QAT_SHIPPED = HERE / "model" / "qat.qpt"
MODELS = {"qat": QAT_SHIPPED, "ptq": PTQ_QPT}
LABELS = {"qat": "QAT integer (compiled library)", "ptq": "PTQ integer (compiled library)"}
EVAL_BATCH = 256
LATENCY_WORDS = 200


def compile_host(q, verify: bool = True):
    """The compiled library for this machine; VerifyIntegerOnly on its whole module."""
    lib = til.compile_seq2seq(q, "host", verbose=False)
    if verify:
        from tvm_intlstm.passes import VerifyIntegerOnly
        VerifyIntegerOnly()(lib.ir_module)       # raises FloatOpError otherwise
    return lib


def decode_int(model, entries, batch: int = EVAL_BATCH) -> list[list[str]]:
    """Greedy phonemes of every entry (entries order) through til.greedy_decode on ``model`` (a
    CompiledSeq2Seq or a reference), in batches of words of one length."""
    hyps: list[list[str]] = [[] for _ in entries]
    for sel, b in D.eval_batches(entries, batch):
        ids = til.greedy_decode(model, b.src, b.lengths, D.BOS, D.EOS, max_decode_len(b.src.shape[1]))
        for i, row in zip(sel, ids):
            hyps[i] = D.PHONEME_VOCAB.decode(row)
    return hyps


def pronounce_int(lib, word: str) -> list[str]:
    src = np.array([D.encode_word(word)], np.int64)
    lengths = np.array([src.shape[1]], np.int64)
    return D.PHONEME_VOCAB.decode(til.greedy_decode(lib, src, lengths, D.BOS, D.EOS, max_decode_len(src.shape[1]))[0])


def pronounce_fp(model, word: str) -> list[str]:
    from .evaluate_fp import pronounce
    return pronounce(model, word, 1)


def latencies(lib, model, entries, n: int = LATENCY_WORDS) -> dict:
    """Median ms per word alone (batch 1) of the compiled library and the FP model, interleaved
    word by word (same load for both), over ``n`` evenly spaced words."""
    step = max(1, len(entries) // n)
    words = [e.word for e in entries[::step][:n]]
    pronounce_int(lib, words[0]), pronounce_fp(model, words[0])          # warm-up
    t_int, t_fp, same = [], [], 0
    for w in words:
        t0 = time.perf_counter()
        a = pronounce_int(lib, w)
        t1 = time.perf_counter()
        b = pronounce_fp(model, w)
        t2 = time.perf_counter()
        t_int.append(1e3 * (t1 - t0))
        t_fp.append(1e3 * (t2 - t1))
        same += a == b
    return {"words": len(words), "same_phonemes": same, "compiled_ms_median": statistics.median(t_int),
            "fp_ms_median": statistics.median(t_fp), "compiled_ms_mean": statistics.fmean(t_int),
            "fp_ms_mean": statistics.fmean(t_fp)}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lib_for_words(qpt: Path, so: Path):
    if so.exists() and so.stat().st_mtime >= qpt.stat().st_mtime:
        return til.load(so)
    lib = compile_host(til.load_quantized(qpt), verify=False)
    lib.export_library(so)
    return lib


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qat",
                   help="qat: the shipped model/qat.qpt (default); ptq: runs/g2p_ptq.qpt (made when missing)")
    p.add_argument("--qpt", type=Path, default=None, help="another quantized pair file (instead of --model's)")
    p.add_argument("--checkpoint", type=Path, default=FP_CKPT, help="the FP model")
    p.add_argument("--split", choices=D.SPLITS, default="test")
    p.add_argument("--ref-words", type=int, default=0, metavar="N",
                   help="check compiled == reference on N evenly spaced words only (default: the whole split)")
    p.add_argument("--word", action="append", help="print the phonemes from the compiled library (repeatable) and exit")
    p.add_argument("--json", type=Path, default=None, help="default: runs/g2p_eval_<model>.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    a.qpt = a.qpt or MODELS[a.model]
    a.json = a.json or RUNS / f"g2p_eval_{a.model}.json"
    if not a.qpt.exists():
        if a.qpt.resolve() != PTQ_QPT.resolve():
            maker = "qat" if a.model == "qat" else "quantize_ptq"
            sys.exit(f"no quantized model at {a.qpt}: run python -m examples.g2p.{maker} --out {a.qpt} first")
        log(f"no {a.qpt.name} yet: quantizing the shipped FP model first (examples.g2p.quantize_ptq, a few s)")
        from .quantize_ptq import main as quantize_main
        quantize_main([])
    RUNS.mkdir(parents=True, exist_ok=True)
    so = RUNS / (a.qpt.stem + ".so")
    if a.word:
        lib = lib_for_words(a.qpt, so)
        for w in a.word:
            print(f"{w}: {' '.join(pronounce_int(lib, w))}")
        return

    entries = D.load_split(a.split)
    model, ckpt = load_checkpoint(a.checkpoint)
    q = til.load_quantized(a.qpt)
    t0 = time.time()
    lib = compile_host(q)
    log(f"{a.qpt.name} compiled for the host ({lib.target.attrs.get('mcpu', '') or lib.target.kind.name}) in "
        f"{time.time() - t0:.1f} s; VerifyIntegerOnly passed")
    lib.export_library(so)
    res: dict = {"split": a.split, "words": len(entries), "cpu": cpu_name(), "model": a.model, "qpt": a.qpt.name,
                 "qpt_bytes": a.qpt.stat().st_size, "fp_state_dict_bytes": state_dict_bytes(model), "threads": 1,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    t0 = time.time()
    hyp_fp = decode_entries(model, entries, 1)
    res["fp_seconds"] = round(time.time() - t0, 1)
    t0 = time.time()
    hyp_int = decode_int(lib, entries)
    res["compiled_seconds"] = round(time.time() - t0, 1)
    log(f"decoded {len(entries):,} {a.split} words: FP {res['fp_seconds']} s, compiled library "
        f"{res['compiled_seconds']} s")

    if a.ref_words:
        step = max(1, len(entries) // a.ref_words)
        idx = list(range(0, len(entries), step))[: a.ref_words]
    else:
        idx = list(range(len(entries)))
    sub = [entries[i] for i in idx]
    t0 = time.time()
    hyp_ref = decode_int(q.reference(), sub)
    mism = sum(hyp_ref[k] != hyp_int[i] for k, i in enumerate(idx))
    res["reference_check"] = {"words": len(sub), "mismatches": mism, "seconds": round(time.time() - t0, 1)}
    log(f"compiled greedy == reference greedy on {len(sub):,} {a.split} words: {mism == 0} "
        f"({mism} differ) [{res['reference_check']['seconds']} s]")

    rows = {}
    for name, hyps in (("fp", hyp_fp), (a.model, hyp_int)):
        single, multi = score(entries, hyps)
        rows[name] = {"first": single.as_dict(), "closest": multi.as_dict()}
    res["rates"] = rows
    res["int_words_differing_from_fp"] = sum(x != y for x, y in zip(hyp_fp, hyp_int))
    res["latency"] = latencies(lib, model, entries)

    L = res["latency"]
    print()
    print(f"{a.split} split, {len(entries):,} words, greedy, one thread, {res['cpu']}")
    print("| model | PER (first pron.) | WER (first pron.) | PER (closest variant) | WER (closest variant) "
          "| ms per word alone (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label, ms in (("fp", "FP32 (PyTorch)", L["fp_ms_median"]),
                            (a.model, LABELS[a.model], L["compiled_ms_median"])):
        f, m = rows[name]["first"], rows[name]["closest"]
        print(f"| {label} | {100 * f['per']:.2f} % | {100 * f['wer']:.2f} % | {100 * m['per']:.2f} % "
              f"| {100 * m['wer']:.2f} % | {ms:.2f} |")
    print(f"{a.model.upper()} output differs from FP on {res['int_words_differing_from_fp']:,} words; compiled == "
          f"reference on {len(sub):,} words: {mism == 0}")
    print(f"latency: compiled {L['compiled_ms_median']:.2f} ms vs FP {L['fp_ms_median']:.2f} ms per word (median; means "
          f"{L['compiled_ms_mean']:.2f} / {L['fp_ms_mean']:.2f}): {L['fp_ms_median'] / L['compiled_ms_median']:.1f}x; "
          f"{L['same_phonemes']}/{L['words']} latency words pronounced alike")
    print(f"size: {a.qpt.name} {res['qpt_bytes'] / 1e6:.2f} MB vs FP32 state dict {res['fp_state_dict_bytes'] / 1e6:.2f} MB"
          f" ({res['fp_state_dict_bytes'] / res['qpt_bytes']:.2f}x smaller)")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {a.json}")
    if mism:
        sys.exit("compiled library and reference disagree")


if __name__ == "__main__":
    main(sys.argv[1:])
