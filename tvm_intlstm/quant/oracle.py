"""Whole-model numpy reference: runs a QuantizedModel's graph with tvm_intlstm.reference.ops.

The torch side of the oracle (it walks the model's torch.fx graph and reads its buffers), so it
lives with the quantizer; tvm_intlstm/reference/ holds the numpy-only ops (importable without torch
or tvm) and calls this for `tvm_intlstm.reference(qmodel)`. Every integer module is evaluated by the numpy oracle from its integer buffers (the reference
handler its layer registers in quant/layers.py); layout ops map to numpy equivalents. No torch
arithmetic is used (torch tensors are only read to numpy).
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from . import layers
from .layers import to_numpy as _np


def _layout(target, args, kwargs):
    x = args[0]
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if target in (operator.getitem,) or name == "__getitem__":
        return x[args[1]]
    if name == "transpose":
        return np.swapaxes(x, args[1], args[2])
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return np.transpose(x, dims)
    if name in ("reshape", "view"):
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return np.reshape(x, shape)
    if name == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        nd = x.ndim
        start, end = start % nd, end % nd
        return np.reshape(x, x.shape[:start] + (-1,) + x.shape[end + 1:])
    if name == "contiguous":
        return x
    if name == "squeeze":
        return np.squeeze(x, axis=args[1]) if len(args) > 1 else np.squeeze(x)
    if name == "unsqueeze":
        return np.expand_dims(x, args[1])
    raise NotImplementedError(f"reference has no layout op {name}")


class ReferenceModel:
    """Callable numpy reference of a QuantizedModel: returns numpy integer arrays."""

    def __init__(self, qmodel):
        from .graph import QuantizedModel
        if not isinstance(qmodel, QuantizedModel):
            from .api import QATModel
            if isinstance(qmodel, QATModel):
                qmodel = qmodel.convert()
            else:
                raise TypeError("reference() takes a quantized model (tvm_intlstm.quantize / prepare_qat)")
        self.qmodel = qmodel
        self.output_info = qmodel.output_info

    def __call__(self, *inputs):
        gm = self.qmodel.gm
        env = {}
        it = iter(inputs)

        def val(a):
            if isinstance(a, torch.fx.Node):
                return env[a]
            if isinstance(a, (tuple, list)):
                return type(a)(val(v) for v in a)
            return a

        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = _np(next(it))
            elif node.op == "call_module":
                env[node] = layers.reference(gm.get_submodule(node.target), [val(a) for a in node.args])
            elif node.op in ("call_function", "call_method"):
                env[node] = _layout(node.target, [val(a) for a in node.args], node.kwargs)
            elif node.op == "output":
                return val(node.args[0])


def reference(qmodel) -> ReferenceModel:
    """The numpy integer reference of a quantized model (the oracle)."""
    return ReferenceModel(qmodel)
