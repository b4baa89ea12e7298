"""Max abs error of the integer PWL sigmoid/tanh tables, adaptive vs uniform knots.

    .venv/bin/python benchmarks/pwl_error.py [--write docs/pwl.md]
"""
import argparse
import datetime

from tvm_intlstm.quant.pwl import fit_pwl, table_error


def table(pieces=(4, 8, 16, 32, 64)):
    rows = ["| pieces | sigmoid adaptive | sigmoid uniform | tanh adaptive | tanh uniform | exp adaptive (softmax) |",
            "|---:|---:|---:|---:|---:|---:|"]
    for n in pieces:
        cells = []
        for func in ("sigmoid", "tanh"):
            for meth in ("adaptive", "uniform"):
                cells.append(f"{table_error(fit_pwl(func, n, 12, meth), func):.5f}")
        cells.append(f"{table_error(fit_pwl('exp', n, 10), 'exp'):.5f}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help="write a markdown report to this path")
    args = ap.parse_args()
    t = table()
    print(t)
    if args.write:
        with open(args.write, "w") as f:
            f.write(f"""# PWL activation tables: error figures

Max absolute error (real units, over all 65,536 int16 inputs) of the integer PWL tables of
docs/integer_spec.md section 7 against float sigmoid/tanh (gate domain Q3.12, inputs in [-8, 8))
and exp (softmax, Q5.10 inputs in [-32, 0]). Outputs are Q0.15, so one output LSB is 3.1e-5.

Adaptive: the iRNN paper's greedy placement (grow each piece while its minimax line stays within a
bound, bisect the bound to use at most N pieces). Uniform: N equal pieces over the whole input range
with the same per-piece line fit, so the comparison isolates knot placement.

{t}

Produced by `.venv/bin/python benchmarks/pwl_error.py --write docs/pwl.md` on {datetime.date.today()}.
`tests/test_pwl.py` asserts that adaptive beats uniform at every piece count and bounds the adaptive errors.
""")


if __name__ == "__main__":
    main()
