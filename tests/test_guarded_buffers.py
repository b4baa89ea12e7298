"""Guarded buffers: every kernel generator, in every form, on every x86 target family, must write
its outputs and nothing else.

Each buffer a kernel gets (inputs and outputs) is a 64-byte-aligned view of the exact shape in the
middle of a larger numpy allocation whose bytes around it hold a known pattern; the view goes to
the kernel through DLPack (`tvm.runtime.from_dlpack`, zero-copy), so the kernel works on the
view's own memory (its outputs are read back from the views, which start out holding the pattern).
After each call every guard byte must be intact, every input unchanged, and every output equal to
the numpy reference (`tvm_intlstm.reference.ops`). Each case runs with two guard patterns (0xA5,
0x5A) so that a stray write of the pattern's own value cannot hide.

Target families: baseline x86-64, AVX2 (haswell, znver3), AVX-512 (skylake-avx512), AVX-512 VNNI
(icelake-server, znver4), AVX-512 FP16 / AMX (sapphirerapids; its default avx512_vnni kernels, and
the opt-in AMX tile kernels as "sapphirerapids-amx", plus those with emulated tiles as
"amx-emulated", which runs on any AVX-512 VNNI CPU, and the real AMX tile kernels' machine code as
"amx-trapped", run on an AVX-512 VNNI CPU without AMX with its tile instructions emulated by the
SIGILL handler of `tvm_intlstm.runtime.amx_trap`), and this machine's own -mcpu
(`kernels.host_target()`, what the compiler uses by default). A family runs when every CPU
feature LLVM enables for its -mcpu is in /proc/cpuinfo's flags (the CPU's name is never used);
otherwise its kernels are only compiled (test_compile_check; it passes, it is not a skip).
The threaded and parallel forms run on pools of 1 and 2 workers (on a 2-vCPU machine, where TVM's
pool has 1 worker unless TVM_NUM_THREADS says otherwise, the 2-worker runs happen in a child process:
test_guarded_two_workers). Which families ran and which were only compiled: test_family_summary (printed with -rA or -s, and
recorded as the `families` property) and the test ids (`run-...` / `compile-only-...`).

Forms: linear_i32 / linear_requant (int8 and int16 out) natural, packed, 7-bit (w7) natural and
packed, parallel, without bias, shift_hi, a baked per-tensor scale, generic; lstm_recurrent generic,
serial (natural, packed, 7-bit), threaded (parallel=True), reverse + init_state, the fast path
(shift_hi, folded PWL, baked gate shift); quantize_input, embedding (int64 / int32 ids), rescale_8,
residual_add, pwl_activation, layer_norm, layer_norm16, ln_lstm_recurrent (both directions),
softmax (static lengths and symbolic), attention_context, and the attention kernels
attention_dot, additive_scores, masked_softmax (int64 / int32 lengths, lengths -1 to S + 1), and
multi-head attention's per-head scores mha_scores (2 heads of 13 features).
The native forms use the target's own micro-kernel ISA (`kernels.resolve_isa`), the generic ones
run on every family. Shapes are odd on purpose: K = 13, 77; O = 19, 41; H = 20 (24 for the
threaded form, which needs H % 8 == 0); D = 13; rows 1, 3 and 17; softmax lengths 1, 5, 7, 9, 13,
33. Every kernel is built once per target (`_kernel`, cached). The whole file takes ~1.5 minutes
of one core.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import tvm

from tvm_intlstm import kernels as K
from tvm_intlstm.quant.fixed_point import (quantize_multiplier, quantize_multiplier15,
                                           quantize_multiplier_array, quantize_multiplier_pair)
from tvm_intlstm.quant.pwl import fit_pwl
from tvm_intlstm.reference import ops
from tvm_intlstm.runtime.amx_trap import TRAP_TARGET as AMX_TRAP_TARGET
from tvm_intlstm.runtime.amx_trap import emulate_amx, native_amx, runs_emulated
from tvm_intlstm.target import missing_host_features

from test_kernels import ref_recurrence

HOST_AMX = native_amx()
GUARD = 256                 # guard bytes on each side of a view (at least)
PATTERNS = (0xA5, 0x5A)
ROWS = (1, 3, 17)

# (family, target). The CPU features each needs are asked from LLVM (`K.has_feature`).
FAMILIES = [
    ("x86-64", "llvm -mcpu=x86-64"),
    ("haswell", "llvm -mcpu=haswell"),
    ("znver3", "llvm -mcpu=znver3"),
    ("skylake-avx512", "llvm -mcpu=skylake-avx512"),
    ("icelake-server", "llvm -mcpu=icelake-server"),
    ("znver4", "llvm -mcpu=znver4"),
    ("sapphirerapids", "llvm -mcpu=sapphirerapids"),
    ("alderlake", "llvm -mcpu=alderlake"),      # AVX-VNNI without AVX-512: the x86_vnni family
    # the opt-in AMX family (compile(kernels="amx")): runs only on a CPU with AMX; its tile kernels
    # with the tile instructions emulated in plain TIR (same addresses and epilogue) run on any
    # AVX-512 VNNI CPU
    ("sapphirerapids-amx", "llvm -mcpu=sapphirerapids"),
    ("amx-emulated", "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni"),
    # the amx family's tile kernels themselves (only those: its other kernels are avx512_vnni's;
    # its recurrent kernels take tiles at 17 rows, vpdpbusd at 1 and 3),
    # their tile instructions trapped and emulated where the CPU has no AMX (runtime/amx_trap.py)
    ("amx-trapped", AMX_TRAP_TARGET),
]
# families asked for explicitly (`kernels.isa.prefer`), not picked from the target's features
KERNELS = {"sapphirerapids-amx": "amx", "amx-emulated": "amx_emulated", "amx-trapped": "amx"}
if platform.machine().lower() in ("x86_64", "amd64"):   # what compile() picks on this machine
    FAMILIES.append(("host", f"llvm -mcpu={K.host_target().attrs['mcpu']}"))

@functools.lru_cache(maxsize=None)
def missing_features(target: str) -> tuple:
    """CPU features the family's code may use that this machine lacks (all of them off x86):
    `tvm_intlstm.target.missing_host_features`, the check `til.load` makes."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("not an x86-64 host",)
    missing = missing_host_features(target)
    if missing is None:
        return ("no /proc/cpuinfo flags",)
    if target == AMX_TRAP_TARGET and runs_emulated(target):   # AMX from the trap emulator
        missing = []
    return tuple(missing)


def tile_case(name: str) -> bool:
    """Does case `name` build an AMX tile kernel in the amx family (its packed linear kernels, and
    its packed recurrent kernels, whose steps of >= lstm.AMX_REC_ROWS rows run on tiles)?"""
    return ((name.startswith("linear") and "_packed" in name)
            or (name.startswith("lstm_") and ("_packed" in name or "_threaded" in name
                                            or "_zmm_cell" in name)))


def runnable(target: str) -> bool:
    return not missing_features(target)


def family_isa(fam: str, target: str) -> str:
    """The kernel family the generators use for FAMILIES entry `fam`."""
    with K.isa.prefer(KERNELS.get(fam)):
        return K.resolve_isa(target)


# --------------------------------------------------------------------------- guarded buffers

class Guarded:
    """A 64-byte-aligned view of `shape` inside a larger byte buffer filled with `pattern`."""

    def __init__(self, shape, dtype, pattern: int, fill=None):
        dt = np.dtype(dtype)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        self.pattern = pattern
        self.raw = np.full(self.nbytes + 2 * GUARD + 64, pattern, np.uint8)
        self.lo = GUARD + (-(self.raw.ctypes.data + GUARD)) % 64
        self.hi = self.lo + self.nbytes
        self.view = self.raw[self.lo:self.hi].view(dt).reshape(shape)
        assert self.view.ctypes.data % 64 == 0 and self.view.flags.c_contiguous
        if fill is not None:
            self.view[...] = fill
        self.tensor = tvm.runtime.from_dlpack(self.view)

    def damaged(self) -> list:
        """Offsets (relative to the view: < 0 before it, >= nbytes after it) of changed guard bytes."""
        before = np.nonzero(self.raw[:self.lo] != self.pattern)[0] - self.lo
        after = np.nonzero(self.raw[self.hi:] != self.pattern)[0] + self.nbytes
        return before.tolist() + after.tolist()


def run_guarded(kern, inputs, outs, pattern):
    """Call `kern` on guarded copies of `inputs` and guarded outputs `outs` = [(shape, dtype)];
    check guards and inputs, return the outputs (copies of the views)."""
    gin = [Guarded(a.shape, a.dtype, pattern, fill=a) for a in inputs]
    gout = [Guarded(s, d, pattern) for s, d in outs]
    kern(*[g.tensor for g in gin], *[g.tensor for g in gout])
    for i, g in enumerate(gin):
        assert not g.damaged(), f"input {i}: guard bytes changed at {g.damaged()[:16]}"
        np.testing.assert_array_equal(g.view, inputs[i], err_msg=f"input {i} was modified")
    for i, g in enumerate(gout):
        assert not g.damaged(), (f"output {i} {outs[i]}: guard bytes changed at offsets "
                                 f"{g.damaged()[:16]} (view is {g.nbytes} bytes)")
    return [g.view.copy() for g in gout]


# --------------------------------------------------------------------------- cases

@dataclass
class Case:
    """make(target) -> PrimFunc; calls(func, rng) -> [(inputs, [(shape, dtype)], [refs])]."""
    name: str
    make: Callable
    calls: Callable
    native: bool = False    # the target's own micro-kernel ISA (`resolve_isa`), not "generic"

    def applies(self, isa: str) -> bool:
        return not (self.native and isa == "generic")


def _linear_calls(K_, O, kind, w7, bias=True, scales="channel"):
    """scales: "channel" (per-channel M and s), "hi" (shifts in [32, 62], for shift_hi=True),
    "tensor" (one M and s, for scale=TENSOR_SCALE baked in)."""
    def calls(func, rng):
        hi = 64 if w7 else 127
        W = rng.integers(-hi, hi + 1, (O, K_)).astype(np.int8)
        W[0, :] = -hi
        b = rng.integers(-2**20, 2**20, O).astype(np.int32) if bias else None
        if scales == "tensor":
            M, s = np.full(O, TENSOR_SCALE[0], np.int32), np.full(O, TENSOR_SCALE[1], np.int32)
        elif scales == "hi":
            M = rng.integers(2**29, 2**31 - 1, O).astype(np.int32)
            s = rng.integers(36, 42, O).astype(np.int32)
        else:
            M, s = quantize_multiplier_array(rng.uniform(0.001, 0.02, O))
        Wk, bk, _ = K.prepare_weights(func, W, b)
        wargs = [Wk] + ([bk] if bias else [])
        out = []
        for n in ROWS:
            x = rng.integers(-128, 128, (n, K_)).astype(np.int8)
            x[0, :3] = [-128, 127, -128]
            if kind == "i32":
                out.append(([x] + wargs, [((n, O), "int32")], [ops.linear_acc(x, W, b)]))
            else:
                dt = "int8" if kind == "rq8" else "int16"
                ref = ops.requantize(ops.linear_acc(x, W, b), M, s, 8 if kind == "rq8" else 16)
                out.append(([x] + wargs + [M, s], [((n, O), dt)], [ref]))
        return out
    return calls


TENSOR_SCALE = quantize_multiplier(0.0071)


def _linear_cases():
    cases = []
    # every kind and form at K = 13, O = 19; the larger K (several k chunks) with int8 outputs
    # and O = 9 (a channel tail inside the first pair of 8-channel vectors, which the zmm epilogue
    # stores together: a lowering of that tail once wrote 7 bytes past each row on AVX-512)
    for K_, O, kinds in ((13, 19, ("i32", "rq8", "rq16")), (77, 41, ("rq8",)), (7, 9, ("rq8",))):
        for kind in kinds:
            forms = [("generic", dict(isa="generic"), False),
                     ("natural", dict(), True),
                     ("packed", dict(packed=True), True),
                     ("packed_w7", dict(packed=True, w7=True), True),
                     ("natural_w7", dict(w7=True), True),
                     ("packed_parallel", dict(packed=True, parallel=True), True)]
            if (K_, O) == (7, 9):
                forms = forms[2:4]
            if (K_, O) == (13, 19):
                forms += [("generic_nobias", dict(isa="generic", bias=False), False),
                          ("packed_nobias", dict(packed=True, bias=False), True)]
                if kind != "i32":
                    forms += [("packed_shift_hi", dict(packed=True, shift_hi=True), True),
                              ("packed_w7_tensor_scale", dict(packed=True, w7=True,
                                                              scale=TENSOR_SCALE), True),
                              ("generic_tensor_scale", dict(isa="generic", scale=TENSOR_SCALE),
                               False)]
            for fname, kw, native in forms:
                def make(target, K_=K_, O=O, kind=kind, kw=kw):
                    kw = dict(kw)
                    kw.setdefault("target", target)
                    if kind == "i32":
                        return K.linear_i32(K_, O, **kw)
                    return K.linear_requant(K_, O, "int8" if kind == "rq8" else "int16", **kw)
                scales = "tensor" if "scale" in kw else "hi" if kw.get("shift_hi") else "channel"
                cases.append(Case(f"linear_{kind}_{K_}x{O}_{fname}", make,
                                  _linear_calls(K_, O, kind, "w7" in fname, kw.get("bias", True),
                                                scales), native))
    return cases


@functools.lru_cache(maxsize=None)
def _table(func: str, pieces: int, in_frac: int):
    return fit_pwl(func, pieces, in_frac)


MO_SO = quantize_multiplier(127 / 2**30)


def _lstm_params(rng, H, w7=False, one_shift=False):
    G = 4 * H
    hi = 63 if w7 else 127
    if one_shift:     # gate_scale=(None, s) / shift_hi: per-channel M, one shift in [32, 62]
        mh = rng.integers(2**29, 2**31 - 1, G).astype(np.int32)
        sh = np.full(G, 37, np.int32)
    else:
        mh, sh = quantize_multiplier_array(rng.uniform(0.01, 0.1, G))
    mo, so = MO_SO
    return ops.LSTMDirectionParams(
        w_x=np.zeros((G, 1), np.int8),
        w_h=rng.integers(-hi, hi + 1, (G, H)).astype(np.int8),
        bias=np.zeros(G, np.int32), mx=np.zeros(G, np.int32), sx=np.zeros(G, np.int32),
        mh=mh, sh=sh, mo=int(mo), so=int(so), cell_frac=11,
        sig=_table("sigmoid", 16, 12), tanh=_table("tanh", 16, 12), tanh_c=_table("tanh", 16, 11))


def _ref_recurrence(gx, p, reverse=False, h0=None, c0=None):
    return list(ref_recurrence(gx, p, reverse, h0, c0))


def _lstm_cases():
    # (name, H, kwargs, native)
    forms = [
        ("generic", 20, dict(isa="generic"), False),
        ("generic_reverse_init", 20, dict(isa="generic", reverse=True, init_state=True), False),
        ("serial_natural", 20, dict(parallel=False), True),
        ("serial_packed", 20, dict(packed=True, parallel=False), True),
        ("serial_packed_w7_reverse_init", 20,
         dict(packed=True, w7=True, reverse=True, init_state=True, parallel=False), True),
        ("threaded", 24, dict(packed=True, parallel=True), True),
        # with the epilogue / cell options of the compiler's fast path (one gate shift in [32, 62]
        # baked in, folded PWL tables)
        ("threaded_w7_reverse_init_fast", 24,
         dict(packed=True, w7=True, reverse=True, init_state=True, parallel=True, shift_hi=True,
              pwl_fold=True, gate_scale=(None, 37)), True),
        # 48 units: on the AVX-512 families the serial forms' cell runs on 16-unit zmm blocks
        # (a pair of blocks and a last single one); with one worker the threaded form's steps too
        ("serial_packed_zmm_cell", 48, dict(packed=True, parallel=False, pwl_fold=True), True),
        ("threaded_zmm_cell_init", 48, dict(packed=True, parallel=True, init_state=True), True),
        # ... with the one-round piece index of the gates' tables (`pwl_bin_shift`: the cell's
        # tanh at cell_frac 11 keeps the two rounds)
        ("serial_zmm_cell_bins", 64, dict(packed=True, parallel=False, pwl_fold=True,
                                           pwl_bins=(10, 10, None)), True),
    ]
    cases = []
    for fname, H, kw, native in forms:
        w7 = bool(kw.get("w7"))
        one_shift = "gate_scale" in kw

        def make(target, H=H, kw=kw):
            kw = dict(kw)
            kw.setdefault("target", target)
            return K.lstm_recurrent(H, mo=MO_SO[0], so=MO_SO[1], cell_frac=11, **kw)

        def calls(func, rng, H=H, kw=kw, w7=w7, one_shift=one_shift):
            p = _lstm_params(rng, H, w7, one_shift)
            if kw.get("parallel") and K.isa.family(str(func.attrs["intlstm.isa"])).threaded:
                assert K.gate_interleaved(func), "expected the threaded form"
            wk, _, corr = K.prepare_weights(func, p.w_h)
            tabs = [K.pack_pwl(t) for t in (p.sig, p.tanh, p.tanh_c)]
            if kw.get("pwl_fold"):
                assert all(K.pwl_foldable(t) for t in tabs)
            if kw.get("pwl_bins"):
                assert tuple(K.pwl_bin_shift(t) for t in tabs) == kw["pwl_bins"]
            out = []
            # (batch 4 and 8: the taller recurrent row tiles of the AVX-512 VNNI family)
            for T_, B in ((1, 1), (3, 3), (1, 4), (2, 8), (2, 17)):
                gx = rng.integers(-2**15, 2**15, (T_, B, 4 * H)).astype(np.int16)
                ins = [K.gate_order(func, gx), wk, K.gate_order(func, p.mh),
                       K.gate_order(func, p.sh), corr] + tabs
                h0 = c0 = None
                if kw.get("init_state"):
                    h0 = rng.integers(-128, 128, (B, H)).astype(np.int8)
                    c0 = rng.integers(-2**15, 2**15, (B, H)).astype(np.int16)
                    ins += [h0, c0]
                outs = [((T_, B, H), "int8"), ((B, H), "int8"), ((B, H), "int16")]
                out.append((ins, outs, _ref_recurrence(gx, p, bool(kw.get("reverse")), h0, c0)))
            return out

        cases.append(Case(f"lstm_{fname}_H{H}", make, calls, native))
    return cases


QSCALE = 0.0371


def _quantize_calls(func, rng):
    out = []
    for n in ROWS:
        x = (rng.standard_normal((n, 13)) * 3).astype(np.float32)
        x[0, :4] = [1e9, -1e9, QSCALE * 2.5, -QSCALE * 2.5]
        out.append(([x], [((n, 13), "int8")], [ops.quantize_input(x, QSCALE)]))
    return out


def _embedding_calls(id_dtype):
    def calls(func, rng):
        table = rng.integers(-128, 128, (11, 13)).astype(np.int8)
        out = []
        for n in ROWS:
            ids = rng.integers(0, 11, n).astype(id_dtype)
            ids[0] = 10
            out.append(([ids, table], [((n, 13), "int8")], [ops.embedding(ids, table)]))
        return out
    return calls


RESCALE = quantize_multiplier(0.37)
RESID = quantize_multiplier_pair(0.8, 0.45)
LN = quantize_multiplier15(0.004)
ATT = quantize_multiplier(0.8 / 2**15)
SMAX = quantize_multiplier(2**10 / 3000.0)


def _rescale_calls(func, rng):
    M, s = RESCALE
    xs = [rng.integers(-128, 128, (n, 13)).astype(np.int8) for n in ROWS]
    return [([x], [(x.shape, "int8")], [ops.requantize(x, M, s, 8)]) for x in xs]


def _residual_calls(func, rng):
    Ma, Mb, s = RESID
    out = []
    for n in ROWS:
        a, b = (rng.integers(-128, 128, (n, 13)).astype(np.int8) for _ in range(2))
        out.append(([a, b], [((n, 13), "int8")], [ops.residual_add(a, b, Ma, Mb, s)]))
    return out


def _pwl_calls(func, rng):
    t = _table("tanh", 16, 12)
    out = []
    for n in ROWS + (37,):
        x = rng.integers(-2**15, 2**15, n).astype(np.int16)
        out.append(([x, K.pack_pwl(t)], [((n,), "int16")], [ops.pwl(x, t).astype(np.int16)]))
    return out


def _layer_norm_calls(func, rng):
    Ml, sl = LN
    gamma = rng.integers(-32767, 32768, 13).astype(np.int16)
    beta = rng.integers(-2**30, 2**30, 13).astype(np.int64)
    out = []
    for n in ROWS:
        x = rng.integers(-128, 128, (n, 13)).astype(np.int8)
        out.append(([x, gamma, beta], [((n, 13), "int8")], [ops.layer_norm(x, gamma, beta, Ml, sl)]))
    return out


def _layer_norm16_calls(func, rng):
    Ml, sl = LN
    gamma = rng.integers(-32768, 32768, (4, 13)).astype(np.int16)
    beta = rng.integers(-2**40, 2**40, (4, 13)).astype(np.int64)
    out = []
    for n in ROWS:
        x = rng.integers(-2**15, 2**15, (n, 4, 13)).astype(np.int16)
        out.append(([x, gamma, beta], [((n, 4, 13), "int16")],
                    [ops.layer_norm16(x, gamma, beta, Ml, sl, 9)]))
    return out


LN_LSTM_SEED = 2024


def _ln_lstm_params(rng, H):
    G = 4 * H
    mh, sh = quantize_multiplier_array(rng.uniform(0.01, 0.5, G))

    def ln(D):
        Ml, sl = quantize_multiplier15(rng.uniform(1e-5, 1e-4))
        return ops.LayerNorm16Params(rng.integers(-32768, 32768, D).astype(np.int16),
                                     rng.integers(-2**30, 2**30, D).astype(np.int64), Ml, sl, 5)

    mo, so = quantize_multiplier(127 / 2**30)
    return ops.LNLSTMDirectionParams(
        w_x=np.zeros((G, 1), np.int8), w_h=rng.integers(-127, 128, (G, H)).astype(np.int8),
        mx=np.ones(G, np.int32), sx=np.ones(G, np.int32), mh=mh, sh=sh, ln_x=ln(G), ln_h=ln(G),
        ln_c=ln(H), mo=int(mo), so=int(so), cell_frac=11, sig=_table("sigmoid", 16, 12),
        tanh=_table("tanh", 16, 12), tanh_c=_table("tanh", 16, 12))


def _ln_lstm_calls(reverse):
    H = 13

    def calls(func, rng):
        p = _ln_lstm_params(np.random.default_rng(LN_LSTM_SEED), H)   # the kernel's constants
        out = []
        for B in ROWS:
            gx = rng.integers(-2**15, 2**15, (3, B, 4 * H)).astype(np.int16)
            h0 = rng.integers(-128, 128, (B, H)).astype(np.int8)
            c0 = rng.integers(-2**15, 2**15, (B, H)).astype(np.int16)
            h, c, ys = h0, c0, np.zeros((3, B, H), np.int8)
            for t in ((2, 1, 0) if reverse else (0, 1, 2)):
                h, c = ops.ln_lstm_cell(gx[t], h, c, p)
                ys[t] = h
            wk, _, corr = K.prepare_weights(func, p.w_h)     # (packed for the family's GEMM)
            ins = [gx, wk, p.mh, p.sh] + ([corr] if K.kernel_convention(func)[0] else []) + [
                   p.ln_h.gamma.reshape(4, H), p.ln_h.beta.reshape(4, H),
                   p.ln_c.gamma.reshape(1, H), p.ln_c.beta.reshape(1, H), K.pack_pwl(p.sig),
                   K.pack_pwl(p.tanh), K.pack_pwl(p.tanh_c), h0, c0]
            out.append((ins, [((3, B, H), "int8"), ((B, H), "int8"), ((B, H), "int16")],
                        [ys, h, c]))
        return out
    return calls


def _ln_lstm_kernel(reverse, packed=False):
    # the kernel bakes its constants (mo, so, the layer norms' Ml, sl, E): the calls draw their
    # parameters from a generator of the same seed. packed: the family's outer-product GEMM for
    # the recurrent product (on its u8 route where it has one exact for W_h)
    def make(target):
        p = _ln_lstm_params(np.random.default_rng(LN_LSTM_SEED), 13)
        kw = {}
        if packed:
            kw = dict(target=target, packed=True,
                      w7=K.weights_fit_u8(p.w_h, K.resolve_isa(target)))
        return K.ln_lstm_recurrent(13, mo=p.mo, so=p.so, cell_frac=p.cell_frac,
                                   ln_h=(p.ln_h.ml, p.ln_h.sl, p.ln_h.eps),
                                   ln_c=(p.ln_c.ml, p.ln_c.sl, p.ln_c.eps), reverse=reverse, **kw)
    return make


def _softmax_calls(pieces, lengths):
    def calls(func, rng):
        t = _table("exp", pieces, 10)
        Mz, sz = SMAX
        out = []
        for L in lengths:
            for n in ROWS:
                z = rng.integers(-30000, 30000, (n, L)).astype(np.int32)
                out.append(([z, K.pack_pwl(t)], [((n, L), "int16")], [ops.softmax(z, Mz, sz, t)]))
        return out
    return calls


def _attention_calls(func, rng):
    Mc, sc = ATT
    t = _table("exp", 16, 10)
    Mz, sz = SMAX
    out = []
    for B, Q, L in ((1, 1, 1), (3, 2, 5), (17, 3, 9)):
        p = ops.softmax(rng.integers(-20000, 20000, (B, Q, L)).astype(np.int32), Mz, sz, t)
        v = rng.integers(-128, 128, (B, L, 13)).astype(np.int8)
        out.append(([p, v], [((B, Q, 13), "int8")], [ops.attention_context(p, v[:, None], Mc, sc)]))
    return out


def _other_cases():
    cases = [
        Case("quantize_input_13", lambda tg: K.quantize_input(13, QSCALE), _quantize_calls),
        Case("embedding_int64", lambda tg: K.embedding(11, 13, "int64"), _embedding_calls("int64")),
        Case("embedding_int32", lambda tg: K.embedding(11, 13, "int32"), _embedding_calls("int32")),
        Case("rescale_8_13", lambda tg: K.rescale_8(13, *RESCALE), _rescale_calls),
        Case("residual_add_13", lambda tg: K.residual_add(13, *RESID), _residual_calls),
        Case("pwl_activation_16", lambda tg: K.pwl_activation(16), _pwl_calls),
        Case("layer_norm_13", lambda tg: K.layer_norm(13, *LN), _layer_norm_calls),
        Case("layer_norm16_4x13", lambda tg: K.layer_norm16(4, 13, *LN, 9), _layer_norm16_calls),
        Case("ln_lstm_recurrent_13", _ln_lstm_kernel(False), _ln_lstm_calls(False)),
        Case("ln_lstm_recurrent_13_reverse", _ln_lstm_kernel(True), _ln_lstm_calls(True)),
        Case("ln_lstm_recurrent_13_packed", _ln_lstm_kernel(False, True), _ln_lstm_calls(False)),
        Case("ln_lstm_recurrent_13_packed_reverse", _ln_lstm_kernel(True, True), _ln_lstm_calls(True)),
        Case("attention_context_13", lambda tg: K.attention_context(13, *ATT), _attention_calls),
        Case("softmax_symbolic", lambda tg: K.softmax(16, *SMAX), _softmax_calls(16, (1, 5, 7, 33))),
    ]
    for pieces, L in ((16, 1), (16, 5), (16, 7), (16, 9), (16, 13), (16, 33), (8, 9), (24, 13)):
        cases.append(Case(f"softmax_p{pieces}_L{L}", lambda tg, pieces=pieces, L=L:
                          K.softmax(pieces, *SMAX, length=L), _softmax_calls(pieces, (L,))))
    return cases


CASES = {c.name: c for c in _linear_cases() + _lstm_cases() + _other_cases()}


# attention kernels (issue 18 item 3; kernels/attention.py): scores and the masked softmax


def _attention_dot_calls(func, rng):
    out = []
    for B, Q, S in ((1, 1, 1), (3, 2, 5), (17, 1, 9)):
        q = rng.integers(-128, 128, (B, Q, 13)).astype(np.int8)
        k = rng.integers(-128, 128, (B, S, 13)).astype(np.int8)
        out.append(([q, k], [((B, Q, S), "int32")], [ops.attention_dot(q, k)]))
    return out


def _additive_scores_calls(func, rng):
    t = K.pack_pwl(_table("tanh", 16, 12))
    v = rng.integers(-127, 128, 13).astype(np.int8)
    out = []
    for B, Q, S in ((1, 1, 1), (3, 2, 5), (17, 1, 9)):
        qx = rng.integers(-2**15, 2**15, (B, Q, 13)).astype(np.int16)
        kx = rng.integers(-2**15, 2**15, (B, S, 13)).astype(np.int16)
        out.append(([qx, kx, v, t], [((B, Q, S), "int32")], [ops.additive_scores(qx, kx, v, t)]))
    return out


def _masked_softmax_calls(len_dtype):
    def calls(func, rng):
        t = _table("exp", 16, 10)
        Mz, sz = SMAX
        out = []
        for B, R, S in ((1, 1, 1), (3, 2, 5), (17, 1, 7), (3, 1, 9), (2, 3, 13), (3, 1, 33)):
            z = rng.integers(-30000, 30000, (B, R, S)).astype(np.int32)
            lengths = rng.integers(-1, S + 2, B).astype(len_dtype)
            lengths[0] = S
            out.append(([z, lengths, K.pack_pwl(t)], [((B, R, S), "int16")],
                        [ops.masked_softmax(z, lengths, Mz, sz, t)]))
        return out
    return calls


def _mha_scores_calls(func, rng):
    out = []
    for B, Q, S in ((1, 1, 1), (3, 2, 5), (17, 1, 9)):
        q = rng.integers(-128, 128, (B, Q, 26)).astype(np.int8)
        k = rng.integers(-128, 128, (B, S, 26)).astype(np.int8)
        out.append(([q, k], [((B, 2, Q, S), "int32")], [ops.mha_scores(q, k, 2)]))
    return out


def _attention_kernel_cases():
    from tvm_intlstm.kernels import attention as KA
    return [
        Case("attention_dot_13", lambda tg: KA.attention_dot(13), _attention_dot_calls),
        Case("additive_scores_13", lambda tg: KA.additive_scores(13, 16), _additive_scores_calls),
        Case("masked_softmax_int64", lambda tg: KA.masked_softmax(16, *SMAX, "int64"), _masked_softmax_calls("int64")),
        Case("masked_softmax_int32", lambda tg: KA.masked_softmax(16, *SMAX, "int32"), _masked_softmax_calls("int32")),
        Case("mha_scores_26_h2", lambda tg: KA.mha_scores(26, 2), _mha_scores_calls),
    ]


CASES.update({c.name: c for c in _attention_kernel_cases()})


def _params(want_runnable: bool):
    out = []
    for fam, target in FAMILIES:
        if runnable(target) != want_runnable:
            continue
        isa = family_isa(fam, target)
        for name, case in CASES.items():
            if case.applies(isa) and (target != AMX_TRAP_TARGET or tile_case(name)):
                out.append(pytest.param(fam, name, id=f"{'run' if want_runnable else 'compile-only'}"
                                                     f"-{fam}-{name}"))
    return out


_TARGETS = dict(FAMILIES)
_BUILT: dict = {}


def _kernel(fam: str, name: str):
    """(PrimFunc, Kernel) of case `name` for family `fam`, built once."""
    key = (fam, name)
    if key not in _BUILT:
        tgt = K.as_target(_TARGETS[fam])
        with K.isa.prefer(KERNELS.get(fam)):
            func = CASES[name].make(tgt)
        _BUILT[key] = (func, K.build_kernel(func, tgt))
    return _BUILT[key]


_RAN: dict = {}


@pytest.mark.parametrize("fam,name", _params(True) or
                         [pytest.param(None, None, id="no-runnable-family")])
def test_guarded_run(fam, name, record_property):
    if fam is None:
        # off x86 (or without /proc/cpuinfo) nothing runs here; test_compile_check covers every
        # family and test_family_summary says so
        return
    func, kern = _kernel(fam, name)
    record_property("family", f"{fam} (run)")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    calls = CASES[name].calls(func, rng)
    # the threaded recurrent kernels schedule differently on a pool of one worker and of several,
    # and the parallel linear kernels split their channel groups: both pool sizes are run (TVM's
    # pool resized for the call, restored after) where this process's pool can have 2 workers;
    # else the 2-worker runs are test_guarded_two_workers' (a child process with TVM_NUM_THREADS=2)
    pools = ((1, 2) if "GUARDED_POOLS" not in os.environ else
             tuple(int(w) for w in os.environ["GUARDED_POOLS"].split(","))) \
        if multi_worker_case(name) else (None,)
    num = tvm.get_global_func("runtime.NumThreads")
    config = tvm.get_global_func("runtime.config_threadpool")
    before = int(num())
    ran_pools = []
    trapped = _TARGETS[fam] == AMX_TRAP_TARGET
    try:
        with emulate_amx() if trapped else contextlib.nullcontext() as trap:
            for workers in pools:
                if workers is not None:
                    config(0, workers)
                    if int(num()) != workers:
                        # TVM sized its pool at start (TVM_NUM_THREADS, else half the hardware
                        # threads): a child process with TVM_NUM_THREADS=2 runs these
                        # (tuning/bench.py sets TVM_NUM_THREADS=1 for the processes importing it)
                        env_n = os.environ.get("TVM_NUM_THREADS")
                        assert env_n is None or int(env_n) < workers, \
                            f"TVM_NUM_THREADS={env_n} but {int(num())} workers"
                        continue
                ran_pools.append(workers)
                for inputs, outs, refs in calls:
                    for pattern in PATTERNS:
                        got = run_guarded(kern, inputs, outs, pattern)
                        for i, (g, r) in enumerate(zip(got, refs)):
                            np.testing.assert_array_equal(
                                g, r, err_msg=f"{fam} {name} output {i} shape {outs[i][0]} "
                                             f"pattern {pattern:#x} workers {workers}")
            # the tile instructions did run (emulated, unless this CPU has AMX); the threaded
            # recurrent form's multi-worker steps are vpdpbusd ones (lstm.py)
            if trapped and not (name.startswith("lstm_threaded") and ran_pools == [2]):
                assert K.uses_amx(func)
                if not HOST_AMX:
                    assert trap.counts()["tdpbxxd"] > 0 and trap.counts()["tilestored"] > 0
    finally:
        config(0, before)
    _RAN[(fam, name)] = len(calls) * len(PATTERNS) * len(ran_pools)


def multi_worker_case(name: str) -> bool:
    """Cases whose kernels divide work among TVM's thread pool (threaded recurrent forms, parallel
    linear forms): run on pools of 1 and 2 workers."""
    return name.startswith("lstm_threaded") or "_parallel" in name


def test_guarded_two_workers():
    """The multi-worker cases on a pool of 2 workers. TVM sizes its pool once per process (from
    TVM_NUM_THREADS, else half the hardware threads: 1 on a 2-vCPU machine), so where this process
    cannot have 2 workers the cases run in a child pytest with TVM_NUM_THREADS=2 (one target per
    kernel family this CPU runs, ~30 s); where it can, test_guarded_run has run them already."""
    num = tvm.get_global_func("runtime.NumThreads")
    config = tvm.get_global_func("runtime.config_threadpool")
    before = int(num())
    config(0, 2)
    two = int(num()) == 2
    config(0, before)
    if two:
        return      # test_guarded_run runs both pool sizes in this process
    # one target per kernel family (this machine's own for its family), only the 2-worker pool
    fams, seen = [], set()
    for fam, target in sorted(FAMILIES, key=lambda ft: ft[0] != "host"):
        isa = family_isa(fam, target)
        if runnable(target) and isa not in seen:
            seen.add(isa)
            fams.append(fam)
    # (the threaded recurrent forms, and of the parallel linear forms the one with several
    # channel groups per worker in every family)
    ids = [p.id for p in _params(True) if p.values[0] in fams and multi_worker_case(p.values[1])
           and (p.values[1].startswith("lstm_threaded") or "77x41" in p.values[1])]
    assert ids, "no multi-worker case runs on this CPU"
    import subprocess
    import sys
    env = dict(os.environ, TVM_NUM_THREADS="2", GUARDED_POOLS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(f"{__file__}::test_guarded_run[{i}]" for i in ids)],
        capture_output=True, text=True, env=env, timeout=1800, cwd=os.path.dirname(__file__))
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert f"{len(ids)} passed" in proc.stdout, tail
    print(f"\n{len(ids)} multi-worker cases ({', '.join(fams)}) run guarded on 2 workers in a "
          "child process")


@pytest.mark.parametrize("fam,name", _params(False) or
                         [pytest.param(None, None, id="every-family-runs-here")])
def test_compile_check(fam, name, record_property):
    """A family this CPU cannot execute: its kernels must still build (they are not run)."""
    if fam is None:
        return
    func, kern = _kernel(fam, name)
    record_property("family", f"{fam} (compile-only: lacks {', '.join(missing_features(_TARGETS[fam]))})")
    assert kern.module.implements_function(kern.name)
    if K.uses_amx(func):     # an AMX tile kernel: its tile instructions are there
        asm = kern.module.inspect_source("asm")
        assert "tdpbssd" in asm and "ldtilecfg" in asm and "tilerelease" in asm


def test_family_summary(record_property):
    """Which families run here and which are only compiled (with -rA or -s this is printed)."""
    lines = []
    for fam, target in FAMILIES:
        isa = family_isa(fam, target)
        n = sum(c.applies(isa) for c in CASES.values())
        if target == AMX_TRAP_TARGET:
            n = sum(c.applies(isa) and tile_case(name) for name, c in CASES.items())
        how = ("; tile instructions emulated (runtime/amx_trap.py)"
               if target == AMX_TRAP_TARGET and not HOST_AMX else "")
        if runnable(target):
            lines.append(f"  run           {fam:16s} ({target}, isa {isa}): {n} kernels{how}")
        else:
            lines.append(f"  compile-only  {fam:16s} ({target}, isa {isa}): {n} kernels; "
                         f"CPU lacks {', '.join(missing_features(target))}")
    n_run = len(_params(True))
    n_compile = len(_params(False))
    lines.append(f"  {n_run} (family, kernel) cases run guarded, {n_compile} compile-only; "
                 f"{sum(_RAN.values())} guarded calls in this session")
    text = "guarded-buffer families on this machine:\n" + "\n".join(lines)
    print(text)
    record_property("families", text)
    if platform.machine().lower() in ("x86_64", "amd64") and missing_host_features("llvm") is not None:
        assert runnable("llvm -mcpu=x86-64"), "an x86-64 host must run the baseline family"
