"""VerifyIntegerOnly: fail compilation if any floating-point value remains between the model's
input boundary and its outputs (docs/integer_spec.md section 12).

Allowed floats: the Relax function's own float32 parameters (features entering the model) and the
one kernel that quantizes them (TIR functions tagged `intlstm.boundary`). Everything else (Relax
bindings, outputs, and every other TIR function's buffers and expressions) must be integer.
"""
from __future__ import annotations

import re

import tvm
from tvm import relax


class FloatOpError(RuntimeError):
    """A floating-point operation was found inside the integer-only region of a model."""


def _is_float(dtype) -> bool:
    s = str(dtype)
    return s.startswith("float") or s.startswith("bfloat")


def _ty_floats(ty):
    if isinstance(ty, relax.TensorType):
        return _is_float(ty.dtype)
    if isinstance(ty, relax.TupleType):
        return any(_ty_floats(f) for f in ty.fields)
    return False


_LAYOUT_OPS = {"relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze"}
_FLOAT_RE = re.compile(r"\b(b?float(?:16|32|64))\b")


def _check_prim_func(name, func):
    if func.attrs is not None and "intlstm.boundary" in func.attrs:
        return
    # the printed TIR names the dtype of every buffer, cast and constant: a float anywhere shows
    found = sorted(set(_FLOAT_RE.findall(func.script())))
    if found:
        raise FloatOpError(f"kernel '{name}' computes in floating point ({', '.join(found)}); "
                           "integer-only models may use floats only to quantize their inputs")


_DPS_PACKED = tvm.ir.Op.get("relax.call_dps_packed")


def _check_relax_func(name, func):
    bad = []
    for block in getattr(func.body, "blocks", []):
        for b in block.bindings:
            v = b.value
            if (isinstance(v, relax.Call) and v.op == _DPS_PACKED and isinstance(v.args[0], relax.ExternFunc)
                    and str(v.args[0].global_symbol).startswith("intlstm.")):
                raise FloatOpError(f"integer operator {v.args[0].global_symbol} was not lowered to a kernel "
                                   "(no lowering pass handles it yet)")
    body = func.body
    allowed = set(func.params)  # float features entering the model...
    for block in getattr(body, "blocks", []):
        for b in block.bindings:
            if not _ty_floats(b.var.ty):
                continue
            v = b.value
            # ...and pure reshapes of them on their way to the quantize kernel
            if (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in _LAYOUT_OPS
                    and v.args and v.args[0] in allowed):
                allowed.add(b.var)
                continue
            bad.append(str(b.var))
    if _ty_floats(body.body.ty if hasattr(body, "body") else body.ty):
        bad.append("<output>")
    if bad:
        raise FloatOpError(f"function '{name}' has floating-point values {sorted(set(bad))[:8]} after the "
                           "input boundary; every layer must be quantized (use tvm_intlstm.quantize)")


@tvm.transform.module_pass(opt_level=0, name="tvm_intlstm.VerifyIntegerOnly")
class VerifyIntegerOnly:
    """Raise FloatOpError when the module is not integer-only; return it unchanged otherwise."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                _check_prim_func(gv.name_hint, func)
            elif isinstance(func, relax.Function):
                _check_relax_func(gv.name_hint, func)
        return mod
