"""Test BPC of the FP, PTQ-integer and QAT-integer CharLM; the integer models run THROUGH THE
COMPILED MODULE (tvm_intlstm.compile for this machine), after checking on a slice of the test split
that the compiled module equals the numpy reference (til.reference) bit for bit.

    .venv/bin/python -m examples.char_lm.evaluate            # full test split (~5 min on one core)
    .venv/bin/python -m examples.char_lm.evaluate --windows 512   # the main job's subset only

Protocol: :func:`examples.char_lm.model.bpc` (non-overlapping 128-char windows from a zero state,
batches of 32); integer logits are dequantized with their single scale, ``float32(q) * s``, before
the float64 log-softmax. Besides the full split, each model is scored on the fixed subsets used
elsewhere (``SUBSET_WINDOWS`` = 512 evenly spaced windows: main job and ablation; ``SLICE_WINDOWS``
= 16: the fast test), so those figures can be compared with the full-split ones.

Writes ``runs/eval.json`` (everything) and ``model/metrics.json`` (the small file shipped with the
model: the FP and QAT figures that ``main.py`` reprints and ``tests/test_char_lm_model.py`` checks),
and refreshes the figures table in docs/char_lm.md (between its ``figures`` markers). With ``--qat``
naming another model than the shipped one it only writes ``runs/eval_<its stem>.json`` and prints
the table.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)


import tvm_intlstm as til

from .data import load_splits
from .model import bpc, load_checkpoint

DOC = C.REPO / "docs" / "char_lm.md"


def scores(fn, test, full: bool, tag: str) -> dict:
    out = {}
    for name, n in (("slice", C.SLICE_WINDOWS), ("subset", C.SUBSET_WINDOWS)) + ((("full", None),) if full else ()):
        t = time.time()
        out[f"test_bpc_{name}"] = bpc(fn, test, C.SEQ_LEN, C.BATCH, max_windows=n)
        out[f"seconds_{name}"] = round(time.time() - t, 1)
        C.log(f"{tag}: test BPC ({name}, {n or 'all'} windows) {out[f'test_bpc_{name}']:.4f}  "
              f"[{out[f'seconds_{name}']:.0f}s]")
    return out


def eval_int(path: Path, test, full: bool, tag: str) -> dict:
    q = til.load_quantized(path)
    t = time.time()
    cm = C.compile_host(q)
    C.log(f"{tag}: {path.name} compiled for {C.host_target()} in {time.time() - t:.0f} s")
    x = C.window_batch(test, C.eval_windows(test, C.SLICE_WINDOWS)[:2])
    t = time.time()
    same, _ = C.check_bitexact(cm, q, x)
    C.log(f"{tag}: compiled module == til.reference on test windows {list(x.shape)}: {same}  [{time.time() - t:.0f}s]")
    if not same:
        sys.exit(f"{tag}: compiled module and reference disagree")
    res = {"file": str(path.relative_to(C.REPO)) if path.is_relative_to(C.REPO) else str(path),
           "bitexact_vs_reference": same, "logits_scale": C.logits_scale(cm)}
    res.update(scores(C.dequantized_fn(cm, C.logits_scale(cm)), test, full, tag))
    return res


def fmt_table(r: dict, qat_label: str = "shipped") -> str:
    fp = r["fp"]
    rows = ["| model | test BPC (full split) | gap vs FP | subset (512 windows) | gap | slice (16 windows) |",
            "|---|---|---|---|---|---|"]
    for key, label in (("fp", "FP32 (PyTorch)"), ("ptq", "PTQ integer (compiled module)"),
                       ("qat", f"QAT integer (compiled module, {qat_label})")):
        if key not in r:
            continue
        m = r[key]
        full = m.get("test_bpc_full")
        g_full = "" if key == "fp" or full is None else f"{C.rel_gap(full, fp['test_bpc_full']):+.2f} %"
        g_sub = "" if key == "fp" else f"{C.rel_gap(m['test_bpc_subset'], fp['test_bpc_subset']):+.2f} %"
        rows.append(f"| {label} | {'n/a' if full is None else f'{full:.4f}'} | {g_full} | {m['test_bpc_subset']:.4f} "
                    f"| {g_sub} | {m['test_bpc_slice']:.4f} |")
    if "qat" in r and qat_label == "shipped":
        rows.append(f"\nFigure checked by tests/test_char_lm_model.py (shipped model, {C.SLICE_WINDOWS}-window test "
                    f"slice, compiled module): `qat_test_bpc_slice = {r['qat']['test_bpc_slice']:.5f}`")
    return "\n".join(rows)


def update_doc(block: str, name: str) -> bool:
    if not DOC.exists():
        return False
    text = DOC.read_text()
    b, e = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if b not in text or e not in text:
        return False
    head, rest = text.split(b, 1)
    _, tail = rest.split(e, 1)
    DOC.write_text(f"{head}{b}\n{block}\n{e}{tail}")
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=C.FP_CKPT)
    p.add_argument("--ptq", type=Path, default=C.PTQ_QPT)
    p.add_argument("--qat", type=Path, default=C.SHIPPED_QPT)
    p.add_argument("--subset-only", action="store_true", help="skip the full-split figures (quick check)")
    a = p.parse_args(argv)
    full = not a.subset_only
    t_all = time.time()
    _, _, test = load_splits()
    r = {"protocol": f"bpc(seq_len={C.SEQ_LEN}, batch={C.BATCH}), test split {test.size:,} chars; "
                     f"subset = {C.SUBSET_WINDOWS} evenly spaced windows, slice = {C.SLICE_WINDOWS}",
         "target": C.host_target(), "machine": platform.processor() or platform.machine(),
         "date": time.strftime("%Y-%m-%d %H:%M")}
    fp_model, _, ck = load_checkpoint(a.ckpt)
    C.log(f"FP checkpoint {a.ckpt} (step {ck.get('step')})")
    r["fp"] = {"checkpoint_step": ck.get("step"), **scores(fp_model, test, full, "FP")}
    for key, path in (("ptq", a.ptq), ("qat", a.qat)):
        if path.exists():
            r[key] = eval_int(path, test, full, key.upper())
        else:
            C.log(f"{key.upper()}: {path} not found, skipped")
    # Only the shipped model's evaluation may rewrite the shipped metrics and the docs table; another
    # QAT model (e.g. a new run under runs/) is recorded next to it in runs/.
    shipped_qat = a.qat.resolve() == C.SHIPPED_QPT.resolve()
    eval_json = C.RUNS / ("eval.json" if shipped_qat else f"eval_{a.qat.stem}.json")
    C.write_json(eval_json, r)
    if full and "qat" in r and shipped_qat:
        shipped = {"protocol": r["protocol"], "date": r["date"], "target": r["target"],
                   "fp": {k: v for k, v in r["fp"].items() if k.startswith("test_bpc") or k == "checkpoint_step"},
                   "ptq": {k: v for k, v in r.get("ptq", {}).items() if k.startswith("test_bpc")},
                   "qat": {k: v for k, v in r["qat"].items() if k.startswith("test_bpc")}}
        C.write_json(C.SHIPPED_METRICS, shipped)
        C.log(f"wrote {C.SHIPPED_METRICS.relative_to(C.REPO)}")
        if update_doc(fmt_table(r), "figures"):
            C.log(f"updated the figures table in {DOC.relative_to(C.REPO)}")
    print(fmt_table(r, "shipped" if shipped_qat else a.qat.name))
    C.log(f"evaluate done in {time.time() - t_all:.0f} s; wrote {eval_json.relative_to(C.REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
