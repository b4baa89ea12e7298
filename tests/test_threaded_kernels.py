"""The threaded forms: the recurrent kernel with its time loop run by every worker of TVM's thread
pool (channel groups split among them, a barrier per step; `kernels.lstm`, parallel=True) and the
parallel input projection (`linear_requant(parallel=True)`). Bit for bit against the numpy
reference, in this process (the pool's default size) and in subprocesses with 2 and 3
workers (3 workers split 5 channel groups 2 / 2 / 1)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tvm_intlstm import kernels as K
from tvm_intlstm.kernels.lstm import interleave_gates
from tvm_intlstm.reference import ops

from test_kernels import (HOST_ISA, TARGET, assert_lstm_equal, build, make_lstm, ref_recurrence,
                          run, run_recurrent)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
avx2_only = pytest.mark.skipif(not K.isa.family(HOST_ISA).threaded, reason="the threaded forms are x86 kernels")


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(4242)


def _recurrent(p, *, w7, reverse=False, init_state=False, parallel=True):
    return K.lstm_recurrent(p.hidden, mo=p.mo, so=p.so, cell_frac=p.cell_frac,
                            sig_pieces=p.sig.pieces, tanh_pieces=p.tanh.pieces,
                            tanh_c_pieces=p.tanh_c.pieces, reverse=reverse, init_state=init_state,
                            target=TARGET, w7=w7, packed=True, parallel=parallel)


def test_interleave_gates_layout(rng):
    H, Kd = 24, 5
    W = rng.integers(-127, 128, (4 * H, Kd)).astype(np.int8)
    Wi = interleave_gates(W)
    gx = rng.integers(-99, 99, (3, 2, 4 * H))
    gi = interleave_gates(gx, axis=2)
    for j in range(H // 8):
        for g in range(4):
            for lane in range(8):
                np.testing.assert_array_equal(Wi[32 * j + 8 * g + lane], W[g * H + 8 * j + lane])
                np.testing.assert_array_equal(gi[..., 32 * j + 8 * g + lane], gx[..., g * H + 8 * j + lane])
    with pytest.raises(ValueError, match="H % 8"):
        interleave_gates(np.zeros((4 * 20, 3), np.int8))


@avx2_only
@pytest.mark.parametrize("w7", [True, False])
def test_prepare_weights_follows_the_form(rng, w7):
    """The threaded kernel takes W_h gate-interleaved then packed, its u8 correction in the natural
    row order (indexed by gate channel); the serial form (parallel=False) the natural rows."""
    from tvm_intlstm.kernels._gemm import pack_outer, u8_correction
    hi = 63 if w7 else 127
    p = make_lstm(rng, 32, 8, w_h=rng.integers(-hi, hi + 1, (128, 32)).astype(np.int8))
    threaded, serial = _recurrent(p, w7=w7), _recurrent(p, w7=w7, parallel=False)
    assert K.gate_interleaved(threaded) and not K.gate_interleaved(serial)
    wk, _, corr = K.prepare_weights(threaded, p.w_h)
    np.testing.assert_array_equal(wk, pack_outer(interleave_gates(p.w_h), w7, 4))
    np.testing.assert_array_equal(corr, interleave_gates(u8_correction(p.w_h)) if w7
                                  else np.zeros(128, np.int32))
    gx = rng.integers(-9, 9, (2, 3, 128))
    np.testing.assert_array_equal(K.gate_order(threaded, gx), interleave_gates(gx, axis=2))
    np.testing.assert_array_equal(K.gate_order(serial, gx), gx)
    ws, _, _ = K.prepare_weights(serial, p.w_h)
    np.testing.assert_array_equal(ws, pack_outer(p.w_h, w7, 4))
    # too small to split (one channel group) or H % 8 != 0: the serial form
    for H in (8, 20):
        q = make_lstm(rng, H, 8)
        assert not K.gate_interleaved(_recurrent(q, w7=False))


@avx2_only
@pytest.mark.parametrize("H,w7,reverse,init_state", [
    (32, True, False, False), (32, False, True, True), (40, True, True, False),
    (40, False, False, True)])
def test_threaded_recurrence(rng, H, w7, reverse, init_state):
    """Odd and even T (the source double buffer's parity, also in reverse), batch 1 (1-row tiles),
    even and odd batches (2-row tiles with a row tail), 4 and 5 channel groups, input gates over the
    whole int16 range, the serial form alongside."""
    hi = 63 if w7 else 127
    p = make_lstm(rng, H, 8, w_h=rng.integers(-hi, hi + 1, (4 * H, H)).astype(np.int8))
    f = _recurrent(p, w7=w7, reverse=reverse, init_state=init_state)
    fs = _recurrent(p, w7=w7, reverse=reverse, init_state=init_state, parallel=False)
    kern, kern_s = build(f), build(fs)
    for T_, B in ((1, 1), (4, 1), (5, 3), (4, 8), (3, 2)):
        gx = rng.integers(-2**15, 2**15, (T_, B, 4 * H)).astype(np.int16)
        gx[0, 0, :4] = [-32768, 32767, -32768, 32767]
        st = {}
        if init_state:
            st = dict(h0=rng.integers(-128, 128, (B, H)).astype(np.int8),
                      c0=rng.integers(-2**15, 2**15, (B, H)).astype(np.int16))
        ref = ref_recurrence(gx, p, reverse=reverse, **st)
        assert_lstm_equal(run_recurrent(f, kern, p, gx, **st), ref)
        assert_lstm_equal(run_recurrent(fs, kern_s, p, gx, **st), ref)


_WORKERS_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    import numpy as np
    from tvm_intlstm import kernels as K
    from test_kernels import assert_lstm_equal, make_lstm, ref_recurrence, run_recurrent
    from test_threaded_kernels import _recurrent
    rng = np.random.default_rng(7)
    H = 40   # 5 channel groups
    for w7 in (True, False):
        hi = 63 if w7 else 127
        p = make_lstm(rng, H, 8, w_h=rng.integers(-hi, hi + 1, (4 * H, H)).astype(np.int8))
        f = _recurrent(p, w7=w7)
        assert K.gate_interleaved(f)
        kern = K.build_kernel(f, K.host_target())
        for T_, B in ((6, 1), (3, 5)):
            gx = rng.integers(-2**15, 2**15, (T_, B, 4 * H)).astype(np.int16)
            assert_lstm_equal(run_recurrent(f, kern, p, gx), ref_recurrence(gx, p))
    print("exact")
""")


@avx2_only
@pytest.mark.parametrize("workers", [2, 3])
def test_threaded_recurrence_worker_counts(workers):
    env = dict(os.environ, TVM_NUM_THREADS=str(workers))
    r = subprocess.run([sys.executable, "-c", _WORKERS_SCRIPT, ROOT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("exact"), r.stdout + r.stderr


@avx2_only
@pytest.mark.parametrize("w7", [True, False])
def test_parallel_projection(rng, w7):
    """linear_requant(parallel=True): the channel groups split among the workers; same results as
    the reference for row counts below, at and above the register tile, and a channel tail."""
    Kd, O = 70, 200
    hi = 63 if w7 else 127
    W = rng.integers(-hi, hi + 1, (O, Kd)).astype(np.int8)
    b = rng.integers(-2**20, 2**20, O).astype(np.int32)
    M = rng.integers(2**30, 2**31 - 1, O).astype(np.int32)
    s = np.full(O, 38, np.int32)
    f = K.linear_requant(Kd, O, "int16", target=TARGET, w7=w7, packed=True, parallel=True)
    assert "parallel" in f.script()
    kern = build(f)
    wk, bk, _ = K.prepare_weights(f, W, b)
    for N in (1, 4, 63):
        x = rng.integers(-128, 128, (N, Kd)).astype(np.int8)
        got = run(kern, [x, wk, bk, M, s], [((N, O), "int16")])
        np.testing.assert_array_equal(got, ops.requantize(ops.linear_acc(x, W, b), M, s, 16))


# --------------------------------------------------------------------------- which form compile picks

def test_threaded_forms_decision():
    """The thread-pool kernels only when threads were asked for (and the constants allow it)."""
    from tvm_intlstm.passes.lower_lstm import threaded_forms
    assert not threaded_forms(False, True) and not threaded_forms(False, False)
    assert threaded_forms(True, True) and not threaded_forms(True, False)


@avx2_only
def test_compile_picks_serial_unless_threads():
    """compile() builds a module that never uses the thread pool (serial recurrent kernel, serial
    input projection) unless threads=True (threaded recurrent form, parallel projection); both
    bit-exact. A barrier per step collapses on a loaded machine (docs/compiler.md "Threads")."""
    import torch
    from torch import nn

    import tvm_intlstm as til

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(12, 24)

        def forward(self, x):
            return self.lstm(x)[0]

    torch.manual_seed(7)
    q = til.quantize(M().eval(), [torch.randn(6, 2, 12)])
    ref = til.reference(q)
    x = torch.randn(5, 3, 12)
    for threads in (False, True):
        cm = til.compile(q, TARGET, (x,), verbose=False, threads=threads)
        funcs = dict((gv.name_hint, f) for gv, f in cm.ir_module.functions_items())
        rec = [f for n, f in funcs.items() if n.startswith("lstm_recurrent")]
        proj = [f for n, f in funcs.items() if n.startswith("linear_requant")]
        assert len(rec) == 1 and len(proj) == 1, sorted(funcs)
        assert K.gate_interleaved(rec[0]) == threads
        assert ("T.parallel" in rec[0].script()) == threads
        assert ("T.parallel" in proj[0].script()) == threads
        np.testing.assert_array_equal(cm(x.numpy()), ref(x.numpy()))
