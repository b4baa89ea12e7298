"""TIR kernels for the integer operators of docs/integer_spec.md.

Every generator returns a `tvm.tirx.PrimFunc` (plain tirx loop nests, hand-scheduled) in
destination-passing style: inputs first, outputs last, as `relax.call_tir` expects. Feature sizes
are static Python ints; leading dims (rows, batch, time) are symbolic `T.int64()` vars bound by
`T.match_buffer`, so one build serves every batch size and sequence length. Scalar constants
(scales, per-tensor multipliers and shifts, the cell format) are baked into the function;
per-channel arrays and PWL tables are buffers. Outputs must not alias inputs (`tirx.noalias`).

    generator (static args)                         buffers (N, T, B, ... symbolic)
    quantize_input(K, scale)                        x f32[N,K] -> q i8[N,K]
    embedding(V, D, id_dtype="int64")               ids[N], table i8[V,D] -> i8[N,D]
    linear_i32(K, O, bias=True)                     x i8[N,K], W i8[O,K], b i32[O] -> i32[N,O]
    linear_requant(K, O, out_dtype, bias=True)      x, W, b, M i32[O], s i32[O] -> i8/i16[N,O]
    lstm_recurrent(H, mo=, so=, cell_frac=, sig_pieces=16, tanh_pieces=16, tanh_c_pieces=16,
                   reverse=False, init_state=False)
                                                    gx i16[T,B,4H], w_h i8[4H,H], mh, sh i32[4H],
                                                    sig, tanh, tanh_c i32[3,n+1], (h0 i8[B,H],
                                                    c0 i16[B,H]) -> y i8[T,B,H], h_T i8[B,H],
                                                    c_T i16[B,H]; the threaded form (parallel=True,
                                                    AVX2) takes gx, mh, sh in `gate_order(func, .)`
    rescale_8(D, M, s)                              x i8[N,D] -> i8[N,D]
    residual_add(D, Ma, Mb, s)                      a, b i8[N,D] -> i8[N,D]
    pwl_activation(pieces)                          x i16[N], table i32[3,n+1] -> i16[N]
    layer_norm(D, Ml, sl)                           x i8[N,D], gamma i16[D], beta i64[D] -> i8[N,D]
    layer_norm16(G, D, Ml, sl, eps)                 x i16[N,G,D], gamma i16[G,D], beta i64[G,D] -> i16
    softmax(pieces, Mz, sz, length=None)            z i32[R,K], exp_table -> p i16[R,K]
    attention_context(D, Mc, sc)                    p i16[B,Q,K], v i8[B,K,D] -> i8[B,Q,D]

PWL tables are packed int32 [3, n+1] by `pack_pwl(table)`. The generators of the products
(linear_*, lstm_recurrent) take `target=` (or `isa=`, a family name) and use the kernel family
(kernels/isa/, one file each) that `isa.pick(target)` chooses from the target's features:
"x86_vnni" (AVX-VNNI or AVX512-VNNI: vpdpbusd, exact u8 x s8 quads for any int8 weight), "avx2"
(vpmaddwd, exact int16 pair sums; vpmaddubsw for 7-bit weights), "neon_dotprod" (aarch64 with
dotprod: sdot; the packed linear kernels use smmla when the target also has i8mm), or "generic"
(plain TIR that LLVM vectorizes for any target); "amx" (AMX-INT8 tdpbssd tiles for the packed
linear kernels) only when asked for (`isa.prefer("amx")`, compile(kernels="amx")).
`build_kernel(func, target)` compiles one PrimFunc and returns a callable (an AMX kernel asks the
OS for the AMX permission before its first call, `runtime.amx`); `benchmarks/bench_kernels.py` measures the
LSTM against PyTorch FP32.
"""
from __future__ import annotations

import tvm

from . import isa
from ._common import as_target, has_feature, resolve_isa
from .elementwise import embedding, pwl_activation, quantize_input, rescale_8, residual_add
from ._gemm import u8_bias_fits, u8_correction, weights_fit_u8
from .linear import linear_i32, linear_requant
from .lstm import (gate_interleaved, gate_order, lstm_recurrent, pack_pwl, pad_units, pwl_bin_shift,
                   pwl_foldable, recurrent_units)
from .ln_lstm import ln_lstm_recurrent
from .norm import attention_context, layer_norm, layer_norm16, softmax


def host_target() -> tvm.target.Target:
    """An LLVM target for this machine's CPU (e.g. znver3), as JSON-dict Target."""
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


class Kernel:
    """A compiled PrimFunc: call it with tvm tensors (inputs then outputs, all pre-allocated)."""

    def __init__(self, executable, name: str, target, amx: bool = False):
        self.executable = executable
        self.name = name
        self.target = target
        self.amx = amx  # uses AMX tiles: the process needs the OS's permission before it runs
        self._f = None  # looked up on first call: a cross-compiled kernel can still be inspected

    def _ready(self):
        if self.amx:   # once per process; a clear AMXUnavailableError where the OS refuses
            from ..runtime.amx import request_amx_permission  # pylint: disable=import-outside-toplevel
            request_amx_permission()

    def __call__(self, *args):
        if self._f is None:
            self._ready()
            self._f = self.executable[self.name]
        return self._f(*args)

    @property
    def module(self):
        return self.executable.mod

    def time_us(self, *args, number: int = 10, repeat: int = 5, reduce=None) -> float:
        """Median (or `reduce`) microseconds per call over `repeat` runs of `number` calls."""
        import numpy as np  # pylint: disable=import-outside-toplevel

        self._ready()
        ev = self.module.time_evaluator(self.name, tvm.cpu(), number=number, repeat=repeat)
        res = ev(*args).results
        return float((reduce or np.median)(res) * 1e6)


def kernel_convention(func) -> tuple[bool, int]:
    """(u8, packing) of a kernel PrimFunc: packing is the OV of `_gemm.pack_outer` (AVX2), 0 for the
    natural [O, K] layout, -1 for `_gemm.pack_mmla` (aarch64 i8mm), -2 for `_gemm.pack_amx` (AMX
    tiles); see `_gemm.with_convention`."""
    attrs = func.attrs if func.attrs is not None else {}
    u8 = bool(int(attrs["intlstm.u8"])) if "intlstm.u8" in attrs else False
    chunk = int(attrs["intlstm.wpack"]) if "intlstm.wpack" in attrs else 0
    return u8, chunk


def uses_amx(func) -> bool:
    """Does a kernel PrimFunc run AMX tile instructions (so the process needs the AMX permission,
    `runtime.amx.request_amx_permission`, before it runs)?"""
    attrs = func.attrs if func.attrs is not None else {}
    return "intlstm.amx" in attrs and bool(int(attrs["intlstm.amx"]))


def prepare_weights(func, W, bias=None):
    """The weight-side arguments a kernel takes, from the natural ones (numpy): returns
    (W', bias', corr). W' is W packed for the kernel's micro-kernel (or W itself); on the u8 route
    bias' = bias - 128 rowsum(W) (int32) and corr = -128 rowsum(W), else bias' = bias and corr =
    zeros; corr is what `lstm_recurrent` takes after `sh` (linear kernels fold it into the bias).
    A recurrent kernel with `intlstm.gate_interleave` gets W's rows and corr reordered
    (`lstm.gate_order`; its gx, mh and sh must come in that order too); one with
    `intlstm.tiles_rec` (the amx family) gets both its layouts in one flat buffer. Done once per model at
    compile time."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ._gemm import AMX_PACK, pack_amx, pack_mmla, pack_outer  # pylint: disable=import-outside-toplevel
    from .lstm import gate_order  # pylint: disable=import-outside-toplevel
    u8, ov = kernel_convention(func)
    W = np.asarray(W)
    if W.dtype != np.int8 or W.ndim != 2:
        raise ValueError(f"weights must be int8 [O, K], got {W.dtype} {W.shape}")
    Wk = gate_order(func, W, axis=0)   # the threaded recurrent kernel's row order, else W
    corr = np.zeros(W.shape[0], np.int32)
    if u8:
        fam = isa.family(func.attrs["intlstm.isa"])
        if not fam.u8_exact(W):
            raise ValueError(f"this {fam.name} kernel was built for its u8 route (w7=True), which is "
                             "not exact for these weights (they reach "
                             f"{int(np.abs(W.astype(np.int32)).max())}; the avx2 u8 route needs W in [-64, 64])")
        corr = u8_correction(W)
        if bias is not None:
            if not u8_bias_fits(W, bias):
                raise ValueError("bias - 128 rowsum(W) leaves int32: use w7=False")
            bias = (np.asarray(bias, dtype=np.int64) + corr).astype(np.int32)
    corr = gate_order(func, corr)
    if ov == -1:
        return pack_mmla(Wk), bias, corr
    if ov == AMX_PACK:
        return pack_amx(Wk), bias, corr
    Wp = pack_outer(Wk, u8, ov) if ov else Wk
    if "intlstm.tiles_rec" in func.attrs and int(func.attrs["intlstm.tiles_rec"]):
        # a recurrent kernel with tile steps: its vpdpbusd layout, then the tile layout, flat
        Wp = np.concatenate([Wp.ravel(), pack_amx(Wk).ravel()])
    return Wp, bias, corr


def build_kernel(func: tvm.tirx.PrimFunc, target="llvm") -> Kernel:
    """Compile one kernel PrimFunc for `target` (a Target, dict, JSON string, kind name or classic
    'llvm -mcpu=...' string). Refuses an AVX2 kernel on a target without AVX2 and any target that
    enables fast-math (the float boundary of spec 1 must stay IEEE). A kernel of a family the
    target cannot run (e.g. an x86_vnni kernel for an AVX2-only target) is refused; a family the
    target supports but does not prefer (an avx2 kernel for a VNNI target) is fine."""
    from ..target import check_ieee_float  # pylint: disable=import-outside-toplevel
    tgt = as_target(target)
    check_ieee_float(tgt)
    fam_name = str(func.attrs["intlstm.isa"]) if func.attrs and "intlstm.isa" in func.attrs else "generic"
    if isa.family(fam_name) not in isa.supported(tgt):
        raise ValueError(f"kernel was generated for isa={fam_name!r} but target {tgt} does not "
                         "provide it")
    if kernel_convention(func)[1] == -1 and not has_feature(tgt, "i8mm"):
        raise ValueError(f"kernel was generated for aarch64 i8mm (smmla) but target {tgt} does not "
                         "provide i8mm")
    name = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else "main"
    mod = tvm.IRModule({name: func})
    ex = tvm.compile(mod, target=tgt)
    return Kernel(ex, name, tgt, amx=uses_amx(func))


__all__ = [
    "isa", "build_kernel", "host_target", "prepare_weights", "kernel_convention", "uses_amx", "weights_fit_u8", "u8_correction", "u8_bias_fits", "resolve_isa", "as_target", "Kernel",
    "quantize_input", "embedding", "rescale_8", "residual_add", "pwl_activation",
    "linear_i32", "linear_requant",
    "lstm_recurrent", "pack_pwl", "gate_order", "gate_interleaved", "recurrent_units", "pad_units",
    "pwl_bin_shift",
    "pwl_foldable",
    "layer_norm", "layer_norm16", "ln_lstm_recurrent", "softmax", "attention_context",
]
