"""Fused QAT LSTM time loop (QuantConfig(qat_lstm="fused"), the default).

`QuantLSTM.forward_fake` with `qat_lstm="loop"` runs a Python loop over time with some forty small
torch ops per step (and as many autograd nodes). The fused path runs the whole loop of one layer
direction in one C++ forward call and one C++ backward call (tvm_intlstm/nn/qat_lstm.cpp), wrapped in
a torch.autograd.Function: per step one exact int8 product for the recurrent part (at::_int_mm; the
loop path computes the same exact value, fake_quant.RecurrentProduct) and one vectorised pass over
the gates that fuses the fake quantization of the input part and of the recurrent product, the PWL
activations, the cell update and the hidden fake quantization. The forward saves, per unit and
step, the grid values and straight-through factors the backward needs (22 bytes); the backward runs
the per-step dh products and forms the recurrent weight gradient in one product.

Same numerics as the loop: forward values bit for bit (same float32 operations in the same order),
gradients to float rounding (summation orders differ). The input projection (its forward is the
loop's expression; InputProjection), the weight fake quantization and everything outside the
recurrence stay ordinary torch ops.

The extension is compiled at first use with the system C++ compiler (`$CXX` or g++, flags
below, linked against the installed torch; ~10 s) into ~/.cache/tvm_intlstm (or $TVM_INTLSTM_CACHE)
and reused afterwards; no network or ninja needed. If it cannot be built, QAT falls back to the loop
with a warning. The kernels parallelise over the batch through torch's intra-op pool and the
products use torch's oneDNN/BLAS, so `torch.set_num_threads` applies as for float training.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("qat_lstm.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
          "-fPIC", "-shared", "-std=c++17", "-w"]
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    d = os.environ.get("TVM_INTLSTM_CACHE")
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tvm_intlstm"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    from torch.utils import cpp_extension as ce
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++ or set $CXX)")
    src = _SRC.read_bytes()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libdirs = ce.library_paths()
    cmd = [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in ce.include_paths()]]
    key = hashlib.sha256(b"\0".join([src, " ".join(cmd).encode(), torch.__version__.encode(),
                                     sys.version.encode(), platform.machine().encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"qat_lstm_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        full = [*cmd, str(_SRC), "-o", str(tmp_so), *[f"-L{p}" for p in libdirs],
                *[f"-Wl,-rpath,{p}" for p in libdirs], "-lc10", "-ltorch_cpu", "-ltorch"]
        r = subprocess.run(full, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {_SRC.name} failed:\n{' '.join(full)}\n{r.stderr[-4000:]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders each write their own temporary
    return out


def available() -> bool:
    """Build (once per process, cached on disk) and load the extension; False if that fails."""
    with _lock:
        if "ok" not in _state:
            try:
                torch.ops.load_library(str(_build()))
                _state["ok"] = True
            except Exception as e:  # no compiler, headers missing, ...: the loop path still works
                _state["ok"] = False
                warnings.warn(f"tvm_intlstm: fused QAT LSTM unavailable, using the slower Python loop ({e})",
                              RuntimeWarning, stacklevel=3)
        return _state["ok"]


def pack_float_table(pwl) -> torch.Tensor:
    """FloatPWL -> float32 [3, n+1] (knots; bases, slopes padded)."""
    n = pwl.n
    t = torch.zeros((3, n + 1), dtype=torch.float32)
    t[0] = pwl.k
    t[1, :n] = pwl.v
    t[2, :n] = pwl.a
    return t


def _f32(v) -> float:
    return float(torch.tensor(float(v), dtype=torch.float32))


def _bounds(scale: float, lo, hi) -> list[float]:
    """(s, lo * s, hi * s) exactly as fake_quant forms them in float32."""
    s = torch.tensor(float(scale), dtype=torch.float32)
    return [float(s), float(lo * s), float(hi * s)]


def step_constants(g_s: float, c_s: float, s_h: float) -> list[float]:
    big = 2.0**31
    return [*_bounds(g_s, -32768, 32767), _f32(-8.0), _f32(8.0 - g_s), *_bounds(c_s, -big, big),
            _f32(-32768 * c_s), _f32(32767 * c_s), *_bounds(s_h, -128, 127)]


def _linear_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w^T for w [N, K]: oneDNN's f32 matmul (about 1.5x MKL's sgemm on AVX-512 AMD
    machines) where torch has it, else torch.mm. Gradients only: forward values never use it."""
    if _state.get("onednn", True):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        except Exception:
            _state["onednn"] = False
    return x @ w.t()


class InputProjection(torch.autograd.Function):
    """x @ w^T + b (the input part of an LSTM direction): the forward is the loop path's own
    expression (same values bit for bit); the backward's two products go through _linear_nt."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_b = b is not None
        return x @ w.t() + b if b is not None else x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _linear_nt(g2, w.t().contiguous()).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _linear_nt(g2.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_b and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


class _Direction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, wh, q, m, sig, tnh, tnc, consts, reverse, h0=None, h0q=None, c0=None):
        save = bool(any(ctx.needs_input_grad[i] for i in (0, 1, 9, 11)))
        r = torch.ops.intlstm_qat.lstm_fwd(p, q, m, sig, tnh, tnc, consts, reverse, save, h0q, c0)
        y, c_last = r[0], r[1]
        ctx.reverse, ctx.consts = reverse, consts
        ctx.has_h0, ctx.has_c0 = h0 is not None, c0 is not None
        if save:
            ctx.save_for_backward(wh, y, *r[2:], sig, tnh, tnc,
                                  h0 if h0 is not None else torch.empty(0), c0 if c0 is not None else torch.empty(0))
        return y, c_last

    @staticmethod
    def backward(ctx, dy, dc):
        wh, y, *saved, h0, c0 = ctx.saved_tensors
        dp, dwh, dh0, dc0 = torch.ops.intlstm_qat.lstm_bwd(dy, dc, wh, y, *saved, ctx.consts, ctx.reverse,
                                                           h0 if ctx.has_h0 else None, c0 if ctx.has_c0 else None)
        return (dp, dwh, None, None, None, None, None, None, None,
                dh0 if ctx.has_h0 else None, None, dc0 if ctx.has_c0 else None)


def lstm_direction(p, wh, q, m, tables, consts, reverse: bool, h0=None, h0q=None, c0=None):
    """One fake-quantized LSTM direction.

    p [T, B, 4H] float32: the input part x W_x^T + b before its fake quantization (done in the
    kernel); wh [4H, H]: the fake-quantized recurrent weight, = q * s_w with q int8 [4H, H];
    m [4H] float32 = s_h * s_w (RecurrentProduct); tables (sig, tanh, tanh_c) as pack_float_table;
    consts from step_constants. Optional initial state (docs/stateful.md): h0 [B, H] float32 on the
    s_h grid with its integers h0q (int8), c0 [B, H] float32 on the cell grid (both or neither of
    h0 / h0q); gradients flow to h0 and c0. Returns (y [T, B, H], c_T [B, H])."""
    opt = [None if v is None else v.contiguous() for v in (h0, h0q, c0)]
    return _Direction.apply(p.contiguous(), wh.contiguous(), q.contiguous(), m.contiguous(), *tables, consts,
                            bool(reverse), *opt)
