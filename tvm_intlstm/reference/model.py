"""Whole-model numpy reference: runs a QuantizedModel's graph with tvm_intlstm.reference.ops.

Every integer module is evaluated by the numpy oracle from its integer buffers; layout ops map to
numpy equivalents. No torch arithmetic is used (torch tensors are only read to numpy).
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..nn import intmodules as im
from ..nn.intops import unpack_table
from ..reference.ops import GATE_FRAC
from . import ops


def _np(t):
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def _pwl_tables(p, cell_frac):
    return (unpack_table(_np(p["sig"]), GATE_FRAC), unpack_table(_np(p["tanh"]), GATE_FRAC),
            unpack_table(_np(p["tanh_c"]), cell_frac))


def lstm_params(mod: im.IntLSTM, li: int, d: int) -> ops.LSTMDirectionParams:
    p = mod.direction_params(li, d)
    sig, tanh, tanh_c = _pwl_tables(p, p["cell_frac"])
    return ops.LSTMDirectionParams(
        w_x=_np(p["w_x"]), w_h=_np(p["w_h"]), bias=_np(p["bias"]), mx=_np(p["mx"]), sx=_np(p["sx"]),
        mh=_np(p["mh"]), sh=_np(p["sh"]), mo=p["mo"], so=p["so"], cell_frac=p["cell_frac"],
        sig=sig, tanh=tanh, tanh_c=tanh_c)


def _check_states(mod, hx, batch):
    """The integer model's state checks (IntLSTM.check_state) on numpy states: the oracle never
    casts a wrong dtype silently."""
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise ValueError("LSTM states must be a tuple (h0, c0)")
    mod.check_state(tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in hx), batch)


def run_int_module(mod, args):
    if isinstance(mod, im.IntInput):
        return ops.quantize_input(args[0], mod.scale)
    if isinstance(mod, im.IntEmbedding):
        return ops.embedding(args[0], _np(mod.table))
    if isinstance(mod, im.IntLinear):
        if mod.final:
            return ops.linear(args[0], _np(mod.w), _np(mod.b))
        return ops.linear(args[0], _np(mod.w), _np(mod.b), _np(mod.m), _np(mod.s))
    if isinstance(mod, im.IntLSTM):
        x = args[0]
        h = np.swapaxes(x, 0, 1) if mod.batch_first else x
        hx = args[1] if len(args) > 1 else None  # initial states (docs/stateful.md)
        ndir = 2 if mod.bidirectional else 1
        if hx is not None:
            _check_states(mod, hx, h.shape[1])
        hs, cs = [], []
        for li in range(mod.num_layers):
            outs = []
            for d in range(ndir):
                r = li * ndir + d
                y, hT, cT = ops.lstm_direction(h, lstm_params(mod, li, d), reverse=(d == 1),
                                               h0=None if hx is None else hx[0][r],
                                               c0=None if hx is None else hx[1][r])
                outs.append(y)
                hs.append(hT)
                cs.append(cT)
            h = np.concatenate(outs, axis=-1)
        out = np.swapaxes(h, 0, 1) if mod.batch_first else h
        return out, (np.stack(hs), np.stack(cs))
    if isinstance(mod, im.IntLayerNorm):
        return ops.layer_norm(args[0], _np(mod.gamma), _np(mod.beta), mod.ml, mod.sl)
    if isinstance(mod, im.IntAdd):
        return ops.residual_add(args[0], args[1], mod.ma, mod.mb, mod.s)
    if isinstance(mod, im.IntCat):
        parts = [x if r is None else ops.requantize(x, r[0], r[1], 8) for x, r in zip(args, mod.rescales)]
        return np.concatenate(parts, axis=mod.dim)
    if isinstance(mod, torch.nn.Identity):
        return args[0]
    raise NotImplementedError(f"reference has no implementation for {type(mod).__name__}")


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
        from ..quant.graph import QuantizedModel
        if not isinstance(qmodel, QuantizedModel):
            from ..quant.api import QATModel
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
                env[node] = run_int_module(gm.get_submodule(node.target), [val(a) for a in node.args])
            elif node.op in ("call_function", "call_method"):
                env[node] = _layout(node.target, [val(a) for a in node.args], node.kwargs)
            elif node.op == "output":
                return val(node.args[0])


def reference(qmodel) -> ReferenceModel:
    """The numpy integer reference of a quantized model (the oracle)."""
    return ReferenceModel(qmodel)
