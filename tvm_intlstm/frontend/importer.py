"""Import a quantized model into Relax.

`torch.export` keeps each `torch.ops.intlstm.*` op as one node (with symbolic batch and sequence
dims); `from_exported_program` translates the layout glue (transpose, cat, ...) with TVM's own
converters and our ops with the converters below. Each of our ops becomes a placeholder call
`R.call_dps_packed("intlstm.<op>", (tensors..., R.prim_value(scalars)...), out_ty)`: a typed,
target-independent integer operator that the passes in tvm_intlstm/passes lower to TIR kernels.
No time step is unrolled: one module serves every batch size and sequence length.
"""
from __future__ import annotations

import torch
from torch.export import Dim, export
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.torch import from_exported_program

OP_PREFIX = "intlstm."

# op name -> (number of leading tensor args, output rule)
# output rules take the relax tensor args' shapes and the scalar args and return [(shape, dtype)]


def _shape(e):
    return list(e.ty.shape.values)


def _rule_quantize_input(t, s):
    return [(_shape(t[0]), "int8")]


def _rule_embedding(t, s):
    return [(_shape(t[0]) + [_shape(t[1])[1]], "int8")]


def _rule_linear_i32(t, s):
    return [(_shape(t[0])[:-1] + [_shape(t[1])[0]], "int32")]


def _rule_linear_requant(t, s):
    return [(_shape(t[0])[:-1] + [_shape(t[1])[0]], {8: "int8", 16: "int16"}[s[0]])]


def _rule_lstm(t, s):
    T, B, _ = _shape(t[0])
    H = _shape(t[2])[1]
    return [([T, B, H], "int8"), ([B, H], "int8"), ([B, H], "int16")]


def _rule_same(dtype):
    return lambda t, s: [(_shape(t[0]), dtype)]


def _rule_context(t, s):
    return [(_shape(t[0])[:-1] + [_shape(t[1])[-1]], "int8")]


OPS = {
    # name: (tensor arg count, scalar arg count, rule)
    "quantize_input": (1, 1, _rule_quantize_input),
    "embedding": (2, 0, _rule_embedding),
    "linear_i32": (3, 0, _rule_linear_i32),
    "linear_requant": (5, 1, _rule_linear_requant),
    "lstm_direction": (11, 4, _rule_lstm),
    "residual_add": (2, 3, _rule_same("int8")),
    "rescale": (1, 2, _rule_same("int8")),
    "layer_norm": (3, 2, _rule_same("int8")),
    "softmax": (1, 2, _rule_same("int16")),  # + exp table tensor after the scalars
    "attention_context": (2, 2, _rule_context),
}


def _make_converter(name: str):
    n_tensors, n_scalars, rule = OPS[name]

    def convert(node, importer):
        args = list(importer.retrieve_args(node))
        if name == "softmax":  # softmax(z, mz, sz, exp_table): move the table next to the tensors
            args = [args[0], args[3], args[1], args[2]]
            tensors, scalars = args[:2], args[2:]
        else:
            tensors, scalars = args[:n_tensors], args[n_tensors:n_tensors + n_scalars]
        outs = rule(tensors, [int(v) if not isinstance(v, float) else v for v in scalars])
        out_ty = [relax.TensorType(shape, dtype) for shape, dtype in outs]
        prims = [relax.prim_value(tvm.tirx.FloatImm("float32", float(v))) if isinstance(v, float) else relax.prim_value(int(v)) for v in scalars]
        # initial LSTM states (h0 int8, c0 int16 [B, H]; docs/stateful.md) go after the scalars, so
        # the lowering's positional unpacking of the stateless call stays valid
        prims += _lstm_state_args(name, args)
        call = relax.call_dps_packed(OP_PREFIX + name, relax.Tuple(tensors + prims),
                                     out_ty if len(out_ty) > 1 else out_ty[0])
        return importer.block_builder.emit(call)

    return convert


def _lstm_state_args(name: str, args: list) -> list:
    """lstm_direction's optional (h0, c0) arguments: both tensors or none (IntLSTM passes both)."""
    if name != "lstm_direction" or len(args) <= 15 or all(a is None for a in args[15:]):
        return []
    h0, c0 = (list(args[15:]) + [None])[:2]
    if h0 is None or c0 is None:
        raise NotImplementedError("an LSTM direction with only one of h0 / c0 cannot be compiled: pass both")
    return [h0, c0]


CONVERT_MAP = {f"{name}.default": _make_converter(name) for name in OPS}


def export_quantized(qmodel, example_inputs, dynamic: bool = True):
    """torch.export of a QuantizedModel's integer graph, with dims 0 and 1 of every input of rank >= 2
    symbolic (batch and time, in either order) so one module serves all shapes."""
    gm = qmodel.gm
    dyn = None
    # LSTM state inputs [L*D, B, H]: only dim 1 (the batch) is symbolic, the one of the data input
    state_inputs = _state_input_indices(qmodel)
    if dynamic:
        # torch.export specializes dims whose example size is 1 (or 0): widen them to 2 by
        # repeating the example data, so batch-1 / length-1 examples still give symbolic dims
        widened = []
        for i, x in enumerate(example_inputs):
            for d in ((1,) if i in state_inputs else range(min(x.dim(), 2))):
                if x.shape[d] < 2:
                    reps = [1] * x.dim()
                    reps[d] = 2
                    x = x.repeat(*reps) if x.shape[d] == 1 else x
            widened.append(x)
        example_inputs = tuple(widened)
        dims = {}
        specs = []
        for i, x in enumerate(example_inputs):
            if i in state_inputs:  # AUTO: export equates it with the batch dim IntLSTM checks it against
                specs.append({1: Dim.AUTO})
                continue
            spec = {}
            for d in range(min(x.dim(), 2)):
                key = (d, int(x.shape[d]))
                if key not in dims:
                    dims[key] = Dim(f"d{d}_{len(dims)}", min=1)
                spec[d] = dims[key]
            specs.append(spec)
        dyn = tuple(specs)
    with torch.no_grad():
        return export(gm, tuple(example_inputs), dynamic_shapes=dyn)


def _state_input_indices(qmodel) -> set:
    from ..quant.stateful import STATE_KINDS  # pylint: disable=import-outside-toplevel
    return {i for i, k in enumerate(qmodel.input_kinds) if k in STATE_KINDS}


_TAKE = tvm.ir.Op.get("relax.take")


def _negative_const(e) -> bool:
    from ..passes._lowering import const_numpy  # pylint: disable=import-outside-toplevel
    v = const_numpy(e)
    return v is not None and bool((v < 0).any())


@mutator
class _WrapNegativeIndices(PyExprMutator):
    """`x[-1]` (aten.select with a negative index, e.g. the last time step or `h_n[-1]`) comes out
    of TVM's translator as `R.take(x, -1, mode="fast")`, which reads before the buffer: take it
    with mode="wrap" instead (index mod size: -1 is the last element), also for symbolic sizes."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op == _TAKE and str(call.attrs.mode) == "fast" and _negative_const(call.args[1]):
            return relax.op.take(call.args[0], call.args[1], axis=call.attrs.axis, mode="wrap")
        return call


def import_quantized(qmodel, example_inputs, dynamic: bool = True):
    """Relax IRModule of a quantized model, with our ops as `intlstm.*` placeholder calls."""
    ep = export_quantized(qmodel, example_inputs, dynamic)
    mod = from_exported_program(ep, custom_convert_map=CONVERT_MAP, unwrap_unit_return_tuple=True)
    fix = _WrapNegativeIndices(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fix.builder_.update_func(gv, fix.visit_expr(func))
    return fix.builder_.get()
