"""Save and load quantized models as data only: integer tensors, numbers and strings, loadable with
`torch.load(weights_only=True)` (no pickled code). The fx graph is stored as a node list whose
functions come from a fixed whitelist."""
from __future__ import annotations

import operator
import os

import torch
import torch.fx as fx
from torch import nn

from ..nn import intmodules as im
from .graph import LAYOUT_FUNCS, QuantizedModel, info_from_data, info_to_data

FORMAT = "tvm_intlstm.quantized/1"
_MODULES = {c.__name__: c for c in (im.IntInput, im.IntEmbedding, im.IntLinear, im.IntLSTM, im.IntLayerNorm,
                                    im.IntAdd, im.IntCat)}
_MODULES["Identity"] = nn.Identity
_FUNCS = {f"{getattr(f, '__module__', '') or 'torch'}.{f.__name__}": f for f in LAYOUT_FUNCS}
_FUNCS["_operator.getitem"] = operator.getitem


def _fname(f):
    for k, v in _FUNCS.items():
        if v is f:
            return k
    raise ValueError(f"cannot serialize function {f}")


def _enc(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, slice):
        return {"slice": [a.start, a.stop, a.step]}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if a is None or isinstance(a, (int, float, str, bool)):
        return a
    raise ValueError(f"cannot serialize graph argument {a!r}")


def _dec(a, env):
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        if "slice" in a:
            return slice(*a["slice"])
        if "tuple" in a:
            return tuple(_dec(x, env) for x in a["tuple"])
    if isinstance(a, list):
        return [_dec(x, env) for x in a]
    return a


def _module_spec(m: nn.Module) -> dict:
    attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
    return {"class": type(m).__name__, "attrs": attrs, "buffers": dict(m.named_buffers())}


def _module_from_spec(spec: dict) -> nn.Module:
    cls = _MODULES.get(spec["class"])
    if cls is None:
        raise ValueError(f"unknown module type {spec['class']!r} in quantized model file")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in spec["attrs"].items():
        setattr(m, k, v)
    for k, v in spec["buffers"].items():
        m.register_buffer(k, v)
    m.eval()
    return m


def save_quantized(qmodel: QuantizedModel, path) -> str:
    """Write a QuantizedModel to `path` (a .pt file of tensors and plain data)."""
    gm = qmodel.gm
    nodes, modules = [], {}
    for n in gm.graph.nodes:
        entry = {"op": n.op, "name": n.name, "args": _enc(tuple(n.args)), "kwargs": _enc(dict(n.kwargs))
                 if n.kwargs else {}}
        if n.op == "call_module":
            entry["target"] = n.target
            modules[n.target] = _module_spec(gm.get_submodule(n.target))
        elif n.op == "call_function":
            entry["target"] = _fname(n.target)
        elif n.op in ("call_method", "placeholder"):
            entry["target"] = n.target
        nodes.append(entry)
    blob = {"format": FORMAT, "nodes": nodes, "modules": modules, "output_info": info_to_data(qmodel.output_info),
            "input_kinds": list(qmodel.input_kinds)}
    path = os.fspath(path)
    torch.save(blob, path)
    return path


def load_quantized(path) -> QuantizedModel:
    """Read a file written by save_quantized (weights_only: no code is unpickled)."""
    path = os.fspath(path)
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a tvm_intlstm quantized model file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tvm_intlstm quantized model file (format {FORMAT})")
    root = nn.Module()
    for name, spec in blob["modules"].items():
        *parents, last = name.split(".")
        holder = root
        for p in parents:
            if not hasattr(holder, p):
                holder.add_module(p, nn.Module())
            holder = getattr(holder, p)
        holder.add_module(last, _module_from_spec(spec))
    g = fx.Graph()
    env = {}
    for e in blob["nodes"]:
        args, kwargs = _dec(e["args"], env), _dec(e["kwargs"], env)
        args = args if isinstance(args, tuple) else tuple(args)
        if e["op"] == "placeholder":
            n = g.placeholder(e["target"])
        elif e["op"] == "call_module":
            n = g.call_module(e["target"], args, kwargs)
        elif e["op"] == "call_function":
            if e["target"] not in _FUNCS:
                raise ValueError(f"function {e['target']!r} is not allowed in a quantized model file")
            n = g.call_function(_FUNCS[e["target"]], args, kwargs)
        elif e["op"] == "call_method":
            n = g.call_method(e["target"], args, kwargs)
        elif e["op"] == "output":
            n = g.output(args[0])
        else:
            raise ValueError(f"unexpected node kind {e['op']!r}")
        env[e["name"]] = n
    g.lint()
    gm = fx.GraphModule(root, g)
    return QuantizedModel(gm, info_from_data(blob["output_info"]), blob["input_kinds"])
