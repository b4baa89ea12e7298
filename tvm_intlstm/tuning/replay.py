"""Lookup of tuning results: the best record per GEMM replayed on the compiler's symbolic-N kernel.

    tasks = extract_tasks(qmodel, example_inputs)          # [GemmTask(K, O, out_dtype, rows)]
    tune(qmodel, target, example_inputs, trials=64, log_dir="tuning_logs/znver3")
    tuned = apply_tuning_logs("tuning_logs/znver3", target)
    func = tuned.get(K, O, "int16")                          # scheduled symbolic-N PrimFunc or None

Symbolic N. The design space makes no decision that depends on the row count (the row tile is a
`sample_categorical` choice, rows are padded to a multiple of 8 inside the kernel), so the best
trace of the static workload replays unchanged (`Trace.apply_to_schedule`) on the symbolic-N
kernel `gemm_blocks(K, O, out_dtype)`: that is what `TunedKernels.get` returns.
"""
from __future__ import annotations

import os
import warnings

from . import gemm as G
from . import x86_wide
from .baselines import read_defaults, tuned_weights
from .database import TuningLogError, TuningLogWarning, open_database, records
from .targets import as_target, target_key, target_str
from .tasks import GEMM_ATTR, default_key, tuned_key


class TunedKernels:
    """Tuned GEMM schedules of one database for one target. `get(K, O, out_dtype)` returns the
    scheduled symbolic-N PrimFunc (same interface as kernels.linear_requant / linear_i32 with
    bias) or None (no record: use the default kernel); `get(..., w7=True)` the one tuned for
    weights in [-64, 64] (the u8 x s8 vpmaddubsw kernel: packed by x86_wide.pack_weights_vnni(W,
    8), bias corrected by -128 rowsum(W)). Keys are `tuned_key(K, O, out_dtype, w7)`. Never raises
    for a bad record."""

    def __init__(self, target=None, best=None, isa="generic", log_dir=None):
        self.target = target
        self.log_dir = log_dir
        self.isa = isa
        self._best = dict(best or {})   # tuned_key -> (rows, mean secs, TuningRecord)
        self._cache: dict = {}
        self.kept_default: list = []   # tuned keys skipped because the default kernel was faster

    def __len__(self):
        return len(self._best)

    def __repr__(self):
        def fmt(keys):
            return ", ".join(f"{k[0]}->{k[1]} {k[2]}" + (" (7-bit)" if len(k) == 4 else "")
                             for k in keys) or "none"
        where = target_str(self.target) if self.target is not None else "no target"
        return (f"TunedKernels({len(self)} tuned GEMM kernel(s) for {where}: {fmt(self.keys())}; "
                f"default kernel kept (faster) for: {fmt(self.kept_default)})")

    def __contains__(self, key):
        return tuple(key) in self._best

    def keys(self):
        return sorted(self._best)

    def best_us(self, K, O, out_dtype, w7: bool = False):
        e = self._best.get(tuned_key(K, O, out_dtype, w7))
        return None if e is None else e[1] * 1e6

    def get(self, K, O, out_dtype, parallel: bool = False, w7: bool = False,
            scale: tuple | None = None):
        """parallel=True: the replayed schedule's outermost loop (the output-channel panels, o0 of
        `gemm.schedule_gemm`) becomes a parallel loop, split among TVM's thread pool like the
        default kernels of LSTM input projections (the trials were measured on one thread).
        w7=True: the kernel tuned for weights in [-64, 64] (see the class doc). scale: the GEMM's
        per-tensor multiplier and/or shift ((M, s) or (None, s), `passes._lowering.uniform_scale`)
        baked into the epilogue of the kernel the record is replayed on, as the default kernels
        do; the caller promises the M / s arrays it passes hold them."""
        key = tuned_key(K, O, out_dtype, w7)
        if key not in self._best:
            return None
        scale = None if scale is None or out_dtype == "int32" else tuple(scale)
        ck = key + (bool(parallel), scale)
        if ck not in self._cache:
            self._cache[ck] = self._replay(key, bool(parallel), scale)
        return self._cache[ck]

    __call__ = get

    def for_weight(self, K, O, out_dtype, w, parallel: bool = False, bias=None, w7: bool = False,
                   scale: tuple | None = None):
        """For the compiler: (tuned PrimFunc, packed weight constant, bias constant) for a GEMM whose
        weight `w` is a constant (relax.const) int8 [O, K], or None (not tuned, or a weight that is
        not a constant: use the default kernel with `w` as it is). Call the kernel with the packed
        weight and the returned bias in place of `w` and `bias`; every other argument is
        unchanged. w7=True (the caller checked `passes._lowering.u8_route`): the 7-bit kernel,
        whose bias is `bias` (a constant, or None for zeros) corrected by -128 rowsum(W); otherwise
        the bias is returned as it is. scale: as for `get`."""
        from tvm import relax  # pylint: disable=import-outside-toplevel

        from ..passes._lowering import const_numpy  # pylint: disable=import-outside-toplevel

        W = const_numpy(w)
        if W is None:
            return None
        func = self.get(K, O, out_dtype, parallel, w7=w7, scale=scale)
        if func is None:
            return None
        if not w7:
            return func, relax.const(tuned_weights(W, None)[0], "int8"), bias
        b = None if bias is None else const_numpy(bias)
        if bias is not None and b is None:
            return None       # (u8_route never sends a non-constant bias here)
        wp, bc = tuned_weights(W, b, w7=True)
        return func, relax.const(wp, "int8"), relax.const(bc, "int32")

    def _replay(self, key, parallel=False, scale=None):
        import tvm  # pylint: disable=import-outside-toplevel
        from tvm import s_tir  # pylint: disable=import-outside-toplevel

        K, O, dt = key[:3]
        w7 = len(key) == 4
        rows, _, rec = self._best[key]
        try:
            G.register_intrinsics()
            if w7:
                func = x86_wide.gemm_blocks_wide(K, O, dt, n_rows=None, name="main", lanes=8,
                                                 scale=scale)
            else:
                func = G.gemm_blocks(K, O, dt, n_rows=None, name="main", packed=True, scale=scale)
            sch = s_tir.Schedule(tvm.IRModule({"main": func}))
            rec.trace.apply_to_schedule(sch, remove_postproc=True)
            out = sch.mod["main"]
            if parallel:   # (after tensorize the product block is "gemm_init" + "gemm_update_o")
                out = _parallel_loop(out, sch.get(sch.get_loops(sch.get_sblock("gemm_init"))[0]))
        except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
            warnings.warn(f"tuned schedule of GEMM K={K} O={O} {dt}{' (7-bit)' if w7 else ''} "
                          f"(tuned at N={rows}) from "
                          f"{self.log_dir} does not apply to the kernel ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                          "using the default kernel", TuningLogWarning, stacklevel=3)
            return None
        name = "linear_i32" if dt == "int32" else "linear_requant"
        return (out.without_attr(GEMM_ATTR).with_attr("global_symbol", name)
                .with_attr("intlstm.isa", self.isa).with_attr("intlstm.tuned", 1))


def _parallel_loop(func, loop):
    """`func` with the serial loop `loop` (a For of it) made parallel. Used on the output-channel
    panel loop of a replayed GEMM schedule, whose iterations write disjoint output columns (the
    schedule primitive refuses it because of the tensorized reduction block under it). TVM 0.27's
    Python API has no statement mutator, so the statements on the path from the body to the loop
    are rebuilt (`_rebuild_with`); any other statement kind on that path is an error."""
    from tvm import s_tir, tirx  # pylint: disable=import-outside-toplevel

    par = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.PARALLEL, loop.body,
                   loop.thread_binding, loop.annotations, loop.step)
    body = _rebuild_with(func.body, loop, par, tirx, s_tir)
    if body is None:
        raise ValueError(f"loop {loop.loop_var.name} not found in the scheduled kernel")
    return func.with_body(body)


def _rebuild_with(stmt, old, new, tirx, s_tir):
    """`stmt` with the statement `old` replaced by `new` (None if `old` is not under it). Only
    the statement kinds a scheduled GEMM has above its loops are walked."""
    if stmt.same_as(old):
        return new
    if isinstance(stmt, tirx.For):
        body = _rebuild_with(stmt.body, old, new, tirx, s_tir)
        return None if body is None else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
            stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.SeqStmt):
        for i, part in enumerate(stmt.seq):
            sub = _rebuild_with(part, old, new, tirx, s_tir)
            if sub is not None:
                return tirx.SeqStmt(list(stmt.seq[:i]) + [sub] + list(stmt.seq[i + 1:]))
        return None
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _rebuild_with(stmt.block, old, new, tirx, s_tir)
        return None if block is None else s_tir.SBlockRealize(stmt.iter_values, stmt.predicate,
                                                              block)
    if isinstance(stmt, s_tir.SBlock):
        body = _rebuild_with(stmt.body, old, new, tirx, s_tir)
        return None if body is None else s_tir.SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init,
            stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return None


def apply_tuning_logs(log_dir, target) -> TunedKernels:
    """Load the tuning database in `log_dir` for `target` (see the module doc). Problems give a
    TuningLogWarning and an empty (or partial) TunedKernels: the compiler then uses the default
    kernels. A defaults.json with times that are not positive finite numbers raises ValueError
    (it would decide silently which records apply)."""
    from ..kernels import resolve_isa  # pylint: disable=import-outside-toplevel

    tgt = as_target(target)
    isa = resolve_isa(tgt)
    if log_dir is None:
        return TunedKernels(tgt, isa=isa)
    log_dir = os.fspath(log_dir)
    if not os.path.isdir(log_dir):
        warnings.warn(f"tuning logs {log_dir} not found; using the default kernels",
                      TuningLogWarning, stacklevel=2)
        return TunedKernels(tgt, isa=isa, log_dir=log_dir)
    try:
        db = open_database(log_dir)
        recs = records(db)
    except TuningLogError as e:
        warnings.warn(f"{e}; using the default kernels", TuningLogWarning, stacklevel=2)
        return TunedKernels(tgt, isa=isa, log_dir=log_dir)
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
        warnings.warn(f"tuning database in {log_dir} is unreadable ({type(e).__name__}: {e}); "
                      "using the default kernels", TuningLogWarning, stacklevel=2)
        return TunedKernels(tgt, isa=isa, log_dir=log_dir)
    want = target_key(tgt)
    best: dict = {}
    foreign: set = set()
    for gemm, rtgt, secs, rec in recs:
        if gemm is None or secs is None:
            continue
        if rtgt is None or target_key(rtgt) != want:
            foreign.add(target_str(rtgt) if rtgt is not None else "<no target>")
            continue
        K, O, dt, rows, w7 = gemm
        key = tuned_key(K, O, dt, w7)
        cur = best.get(key)
        # prefer the largest tuned row count (the batched case), then the fastest
        if cur is None or (rows, -secs) > (cur[0], -cur[1]):
            best[key] = (rows, secs, rec)
    defaults = read_defaults(log_dir).get(target_str(tgt), {})
    slower = []
    for key in list(best):
        rows, secs, _ = best[key]
        d = defaults.get(default_key(*key[:3], rows, len(key) == 4))
        if d is not None and secs >= d:
            slower.append(key)
            del best[key]   # the default kernel was faster when measured on the tuning machine
    if slower and not best:
        pass                # every tuned kernel lost to the default: nothing to warn about
    elif foreign and not best:
        warnings.warn(f"tuning database in {log_dir} has records only for "
                      f"{', '.join(sorted(foreign))}, not for {target_str(tgt)}; "
                      "using the default kernels", TuningLogWarning, stacklevel=2)
    elif not best:
        warnings.warn(f"tuning database in {log_dir} has no GEMM records; using the default "
                      "kernels", TuningLogWarning, stacklevel=2)
    tk = TunedKernels(tgt, best, isa=isa, log_dir=log_dir)
    tk.kept_default = sorted(slower)   # tuned keys whose default kernel beat the best record
    return tk
