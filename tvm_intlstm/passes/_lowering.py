"""Shared machinery of the lowering passes: each `Lower*` pass replaces the importer's
`intlstm.<op>` placeholder calls of its operator family with `call_tir` to TIR kernels from
tvm_intlstm.kernels.

A placeholder carries its integer constants (weights, per-channel multipliers, PWL tables) as Relax
constants and its scalar constants (multipliers, shifts, cell format) as prim values. A pass generates
one kernel per distinct (op, static sizes, scalars, target ISA), bakes the scalars into it, and emits
`call_tir` with symbolic leading dims; inputs of rank > 2 are flattened to [rows, features] around
row-wise kernels (a free reshape).
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator

from .. import kernels as K
from ..frontend.importer import const_numpy, op_args  # noqa: F401  (const_numpy: the passes' door)
from ..opdefs import OPS


def _shape(e):
    return list(e.ty.shape.values)


def _static(v, what):
    if not isinstance(v, (int, tvm.tirx.IntImm)):
        raise ValueError(f"{what} must be a static size, got symbolic {v}")
    return int(v)


def _shifts_hi(e) -> bool:
    """Are all the constant requantization shifts in [32, 62] (kernels may then use the cheaper
    `_tir.requantize_hi`)? False for non-constant shifts."""
    v = const_numpy(e)
    return v is not None and v.size > 0 and int(v.min()) >= 32 and int(v.max()) <= 62


def uniform_scale(m, s):
    """What of the constant requantization arrays m, s is one value per tensor, for the kernels to
    bake in as immediates: (M, s) when both are; (None, s) when only the shift is (per-channel
    multipliers with one shift: what the quantizer produces); None otherwise (per-channel shifts,
    non-constant arrays, invalid shifts)."""
    mv, sv = const_numpy(m), const_numpy(s)
    if sv is None or sv.size == 0 or sv.min() != sv.max() or not 1 <= int(sv.min()) <= 62:
        return None
    if mv is None or mv.size == 0 or mv.min() != mv.max():
        return None, int(sv.flat[0])
    return int(mv.flat[0]), int(sv.flat[0])


def u8_route(W, b, isa: str) -> bool:
    """Does a GEMM with constant int8 weights W (numpy, or None when not constant) and bias `b` (a
    relax expr or None) take the u8 x s8 kernel? When the kernel family has a u8 route exact for W
    (`KernelFamily.u8_exact`: AVX2 for W in [-64, 64], x86_vnni for any W) and the bias corrected
    by -128 rowsum(W) (what that kernel adds) stays in int32; a non-constant bias keeps the exact
    int16 route. The one decision the lowering and `tune`'s task list share."""
    if W is None or not K.isa.family(isa).u8_route(True, True) or not K.weights_fit_u8(W, isa):
        return False
    if b is None:
        return True
    bn = const_numpy(b)
    return bn is not None and K.u8_bias_fits(W, bn)


def _with_root_block(func):
    """Relax analyses (e.g. the reshape-pattern check of RewriteDataflowReshape) expect a PrimFunc
    body to be a root block; hand-written loop-nest kernels get an empty one wrapped around them."""
    from tvm import s_tir
    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    block = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, block))


class OpLowering(PyExprMutator):
    """Base mutator: subclasses define `_lower_<op>(a)` for the ops they handle; `a` holds the
    placeholder's arguments by the names of the op's declaration (tvm_intlstm/opdefs.py): tensors
    as relax exprs (None when an optional one is absent), attributes as Python values."""

    def __init__(self, mod, target, tuned=None, threads=False):
        super().__init__(mod)
        self.target = target
        self.tuned = tuned  # tvm_intlstm.tuning.TunedKernels or None
        # use TVM's thread pool (the threaded LSTM forms)? Off unless asked for (`compile(threads=)`)
        self.threads = bool(threads)
        self.cache = {}

    def _gemm(self, kind, Kf, O, dt, w, b, make_default, variant=(), scale=None):
        """(GlobalVar, weight arg, bias arg) of a GEMM kernel for weight `w` [O, K] and bias `b`.

        For constant weights (every model the quantizer produces), in order of preference:
        - a tuned kernel from the tuning logs (with its pre-packed weights), for weights within
          [-64, 64] on AVX2 one tuned as the u8 x s8 kernel (`u8_route`, bias - 128 rowsum(W));
        - weights within [-64, 64] (e.g. QuantConfig(weight_bits=7)) on AVX2: the hand-written
          u8 x s8 kernel (exact for such weights, half the instructions), packed weights, bias -
          128 rowsum(W);
        - the default kernel with weights packed for its micro-kernel.
        (apply_tuning_logs drops tuned kernels that were slower than the default one when tuned.)
        `make_default(w7, packed)` makes the default PrimFunc; `variant` (hashable) tells apart
        default kernels specialized on more than the shapes (e.g. baked scales); `scale` (the
        GEMM's `uniform_scale`) is baked into a tuned kernel's epilogue the same way. Non-constant
        weights get the default kernel on the natural layout."""
        W = const_numpy(w)
        if W is None:
            return self._kernel((kind, Kf, O, dt, False, False, *variant, str(self.target)),
                                lambda: make_default(False, False)), w, b
        isa = K.resolve_isa(self.target)
        w7 = u8_route(W, b, isa)
        # (a family with tile kernels, AMX, has no tuning space: the records, schedules of another
        # family's kernel, do not replace its tile kernels)
        if self.tuned is not None and not K.isa.family(isa).tiles:
            # with compile(threads=True) the default kernels of LSTM input projections use the
            # thread pool (variant "parallel"): their tuned replacements do too
            par = "parallel" in variant
            hit = self.tuned.for_weight(Kf, O, dt, w, parallel=par, bias=b, w7=w7, scale=scale)
            if hit is not None:
                func, wp, bk = hit
                return self._kernel(("tuned_" + kind, Kf, O, dt, par, w7, scale, str(self.target)),
                                    lambda: func), wp, bk
        key = (kind, Kf, O, dt, w7, True, *variant, str(self.target))
        gv = self._kernel(key, lambda: make_default(w7, True))
        wk, bk, _ = K.prepare_weights(self.cache[("func",) + key], W, const_numpy(b))
        return gv, relax.const(wk, "int8"), relax.const(bk, "int32")

    def _kernel(self, key, make):
        if key not in self.cache:
            func = make()
            self.cache[("func",) + key] = func  # the generator's PrimFunc (kernel_convention)
            # the Relax build names kernels after their GlobalVar; distinct kernels of one generator
            # share a global_symbol, so drop it
            if func.attrs is not None and "global_symbol" in func.attrs:
                func = func.without_attr("global_symbol")
            func = _with_root_block(func)
            # our kernels are complete operators: opaque to Relax's fusion (kOpaque = 8)
            func = func.with_attr("op_pattern", 8)
            self.cache[key] = self.builder_.add_func(func, key[0])
        return self.cache[key]

    def _call_rows(self, gv, x, consts, out_feat, out_dtype):
        """call a row-wise kernel on x [..., F] flattened to [rows, F]. `x` may also be a list of
        same-shape tensors (e.g. both operands of a residual add), flattened alike."""
        xs = x if isinstance(x, (list, tuple)) else [x]
        shp = _shape(xs[0])
        lead = shp[:-1]
        rows = 1
        for d in lead:
            rows = rows * d
        if len(shp) != 2:
            xs = [self.builder_.emit(relax.op.reshape(v, [rows, shp[-1]])) for v in xs]
        y2 = self.builder_.emit(relax.call_tir(gv, list(xs) + consts, relax.TensorType([rows, out_feat], out_dtype)))
        return self.builder_.emit(relax.op.reshape(y2, lead + [out_feat])) if len(shp) != 2 else y2

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = op_args(call)   # (op name, its arguments by parameter name) of a placeholder
        if found is None:
            return call
        op, args = found
        lower = getattr(self, "_lower_" + op, None)
        if lower is None:  # another pass's family (VerifyIntegerOnly reports any left over)
            return call
        return lower(args)


# op name -> the pass that lowers it (each `_lower_<op>` method, collected by `lowering_pass`)
LOWERINGS: dict = {}


def _register_lowerings(mutator_cls, name: str) -> None:
    cls = getattr(mutator_cls, "_cls", mutator_cls)   # (tvm's @mutator wraps the class)
    for attr in dir(cls):
        if not attr.startswith("_lower_"):
            continue
        op = attr[len("_lower_"):]
        if op not in OPS:
            raise ValueError(f"{name}.{attr} lowers no declared operator (tvm_intlstm/opdefs.py)")
        if LOWERINGS.get(op, name) != name:
            raise ValueError(f"operator {op} is lowered by both {LOWERINGS[op]} and {name}")
        LOWERINGS[op] = name


def lowering_pass(mutator_cls, name: str):
    """A module pass class running `mutator_cls` over every Relax function of the module."""
    _register_lowerings(mutator_cls, name)

    @tvm.transform.module_pass(opt_level=0, name=name)
    class _Pass:
        def __init__(self, target, tuned=None, threads=False):
            self.target = target
            self.tuned = tuned
            self.threads = threads

        def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
            lw = mutator_cls(mod, self.target, self.tuned, self.threads)
            for gv, func in mod.functions.items():
                if isinstance(func, relax.Function):
                    lw.builder_.update_func(gv, lw.visit_expr(func))
            return lw.builder_.get()

    _Pass.__name__ = name.split(".")[-1]
    return _Pass
