"""Import a quantized model into Relax.

`torch.export` keeps each `torch.ops.intlstm.*` op as one node (with symbolic batch and sequence
dims); `from_exported_program` translates the layout glue (transpose, cat, ...) with TVM's own
converters and our ops with converters made from their declarations (tvm_intlstm/opdefs.py). Each
of our ops becomes a placeholder call
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

from ..opdefs import OP_NAMESPACE, OPS, Names, OpDef

_DPS_PACKED = tvm.ir.Op.get("relax.call_dps_packed")

OP_PREFIX = OP_NAMESPACE + "."

# Each declared operator (tvm_intlstm/opdefs.py) becomes one placeholder call whose argument tuple
# is its tensor operands in declaration order, then its attributes as prim values. An absent
# optional operand (None) at the end is left out; one followed by a present operand is an empty
# tuple. `op_args` reads such a call back by parameter name.

_EMPTY = relax.Tuple([])


def _static_dims(e) -> list:
    """A relax tensor's shape with the static dims as Python ints (what output rules compare)."""
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in e.ty.shape.values]


def _prim_arg(attr, v):
    v = attr.cast(v)
    if isinstance(v, float):
        return relax.prim_value(tvm.tirx.FloatImm("float32", v))
    return relax.prim_value(int(v))


def placeholder_call(op: OpDef, bound: dict) -> relax.Call:
    """R.call_dps_packed("intlstm.<op>", (operands..., attrs...), outputs) of a bound call
    ({parameter name: relax tensor, None or Python scalar})."""
    slots = [bound[t.name] for t in op.operands]
    while slots and slots[-1] is None:
        slots.pop()
    for t in op.operands:
        if bound[t.name] is not None:
            op.check_dtype(t, str(bound[t.name].ty.dtype))
    shapes = {t.name: None if bound[t.name] is None else _static_dims(bound[t.name]) for t in op.operands}
    attrs = {a.name: a.cast(bound[a.name]) for a in op.attrs}
    out_ty = [relax.TensorType(list(shape), dtype) for shape, dtype in op.output_types(shapes, attrs)]
    fields = [_EMPTY if v is None else v for v in slots] + [_prim_arg(a, bound[a.name]) for a in op.attrs]
    return relax.call_dps_packed(OP_PREFIX + op.name, relax.Tuple(fields),
                                 out_ty if len(out_ty) > 1 else out_ty[0])


def const_numpy(e):
    """numpy value of a relax constant, or None (also for anything that is not a constant): how the
    passes read the quantizer's constants out of placeholder arguments."""
    if not isinstance(e, tvm.ir.expr.Constant):
        return None
    data = getattr(e, "data", None)
    data = data if data is not None else getattr(e, "value", None)
    return data.numpy() if hasattr(data, "numpy") else None


def _prim_value(e):
    v = e.value
    if isinstance(v, (int, float)):
        return v
    return float(v.value) if isinstance(v, tvm.tirx.FloatImm) else int(v.value)


def op_args(call):
    """(op name, Names of its arguments) of a placeholder call made by `placeholder_call`, or
    None for any other expression: tensors as relax exprs (None when absent), attributes as
    Python values (`args.w_h`, `args.mo`)."""
    if not (isinstance(call, relax.Call) and call.op == _DPS_PACKED
            and isinstance(call.args[0], relax.ExternFunc)):
        return None
    name = str(call.args[0].global_symbol)
    if not name.startswith(OP_PREFIX) or name[len(OP_PREFIX):] not in OPS:
        return None
    op = OPS[name[len(OP_PREFIX):]]
    fields = list(call.args[1].fields)
    n_slots = len(fields) - len(op.attrs)
    if not 0 <= n_slots <= len(op.operands):
        raise ValueError(f"{name} call has {len(fields)} arguments; its declaration has "
                         f"{len(op.operands)} operands and {len(op.attrs)} attributes")
    values = {}
    for i, t in enumerate(op.operands):
        e = fields[i] if i < n_slots else None
        values[t.name] = None if e is None or (isinstance(e, relax.Tuple) and not e.fields) else e
    for a, e in zip(op.attrs, fields[n_slots:]):
        values[a.name] = a.cast(_prim_value(e))
    return op.name, Names(values)


def _make_converter(op: OpDef):
    def convert(node, importer):
        args = importer.retrieve_args(node)
        kwargs = {k: importer._retrieve_args(v) for k, v in node.kwargs.items()}  # pylint: disable=protected-access
        return importer.block_builder.emit(placeholder_call(op, op.bind(tuple(args), kwargs)))

    return convert


def convert_map() -> dict:
    """torch.export op name -> converter, for every declared operator (from_exported_program's
    custom_convert_map)."""
    return {f"{name}.default": _make_converter(op) for name, op in OPS.items()}


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
    from ..quant.state_format import STATE_KINDS  # pylint: disable=import-outside-toplevel
    return {i for i, k in enumerate(qmodel.input_kinds) if k in STATE_KINDS}


_TAKE = tvm.ir.Op.get("relax.take")


def _negative_const(e) -> bool:
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
    mod = from_exported_program(ep, custom_convert_map=convert_map(), unwrap_unit_return_tuple=True)
    fix = _WrapNegativeIndices(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fix.builder_.update_func(gv, fix.visit_expr(func))
    return fix.builder_.get()
