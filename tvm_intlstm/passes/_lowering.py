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

from ..frontend.importer import OP_PREFIX

_DPS_PACKED = tvm.ir.Op.get("relax.call_dps_packed")


def _shape(e):
    return list(e.ty.shape.values)


def _static(v, what):
    if not isinstance(v, (int, tvm.tirx.IntImm)):
        raise ValueError(f"{what} must be a static size, got symbolic {v}")
    return int(v)


def _prim(e):
    v = e.value
    if isinstance(v, (int, float)):
        return v
    return float(v.value) if isinstance(v, tvm.tirx.FloatImm) else int(v.value)


def _with_root_block(func):
    """Relax analyses (e.g. the reshape-pattern check of RewriteDataflowReshape) expect a PrimFunc
    body to be a root block; hand-written loop-nest kernels get an empty one wrapped around them."""
    from tvm import s_tir
    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    block = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, block))


class OpLowering(PyExprMutator):
    """Base mutator: subclasses define `_lower_<op>(args)` for the ops they handle."""

    def __init__(self, mod, target, tuned=None):
        super().__init__(mod)
        self.target = target
        self.tuned = tuned  # tvm_intlstm.tuning.TunedKernels or None
        self.cache = {}

    def _gemm(self, kind, Kf, O, dt, w, make_default):
        """(GlobalVar, weight arg): the tuned kernel with pre-packed weights if the tuning logs have
        one for this GEMM, else the default kernel and the weights as they are."""
        if self.tuned is not None:
            hit = self.tuned.for_weight(Kf, O, dt, w)  # None unless tuned and w is a constant
            if hit is not None:
                func, wp = hit
                return self._kernel(("tuned_" + kind, Kf, O, dt, str(self.target)), lambda: func), wp
        return self._kernel((kind, Kf, O, dt, str(self.target)), make_default), w

    def _kernel(self, key, make):
        if key not in self.cache:
            func = make()
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
        if call.op != _DPS_PACKED or not isinstance(call.args[0], relax.ExternFunc):
            return call
        name = str(call.args[0].global_symbol)
        if not name.startswith(OP_PREFIX):
            return call
        op = name[len(OP_PREFIX):]
        args = list(call.args[1].fields)
        lower = getattr(self, "_lower_" + op, None)
        if lower is None:  # another pass's family (VerifyIntegerOnly reports any left over)
            return call
        return lower(args)



def lowering_pass(mutator_cls, name: str):
    """A module pass class running `mutator_cls` over every Relax function of the module."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    class _Pass:
        def __init__(self, target, tuned=None):
            self.target = target
            self.tuned = tuned

        def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
            lw = mutator_cls(mod, self.target, self.tuned)
            for gv, func in mod.functions.items():
                if isinstance(func, relax.Function):
                    lw.builder_.update_func(gv, lw.visit_expr(func))
            return lw.builder_.get()

    _Pass.__name__ = name.split(".")[-1]
    return _Pass
