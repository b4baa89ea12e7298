"""LowerIntegerOps: replace the importer's `intlstm.*` placeholder calls with TIR kernels.

Each placeholder carries its integer constants (weights, per-channel multipliers, PWL tables) as
Relax constants and its scalar constants (multipliers, shifts, cell format) as prim values. This pass
generates one kernel per distinct (op, static sizes, scalars, target ISA) from tvm_intlstm.kernels,
bakes the scalars into it, and emits `call_tir` with symbolic leading dims. Inputs of rank > 2 are
flattened to [rows, features] around row-wise kernels (a free reshape).
"""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .. import kernels as K
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


@mutator
class _Lowerer(PyExprMutator):
    def __init__(self, mod, target):
        super().__init__(mod)
        self.target = target
        self.cache = {}

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
        """call a row-wise kernel on x [..., F] flattened to [rows, F]."""
        shp = _shape(x)
        lead = shp[:-1]
        rows = 1
        for d in lead:
            rows = rows * d
        x2 = self.builder_.emit(relax.op.reshape(x, [rows, shp[-1]])) if len(shp) != 2 else x
        y2 = self.builder_.emit(relax.call_tir(gv, [x2] + consts, relax.TensorType([rows, out_feat], out_dtype)))
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
        if lower is None:
            raise NotImplementedError(f"no kernel for integer operator {op!r} yet")
        return lower(args)

    # --- one method per operator -------------------------------------------------------------
    def _lower_quantize_input(self, a):
        x, scale = a[0], _prim(a[1])
        F = _static(_shape(x)[-1], "input features")
        gv = self._kernel(("quantize_input", F, scale), lambda: K.quantize_input(F, scale).with_attr("intlstm.boundary", 1))
        return self._call_rows(gv, x, [], F, "int8")

    def _lower_embedding(self, a):
        ids, table = a
        V, D = (_static(v, "embedding size") for v in _shape(table))
        idt = ids.ty.dtype
        gv = self._kernel(("embedding", V, D, idt), lambda: K.embedding(V, D, idt))
        shp = _shape(ids)
        n = 1
        for d in shp:
            n = n * d
        flat = self.builder_.emit(relax.op.reshape(ids, [n]))
        y = self.builder_.emit(relax.call_tir(gv, [flat, table], relax.TensorType([n, D], "int8")))
        return self.builder_.emit(relax.op.reshape(y, shp + [D]))

    def _lower_linear_i32(self, a):
        x, w, b = a
        O, Kf = (_static(v, "linear size") for v in _shape(w))
        gv = self._kernel(("linear_i32", Kf, O, str(self.target)),
                          lambda: K.linear_i32(Kf, O, True, target=self.target))
        return self._call_rows(gv, x, [w, b], O, "int32")

    def _lower_linear_requant(self, a):
        x, w, b, m, s, bits = a
        bits = _prim(bits)
        O, Kf = (_static(v, "linear size") for v in _shape(w))
        dt = f"int{bits}"
        gv = self._kernel(("linear_requant", Kf, O, dt, str(self.target)),
                          lambda: K.linear_requant(Kf, O, dt, True, target=self.target))
        return self._call_rows(gv, x, [w, b, m, s], O, dt)

    def _lower_lstm_direction(self, a):
        x, w_x, w_h, bias, mx, sx, mh, sh, sig, tanh, tanh_c = a[:11]
        mo, so, cf, rev = (_prim(v) for v in a[11:15])
        G, I = (_static(v, "LSTM size") for v in _shape(w_x))
        H = G // 4
        T_, B_ = _shape(x)[:2]
        gvx = self._kernel(("linear_requant", I, G, "int16", str(self.target)),
                           lambda: K.linear_requant(I, G, "int16", True, target=self.target))
        gx = self._call_rows(gvx, x, [w_x, bias, mx, sx], G, "int16")
        pieces = [_static(_shape(t)[1], "PWL table") - 1 for t in (sig, tanh, tanh_c)]
        key = ("lstm_recurrent", H, mo, so, cf, *pieces, bool(rev), str(self.target))
        gv = self._kernel(key, lambda: K.lstm_recurrent(
            H, mo=mo, so=so, cell_frac=cf, sig_pieces=pieces[0], tanh_pieces=pieces[1],
            tanh_c_pieces=pieces[2], reverse=bool(rev), target=self.target))
        out_ty = [relax.TensorType([T_, B_, H], "int8"), relax.TensorType([B_, H], "int8"),
                  relax.TensorType([B_, H], "int16")]
        return self.builder_.emit(relax.call_tir(gv, [gx, w_h, mh, sh, sig, tanh, tanh_c], out_ty))

    def _lower_residual_add(self, a):
        x, y, ma, mb, s = a[0], a[1], _prim(a[2]), _prim(a[3]), _prim(a[4])
        F = _static(_shape(x)[-1], "features")
        gv = self._kernel(("residual_add", F, ma, mb, s), lambda: K.residual_add(F, ma, mb, s))
        shp = _shape(x)
        rows = 1
        for d in shp[:-1]:
            rows = rows * d
        x2 = self.builder_.emit(relax.op.reshape(x, [rows, F]))
        y2 = self.builder_.emit(relax.op.reshape(y, [rows, F]))
        out = self.builder_.emit(relax.call_tir(gv, [x2, y2], relax.TensorType([rows, F], "int8")))
        return self.builder_.emit(relax.op.reshape(out, shp))

    def _lower_rescale(self, a):
        x, m, s = a[0], _prim(a[1]), _prim(a[2])
        F = _static(_shape(x)[-1], "features")
        gv = self._kernel(("rescale_8", F, m, s), lambda: K.rescale_8(F, m, s))
        return self._call_rows(gv, x, [], F, "int8")

    def _lower_layer_norm(self, a):
        x, gamma, beta, ml, sl = a[0], a[1], a[2], _prim(a[3]), _prim(a[4])
        F = _static(_shape(x)[-1], "features")
        gv = self._kernel(("layer_norm", F, ml, sl), lambda: K.layer_norm(F, ml, sl))
        return self._call_rows(gv, x, [gamma, beta], F, "int8")


@tvm.transform.module_pass(opt_level=0, name="tvm_intlstm.LowerIntegerOps")
class LowerIntegerOps:
    """Lower every `intlstm.*` placeholder call to a TIR kernel for `target`."""

    def __init__(self, target):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        lw = _Lowerer(mod, self.target)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                lw.builder_.update_func(gv, lw.visit_expr(func))
        return lw.builder_.get()
