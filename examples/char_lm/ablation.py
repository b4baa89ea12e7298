"""Ablation: test BPC of the PTQ integer CharLM vs PWL pieces (4, 8, 16, 32) x knot placement
(adaptive vs uniform), through the compiled module on the fixed test subset.

    .venv/bin/python -m examples.char_lm.ablation          # ~10 min on one core

Every configuration is PTQ (til.quantize) of the same FP checkpoint with the same calibration
batches (quantize_ptq.py), compiled for this machine and scored on ``SUBSET_WINDOWS`` = 512 evenly
spaced 128-char test windows (65,536 chars); the compiled module is bit-exact with the integer
forward, so these are the deployed model's figures. Only the sigmoid/tanh PWL tables change between
rows (all gate and cell-tanh tables use the configuration). The FP model is scored on the same windows.

Writes ``runs/ablation.json``, the plot ``docs/char_lm_ablation.png`` (matplotlib) and the table
between the ``ablation`` markers of docs/char_lm.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)

from tvm_intlstm.quant.pwl import fit_pwl, table_error
from tvm_intlstm.reference.ops import GATE_FRAC

from .data import load_splits
from .evaluate import update_doc
from .model import bpc, load_checkpoint
from .quantize_ptq import ptq

PLOT = C.REPO / "docs" / "char_lm_ablation.png"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = res["fp_test_bpc_subset"]
    fig, (ax, az) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=110)
    for meth, mk in (("adaptive", "o-"), ("uniform", "s--")):
        rows = [r for r in res["rows"] if r["method"] == meth]
        ax.plot([r["pieces"] for r in rows], [r["test_bpc_subset"] for r in rows], mk, label=f"PTQ integer, {meth} knots")
        if meth == "adaptive":
            az.plot([r["pieces"] for r in rows], [C.rel_gap(r["test_bpc_subset"], fp) for r in rows], mk,
                    label="PTQ integer, adaptive knots")
    ax.axhline(fp, color="k", lw=1, ls=":", label=f"FP32 ({fp:.4f})")
    ax.axhline(res.get("uniform_bpc", 6.6439), color="grey", lw=0.8, ls="-.", label="uniform distribution (log2 100)")
    az.axhline(1.0, color="r", lw=1, ls=":", label="1 % gap")
    for a_ in (ax, az):
        a_.set_xscale("log", base=2)
        a_.set_xticks([4, 8, 16, 32])
        a_.set_xticklabels(["4", "8", "16", "32"])
        a_.set_xlabel("PWL pieces (gate sigmoid/tanh and cell tanh tables)")
        a_.grid(alpha=0.3)
        a_.legend(fontsize=8)
    ax.set_ylabel(f"test BPC ({C.SUBSET_WINDOWS} windows x {C.SEQ_LEN})")
    ax.set_title("integer-only BPC vs PWL tables")
    az.set_yscale("log")
    az.set_ylabel("BPC gap vs FP32 (%)")
    az.set_title("adaptive knots: relative gap")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table_errors(n: int, meth: str, cell_fracs) -> dict:
    """Max abs errors of the tables a configuration deploys: gate sigmoid, gate tanh (Q3.12 inputs)
    and the cell tanh at the model's cell format(s) F_c."""
    e = {"err_sigmoid": table_error(fit_pwl("sigmoid", n, GATE_FRAC, meth), "sigmoid"),
         "err_tanh": table_error(fit_pwl("tanh", n, GATE_FRAC, meth), "tanh")}
    e["err_tanh_cell"] = max(table_error(fit_pwl("tanh", n, cf, meth), "tanh") for cf in cell_fracs)
    return e


def table(res: dict) -> str:
    fp = res["fp_test_bpc_subset"]
    by = {(r["pieces"], r["method"]): r for r in res["rows"]}
    fc = "/".join(str(c) for c in sorted(set(res["cell_fracs"])))
    lines = ["| PWL pieces | adaptive: test BPC | gap vs FP | uniform: test BPC | gap vs FP "
             f"| max abs error, adaptive: sigmoid / tanh / cell tanh (F_c={fc}) | uniform: same |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in res["pieces"]:
        ad, un = by[(n, "adaptive")], by[(n, "uniform")]
        ea, eu = table_errors(n, "adaptive", res["cell_fracs"]), table_errors(n, "uniform", res["cell_fracs"])
        lines.append(f"| {n} | {ad['test_bpc_subset']:.4f} | {C.rel_gap(ad['test_bpc_subset'], fp):+.2f} % | "
                     f"{un['test_bpc_subset']:.4f} | {C.rel_gap(un['test_bpc_subset'], fp):+.2f} % | "
                     f"{ea['err_sigmoid']:.5f} / {ea['err_tanh']:.5f} / {ea['err_tanh_cell']:.5f} | "
                     f"{eu['err_sigmoid']:.5f} / {eu['err_tanh']:.5f} / {eu['err_tanh_cell']:.5f} |")
    lines.append(f"| FP32 | {fp:.4f} | | | | | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=C.FP_CKPT)
    p.add_argument("--pieces", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--windows", type=int, default=C.SUBSET_WINDOWS)
    p.add_argument("--table-only", action="store_true", help="redo table, plot and docs from runs/ablation.json")
    a = p.parse_args(argv)
    t_all = time.time()
    if a.table_only:
        return report(C.read_json(C.RUNS / "ablation.json"), a.windows, t_all)
    model, _, ck = load_checkpoint(a.ckpt)
    train, _, test = load_splits()
    t = time.time()
    fp = bpc(model, test, C.SEQ_LEN, C.BATCH, max_windows=a.windows)
    C.log(f"FP (step {ck.get('step')}): test BPC ({a.windows} windows) {fp:.4f}  [{time.time() - t:.0f}s]")
    rows, cell_fracs = [], None
    for n in a.pieces:
        for meth in ("adaptive", "uniform"):
            t = time.time()
            q = ptq(model, train, n, meth)
            cell_fracs = [cf for m in q.gm.modules() if type(m).__name__ == "IntLSTM" for cf in m.cell_fracs]
            cm = C.compile_host(q)
            b = bpc(C.dequantized_fn(cm, C.logits_scale(cm)), test, C.SEQ_LEN, C.BATCH, max_windows=a.windows)
            r = {"pieces": n, "method": meth, "test_bpc_subset": b, **table_errors(n, meth, cell_fracs)}
            rows.append(r)
            C.log(f"{n:2d} pieces {meth:8s}: test BPC {b:.4f} ({C.rel_gap(b, fp):+.2f} % vs FP)  [{time.time() - t:.0f}s]")
    res = {"protocol": f"PTQ, bpc(seq_len={C.SEQ_LEN}, batch={C.BATCH}, max_windows={a.windows}) on the test split, "
                       f"compiled module for {C.host_target()}",
           "checkpoint_step": ck.get("step"), "fp_test_bpc_subset": fp, "pieces": a.pieces, "rows": rows,
           "cell_fracs": cell_fracs, "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - t_all)}
    C.write_json(C.RUNS / "ablation.json", res)
    report(res, a.windows, t_all)


def report(res: dict, windows: int, t_all: float) -> None:
    plot(res, PLOT)
    tab = table(res)
    print(tab)
    if windows == C.SUBSET_WINDOWS and update_doc(tab, "ablation"):
        C.log("updated the ablation table in docs/char_lm.md")
    C.log(f"ablation done in {time.time() - t_all:.0f} s; wrote runs/ablation.json, {PLOT.relative_to(C.REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
