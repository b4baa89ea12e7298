"""Cross-compile a small integer-only module for an ARM board, with inputs and expected outputs.

    python build_model.py build --target rpi5 --out build/bundle
    python build_model.py check --outputs build/out --expected build/bundle

`build` compiles a demo int8 x int8 -> int32 product with bias plus an int8 requantization
(the core of an integer LSTM gate) with tvm.compile for the given target (anything
tvm_intlstm.target.parse_target accepts: a preset such as rpi4/rpi5/rk3588 or
"llvm -mtriple=aarch64-linux-gnu -mcpu=... -mattr=..."), links it with the aarch64 cross
compiler (tvm_intlstm.target.export_library) into OUT/model.so, and writes OUT/input_<i>.npy and
the numpy reference OUT/expected_<i>.npy.  `check` compares runner outputs with the reference
bit for bit.

For a real model, replace the first step with tvm_intlstm's compile API, e.g.

    cm = til.compile(qmodel, target="rpi5", example_inputs=(x,))
    cm.export_library("build/bundle/model.so")

and write its inputs as .npy files in the order of the Relax function's parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SHIFT = 7


def _demo_module(m: int, k: int, n: int):
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    bb = relax.BlockBuilder()
    a = relax.Var("a", R.Tensor((m, k), "int8"))
    w = relax.Var("w", R.Tensor((k, n), "int8"))
    bias = relax.Var("bias", R.Tensor((n,), "int32"))
    with bb.function("main", [a, w, bias]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(a, w, out_dtype="int32"))
            acc_b = bb.emit(relax.op.add(acc, bias))
            sh = bb.emit(relax.op.right_shift(acc_b, relax.const(SHIFT, "int32")))
            q = bb.emit(relax.op.astype(relax.op.clip(sh, -128, 127), "int8"))
            out = bb.emit_output(relax.Tuple([acc_b, q]))
        bb.emit_func_output(out)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


def build(target_spec: str, out: Path, m: int, k: int, n: int, seed: int) -> None:
    import tvm

    from tvm_intlstm.target import export_library, parse_target, target_features

    target = parse_target(target_spec)
    feats = target_features(target)
    out.mkdir(parents=True, exist_ok=True)
    ex = tvm.compile(_demo_module(m, k, n), target=target)
    lib = export_library(ex, out / "model.so", target)
    print(f"wrote {lib} for {feats.arch} mcpu={feats.mcpu} dotprod={feats.has_dotprod} "
          f"i8mm={feats.has_i8mm}")
    if feats.is_aarch64:
        from tvm_intlstm.runtime.emulate import instruction_count

        print(f"  sdot instructions: {instruction_count(lib, 'sdot')}")

    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)
    bias = rng.integers(-(2**20), 2**20, (n,), dtype=np.int32)
    acc = a.astype(np.int32) @ w.astype(np.int32) + bias
    q = np.clip(acc >> SHIFT, -128, 127).astype(np.int8)
    for i, arr in enumerate((a, w, bias)):
        np.save(out / f"input_{i}.npy", arr)
    for i, arr in enumerate((acc, q)):
        np.save(out / f"expected_{i}.npy", arr)
    print(f"wrote inputs and expected outputs to {out}")


def check(outputs: Path, expected: Path) -> int:
    exp = sorted(expected.glob("expected_*.npy"))
    if not exp:
        print(f"no expected_*.npy in {expected}", file=sys.stderr)
        return 2
    bad = 0
    for e in exp:
        o = outputs / e.name.replace("expected_", "output_")
        if not o.is_file():
            print(f"missing {o}", file=sys.stderr)
            bad += 1
            continue
        got, want = np.load(o), np.load(e)
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            print(f"MISMATCH {o.name}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}",
                  file=sys.stderr)
            bad += 1
        else:
            print(f"ok {o.name}: {got.dtype}{tuple(got.shape)} bit-exact")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="cross-compile the demo module and write inputs")
    b.add_argument("--target", default="rpi5")
    b.add_argument("--out", type=Path, default=Path("build/bundle"))
    b.add_argument("--shape", type=int, nargs=3, default=(16, 256, 512), metavar=("M", "K", "N"))
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="compare runner outputs with the numpy reference")
    c.add_argument("--outputs", type=Path, required=True)
    c.add_argument("--expected", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.target, args.out, *args.shape, seed=args.seed)
        return 0
    return check(args.outputs, args.expected)


if __name__ == "__main__":
    sys.exit(main())
