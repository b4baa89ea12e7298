"""`tvm-intlstm tune`: MetaSchedule tuning of a model's int8 GEMMs into a database directory.

    tvm-intlstm tune model.qpt --example-shape 64,1,256 --target "llvm -mcpu=znver3" \\
        --trials 200 --log-dir tuning_logs/znver3
    tvm-intlstm tune --gemm 256,2048,int16,64 --target "llvm -mcpu=znver3" --trials 200 \\
        --log-dir tuning_logs/znver3          # one GEMM (K, O, out dtype, rows), no model needed
    (`--gemm 256,2048,int16,512,w7`: the same GEMM with 7-bit weights, the u8 x s8 kernel)

For a board (aarch64), measure over TVM RPC: run `python -m tvm.exec.rpc_server --host 0.0.0.0
--port 9090` on the board, then

    tvm-intlstm tune model.qpt --example-shape 64,1,256 --target rpi5 --rpc board:9090 \
        --trials 200 --log-dir tuning_logs/rpi5

(`--rpc host:port:key` when the server was started with --key). Candidates are cross-compiled
here and timed on the board.

The database is appended to (never rewritten); running the same command again resumes: `--trials`
is the total per task unless --no-resume. Progress lines go to stdout, MetaSchedule's own logs to
<log-dir>/logs. Compile with the result: `tvm-intlstm compile ... --tuning-logs <log-dir>`.
"""
from __future__ import annotations

import argparse
import sys


def _shape(s: str):
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated integers, got {s!r}") from None


def _gemm(s: str):
    parts = [p.strip() for p in s.split(",")]
    w7 = len(parts) > 3 and parts[-1] == "w7"
    if w7:
        parts = parts[:-1]
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        K, O, dt = int(parts[0]), int(parts[1]), parts[2]
        rows = int(parts[3]) if len(parts) == 4 else 64
        if dt not in ("int8", "int16", "int32") or K <= 0 or O <= 0 or rows <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gemm takes K,O,DTYPE[,ROWS][,w7] with DTYPE int8/int16/int32, got {s!r}") from None
    from .tasks import GemmTask  # pylint: disable=import-outside-toplevel

    return GemmTask(K, O, dt, rows, "--gemm", u8_weights=w7)


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `tune` arguments (on `ap`, e.g. a subparser, or a new parser)."""
    if ap is None:
        ap = argparse.ArgumentParser(prog="tvm-intlstm tune",
                                     description="MetaSchedule tuning of the int8 GEMM kernels")
    ap.add_argument("model", nargs="?", help="a saved quantized model (tvm_intlstm.save_quantized)")
    ap.add_argument("--example-shape", type=_shape, action="append", default=[],
                    help="shape of one example input (once per input), e.g. 64,1,256: the row "
                         "counts (T*B) of the GEMMs come from it")
    ap.add_argument("--gemm", type=_gemm, action="append", default=[],
                    help="tune this GEMM instead of a model's: K,O,DTYPE[,ROWS][,w7] (ROWS "
                         "default 64; w7: weights in [-64, 64], the u8 x s8 kernel of "
                         "QuantConfig(weight_bits=7) models on AVX2)")
    ap.add_argument("--target", default="llvm", help='e.g. "llvm -mcpu=znver3" or a JSON dict')
    ap.add_argument("--trials", type=int, default=64, help="trials per task (default 64)")
    ap.add_argument("--trials-per-iter", type=int, default=16)
    ap.add_argument("--rows", type=int, default=None, help="tune every task at this row count")
    ap.add_argument("--log-dir", default=None, help="database directory (default tuning_logs/<cpu>)")
    ap.add_argument("--no-resume", action="store_true",
                    help="run --trials more trials per task even if the database has some")
    ap.add_argument("--seed", type=int, default=None)
    rpc = ap.add_argument_group("tuning on a remote device (TVM RPC)")
    rpc.add_argument("--rpc", default=None, metavar="HOST:PORT[:KEY]",
                     help="measure on the TVM RPC server there (`python -m tvm.exec.rpc_server "
                          "--host 0.0.0.0 --port 9090` on the board); needed for targets this "
                          "machine cannot run, e.g. --target rpi5. tracker://HOST:PORT/KEY: on "
                          "the boards registered with that TVM RPC tracker under KEY, several "
                          "at once")
    rpc.add_argument("--rpc-parallel", type=int, default=None, metavar="N",
                     help="with a tracker: candidates measured at once (default: one per "
                          "registered board)")
    rpc.add_argument("--rpc-timeout", type=float, default=None, metavar="SECONDS",
                     help="longest session for one candidate (default 60)")
    rpc.add_argument("--rpc-number", type=int, default=None,
                     help="calls per measurement on the device (default 1, raised to last "
                          "--rpc-min-repeat-ms)")
    rpc.add_argument("--rpc-repeat", type=int, default=None,
                     help="measurements per candidate, the median is kept (default 3)")
    rpc.add_argument("--rpc-min-repeat-ms", type=int, default=None,
                     help="shortest measurement in ms (default 50)")
    return ap


def _rpc_config(a):
    opts = {"timeout": a.rpc_timeout, "number": a.rpc_number, "repeat": a.rpc_repeat,
            "min_repeat_ms": a.rpc_min_repeat_ms, "parallel": a.rpc_parallel}
    if a.rpc is None:
        given = [f"--rpc-{k.replace('_', '-')}" for k, v in opts.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --rpc HOST:PORT[:KEY]")
        return None
    from dataclasses import replace  # pylint: disable=import-outside-toplevel

    from ._ms import RPCConfig  # pylint: disable=import-outside-toplevel

    return replace(RPCConfig.parse(a.rpc), **{k: v for k, v in opts.items() if v is not None})


def run_tune(a) -> int:
    from ..runtime.rpc import RPCConnectError  # pylint: disable=import-outside-toplevel
    from ..target import ToolchainError  # pylint: disable=import-outside-toplevel
    from ._ms import RPCTuningError  # pylint: disable=import-outside-toplevel
    from .database import TuningLogError  # pylint: disable=import-outside-toplevel
    from .tune import tune  # pylint: disable=import-outside-toplevel

    rpc = _rpc_config(a)
    tasks = list(a.gemm) or None
    model = example = None
    if tasks is None:
        if not a.model:
            raise ValueError("give a model (with --example-shape) or --gemm K,O,DTYPE[,ROWS]")
        import torch  # pylint: disable=import-outside-toplevel

        import tvm_intlstm as til  # pylint: disable=import-outside-toplevel

        model = til.load_quantized(a.model)
        if len(a.example_shape) != len(model.input_kinds):
            raise ValueError(f"the model has {len(model.input_kinds)} inputs; give --example-shape "
                             "once per input")
        from ..runtime.inputs import example_input  # pylint: disable=import-outside-toplevel
        example = tuple(torch.from_numpy(example_input(k, s))
                        for s, k in zip(a.example_shape, model.input_kinds))
    elif a.rows:
        from .tasks import GemmTask  # pylint: disable=import-outside-toplevel

        tasks = [GemmTask(t.K, t.O, t.out_dtype, a.rows, t.source) for t in tasks]
    try:
        report = tune(model, a.target, example, trials=a.trials, log_dir=a.log_dir,
                      resume=not a.no_resume, rows=a.rows, tasks=tasks,
                      trials_per_iter=a.trials_per_iter, seed=a.seed, rpc=rpc)
    except (TuningLogError, RPCConnectError, RPCTuningError, ToolchainError) as e:
        # ValueError: what `tvm-intlstm` reports as "error: ..." without a traceback
        raise ValueError(str(e)) from None
    for r in report:
        t = r["task"]
        best = "-" if r["best_us"] is None else f"{r['best_us']:.1f} us"
        print(f"{t.name}: {r['trials_before']} + {r['trials_run']} trials, best {best}")
    return 0


def cli_tune(argv=None) -> int:
    """Entry point of `tvm-intlstm tune` (argv without the subcommand name)."""
    a = build_parser().parse_args(argv)
    try:
        return run_tune(a)
    except (ValueError, TypeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli_tune()
