"""Command line: `tvm-intlstm compile | run | tune`.

    tvm-intlstm compile model.qpt --example-shape 1,16 --target "llvm -mcpu=znver3" -o model.so
    tvm-intlstm run model.so --input ids.npy [--output logits.npy]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _shape(s: str):
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated integers, got {s!r}") from None


def cmd_compile(a):
    import torch

    import tvm_intlstm as til
    q = til.load_quantized(a.model)
    if len(a.example_shape) != len(q.input_kinds):
        sys.exit(f"error: the model has {len(q.input_kinds)} inputs; give --example-shape once per input")
    from .runtime.inputs import example_input
    ex = [torch.from_numpy(example_input(k, s)) for s, k in zip(a.example_shape, q.input_kinds)]
    cm = til.compile(q, target=a.target, example_inputs=tuple(ex), tuning_logs=a.tuning_logs,
                     threads=a.threads, kernels=a.kernels)
    parent = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(parent):   # -o into a missing directory: create it, and say so
        os.makedirs(parent)
        print(f"created directory {parent} for the output")
    out = cm.export_library(a.output)
    print(f"wrote {out} (+ {out}.json); target {cm.target}")


def cmd_run(a):
    import tvm_intlstm as til
    if a.emulate:
        from tvm_intlstm.runtime.emulate import qemu_cpu_for_target, run_emulated
        from tvm_intlstm.runtime.inputs import check_inputs_for_library, read_meta
        inputs = check_inputs_for_library(a.library, [np.load(p) for p in a.input])
        cpu = a.cpu
        if cpu is None:
            meta = read_meta(a.library)
            cpu = qemu_cpu_for_target(meta["target"]) if meta else "cortex-a76"
        outs = run_emulated(a.library, inputs, cpu=cpu)
    else:
        cm = til.load(a.library)
        outs = cm(*[np.load(p) for p in a.input])
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    for i, o in enumerate(outs):
        print(f"output {i}: shape {tuple(o.shape)} dtype {o.dtype} min {o.min()} max {o.max()}")
    if a.output:
        np.save(a.output, outs[0])
        print(f"wrote {a.output}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tvm-intlstm", description="integer-only LSTM compiler for TVM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a saved quantized model (tvm_intlstm.save_quantized) to a .so")
    c.add_argument("model")
    c.add_argument("--target", default="llvm", help='e.g. "llvm -mcpu=znver3", a JSON dict, or a preset name')
    c.add_argument("--example-shape", type=_shape, action="append", required=True,
                   help="shape of one example input, e.g. 1,16 (token ids) or 16,1,40 (features); once per input")
    c.add_argument("--tuning-logs", default=None)
    c.add_argument("--threads", action="store_true",
                   help="LSTM kernels that use TVM's thread pool (TVM_NUM_THREADS workers): faster on "
                        "an idle machine, slower when other processes load the cores (default: off)")
    c.add_argument("--kernels", default=None, metavar="FAMILY",
                   help="kernel family instead of the target's default, e.g. amx (AMX-INT8 tiles, "
                        "opt-in; docs/compiler.md) or avx2")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=cmd_compile)
    r = sub.add_parser("run", help="run an exported module on .npy inputs")
    r.add_argument("library")
    r.add_argument("--input", action="append", required=True, help=".npy file, once per model input")
    r.add_argument("--output", help="write the first output to this .npy file")
    r.add_argument("--emulate", choices=["aarch64"], help="run an aarch64 build under qemu-aarch64")
    r.add_argument("--cpu", default=None, help="qemu CPU model with --emulate (default: from the module's target)")
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("tune", help="MetaSchedule tuning of the int8 GEMM kernels (database in --log-dir)")
    from tvm_intlstm.tuning.cli import build_parser, run_tune
    build_parser(t)
    t.set_defaults(func=run_tune)
    a = ap.parse_args(argv)
    from tvm_intlstm.target import ToolchainError
    try:
        a.func(a)
    except (ValueError, TypeError, IndexError, FileNotFoundError, ToolchainError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
