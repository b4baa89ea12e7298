"""Latency of the integer LSTM kernels against PyTorch FP32 nn.LSTM, one thread.

    .venv/bin/python benchmarks/bench_kernels.py [--hidden 512 --input 256 --steps 64 --batch 1]
        [--w7] [--pieces 16] [--threads 1] [--compare-serial]

Measures, for one LSTM direction: the batched input projection (linear_requant to int16 over all
T*B rows) plus the fused recurrent kernel, each the median of several runs, after checking the
result bit for bit against the numpy reference; and torch.nn.LSTM(I, H) in FP32 on the same input
sizes with torch.set_num_threads(1). The machine is shared: the figures are medians, and the
script prints the load average so that a noisy run can be recognised.

--threads N sizes TVM's thread pool (TVM_NUM_THREADS; the threaded recurrent kernel and the
projection split their channel groups among the workers); --compare-serial also builds the
recurrent kernel's serial form (`lstm_recurrent(parallel=False)`) and times both in the same
interleaved rounds (where the threaded form applies: AVX2, packed, H % 8 == 0, H >= 16, tables
of <= 16 pieces); --pieces sets the size of the PWL tables (<= 8: one-register tables).
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

from tvm_intlstm.kernels import (build_kernel, gate_interleaved, host_target,  # noqa: E402
                                 linear_requant, lstm_recurrent, pack_pwl, prepare_weights,
                                 resolve_isa)
from tvm_intlstm.kernels._gemm import uses_u8  # noqa: E402
from tvm_intlstm.kernels.lstm import gate_order  # noqa: E402
from tvm_intlstm.quant.fixed_point import quantize_multiplier, quantize_multiplier_array  # noqa: E402
from tvm_intlstm.quant.pwl import fit_pwl  # noqa: E402
from tvm_intlstm.reference import ops  # noqa: E402


def make_params(H: int, I: int, pieces: int = 16, cell_frac: int = 11, seed: int = 0,
                wmax: int = 127):
    """A random but realistic integer LSTM direction (spec 8) with fitted PWL tables, weights in
    [-wmax, wmax] (64: weights that the u8 x s8 AVX2 kernel takes, QuantConfig(weight_bits=7))."""
    rng = np.random.default_rng(seed)
    G = 4 * H
    mx, sx = quantize_multiplier_array(rng.uniform(0.01, 0.1, G))
    mh, sh = quantize_multiplier_array(rng.uniform(0.01, 0.1, G))
    mo, so = quantize_multiplier(127 / 2**30)
    return ops.LSTMDirectionParams(
        w_x=rng.integers(-wmax, wmax + 1, (G, I)).astype(np.int8),
        w_h=rng.integers(-wmax, wmax + 1, (G, H)).astype(np.int8),
        bias=rng.integers(-2**16, 2**16, G).astype(np.int32),
        mx=mx, sx=sx, mh=mh, sh=sh, mo=int(mo), so=int(so), cell_frac=cell_frac,
        sig=fit_pwl("sigmoid", pieces, 12), tanh=fit_pwl("tanh", pieces, 12),
        tanh_c=fit_pwl("tanh", pieces, cell_frac))


def _time_us(fn, runs: int, inner: int) -> tuple[float, float]:
    """(median, min) microseconds per call over `runs` runs of `inner` calls."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times) * 1e6), float(np.min(times) * 1e6)


def bench(H=512, I=256, T=64, B=1, runs=15, inner=3, target=None, isa=None, check=True,
          verbose=True, w7=False, packed=True, pieces=16, compare_serial=False):
    tgt = target if target is not None else host_target()
    p = make_params(H, I, pieces=pieces, wmax=64 if w7 else 127)
    G = 4 * H
    t0 = time.perf_counter()
    isa = resolve_isa(tgt, isa)
    u8 = uses_u8(isa, w7, packed)
    gx_f = linear_requant(I, G, "int16", isa=isa, w7=w7, packed=packed)
    def recurrent(parallel):
        return lstm_recurrent(
            H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
            tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces, isa=isa, w7=w7,
            packed=packed, parallel=parallel)

    rec_f = recurrent(True)
    gx_k, rec_k = build_kernel(gx_f, tgt), build_kernel(rec_f, tgt)
    # the serial form, where the default is the threaded one
    ser_f = recurrent(False) if compare_serial and gate_interleaved(rec_f) else None
    ser_k = build_kernel(ser_f, tgt) if ser_f is not None else None
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (T, B, I)).astype(np.int8)
    nd = tvm.runtime.tensor
    x2 = nd(x.reshape(T * B, I))
    tabs = [nd(pack_pwl(t)) for t in (p.sig, p.tanh, p.tanh_c)]

    def wire(f, k):
        """(run the projection, run recurrent kernel k, its outputs) for the form f: the projection
        writes gx in f's gate order (its rows and constants permuted alike, `gate_order`)."""
        w_x, bias, _ = prepare_weights(gx_f, gate_order(f, p.w_x, axis=0), gate_order(f, p.bias))
        proj = [nd(w_x), nd(bias), nd(gate_order(f, p.mx)), nd(gate_order(f, p.sx))]
        gx = nd(np.zeros((T * B, G), np.int16))
        gx3 = gx._create_view((T, B, G))  # same memory: the recurrent kernel reads what gx wrote
        w_h, _, corr = prepare_weights(f, p.w_h)
        consts = [nd(w_h), nd(gate_order(f, p.mh)), nd(gate_order(f, p.sh)), nd(corr)]
        outs = (nd(np.zeros((T, B, H), np.int8)), nd(np.zeros((B, H), np.int8)),
                nd(np.zeros((B, H), np.int16)))
        return (lambda: gx_k(x2, *proj, gx)), (lambda: k(gx3, *consts, *tabs, *outs)), outs

    run_gx, run_rec, rec_outs = wire(rec_f, rec_k)
    run_gx()
    run_rec()
    outs = [rec_outs]
    if ser_k is not None:   # the serial form reads gx, W_h, mh, sh in the natural gate order
        run_gx_s, run_ser, ser_outs = wire(ser_f, ser_k)
        run_gx_s()
        run_ser()
        outs.append(ser_outs)
    exact = None
    if check:
        y_ref, h_ref, c_ref = ops.lstm_direction(x, p)
        exact = all(bool((a.numpy() == y_ref).all() and (h.numpy() == h_ref).all()
                         and (c.numpy() == c_ref).all()) for a, h, c in outs)
        if not exact:
            raise AssertionError("TVM kernels disagree with the numpy reference")

    def run_both():
        run_gx()
        run_rec()

    torch.set_num_threads(1)
    lstm = torch.nn.LSTM(I, H).eval()
    xf = torch.randn(T, B, I)

    def run_torch():
        with torch.no_grad():
            lstm(xf)

    run_torch()
    # interleave the measurements so that a change of machine load hits all of them alike
    fns = [("gx", run_gx), ("rec", run_rec), ("total", run_both), ("torch", run_torch)]
    if ser_k is not None:
        fns.insert(2, ("serial", run_ser))
    acc = {k: [] for k, _ in fns}
    for r in range(runs):
        # the order rotates from round to round: what ran just before (e.g. the projection writing
        # gx) changes the cache a kernel starts with
        for key, fn in fns[r % len(fns):] + fns[:r % len(fns)]:
            acc[key].append(_time_us(fn, 1, inner))
    med = {k: float(np.median([v[0] for v in vals])) for k, vals in acc.items()}
    best = {k: float(np.min([v[1] for v in vals])) for k, vals in acc.items()}
    # the per-round ratio (robust to load drifting between rounds)
    ser_ratio = (float(np.median([a[0] / b[0] for a, b in zip(acc["rec"], acc["serial"])]))
                 if ser_k is not None else None)

    res = dict(H=H, I=I, T=T, B=B, gx_us=med["gx"], recurrent_us=med["rec"],
               total_us=med["total"], per_step_us=med["rec"] / T, torch_fp32_us=med["torch"],
               min_us=best, build_s=build_s, exact=exact, isa=isa,
               threads=int(os.environ.get("TVM_NUM_THREADS", "0") or 0),
               threaded=gate_interleaved(rec_f), serial_us=med.get("serial"),
               threaded_vs_serial=ser_ratio, load=os.getloadavg())
    if verbose:
        print(f"LSTM {I}->{H}, T={T}, B={B}, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}, "
              f"target {tgt}, isa {res['isa']}, {pieces}-piece PWL tables"
              + (", u8 x s8 kernel (weights in [-64, 64])" if u8 else "")
              + (", packed weights" if packed else ", natural weight layout"))
        print(f"  bit-exact vs reference: {exact}; build {build_s:.1f} s")
        print(f"  {'':40s} {'median':>9s} {'min':>9s}  (us per call, {runs} runs)")
        rows = [("gx = linear_requant int16 " + f"({T * B}x{I}x{G})", "gx"),
                (f"recurrent kernel ({T} steps)" + (", default form" if res["threaded"] else ""),
                 "rec")]
        if ser_k is not None:
            rows.append(("recurrent kernel, serial form", "serial"))   # parallel=False
        rows += [("TVM integer total (gx + recurrent)", "total"), ("PyTorch FP32 nn.LSTM", "torch")]
        for label, key in rows:
            print(f"  {label:40s} {med[key]:9.1f} {best[key]:9.1f}")
        print(f"  recurrent per step: {med['rec'] / T:.1f} us (min {best['rec'] / T:.1f})")
        if ser_ratio is not None:
            print(f"  default (threaded) / serial form, per round: {ser_ratio:.3f} (median of {runs})")
        print(f"  PyTorch FP32 / TVM integer: {med['torch'] / med['total']:.2f}x (median), "
              f"{best['torch'] / best['total']:.2f}x (min); load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--target", default=None, help="default: this machine's CPU")
    ap.add_argument("--isa", default=None, choices=["generic", "avx2", "neon_dotprod"],
                    help="micro-kernel (default: from the target)")
    ap.add_argument("--w7", action="store_true",
                    help="weights in [-64, 64] (QuantConfig(weight_bits=7)): the u8 x s8 AVX2 kernel")
    ap.add_argument("--natural", action="store_true", help="weights in natural layout (not packed)")
    ap.add_argument("--pieces", type=int, default=16, help="pieces of the PWL tables (2..64)")
    ap.add_argument("--threads", type=int, default=None,
                    help="workers of TVM's thread pool (TVM_NUM_THREADS; default 1)")
    ap.add_argument("--compare-serial", action="store_true",
                    help="also time the recurrent kernel's serial form (parallel=False)")
    a = ap.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            ap.error("--threads must be >= 1")
        # read by TVM's pool when a kernel first runs, i.e. after this
        os.environ["TVM_NUM_THREADS"] = str(a.threads)
    bench(a.hidden, a.input, a.steps, a.batch, runs=a.runs, target=a.target, isa=a.isa, w7=a.w7,
          packed=not a.natural, pieces=a.pieces, compare_serial=a.compare_serial)


if __name__ == "__main__":
    main()
