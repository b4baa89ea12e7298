"""Save and load quantized models as data only: integer tensors, numbers and strings, loadable with
`torch.load(weights_only=True)` (no pickled code). The fx graph is stored as a node list that
`load_quantized` validates against an allow-list before building anything from it (torch.fx turns
a graph into Python source, so a name or a method taken from the file unchecked would be code):
node kinds, call_function targets (the layout functions and getitem), call_method names (the
layout methods, no dunder methods), module classes (the integer modules of the layers registered
in quant/layers.py, by class name), and Python identifiers for every node,
placeholder, module and keyword-argument name. Anything else is refused with an error naming the
offending node."""
from __future__ import annotations

import keyword
import operator
import os

import torch
import torch.fx as fx
from torch import nn

from . import layers
from .graph import LAYOUT_FUNCS, LAYOUT_METHODS, QuantizedModel, info_from_data, info_to_data

FORMAT = "tvm_intlstm.quantized/1"
_FUNCS = {f"{getattr(f, '__module__', '') or 'torch'}.{f.__name__}": f for f in LAYOUT_FUNCS}
_FUNCS["_operator.getitem"] = operator.getitem
_METHODS = frozenset(m for m in LAYOUT_METHODS if not m.startswith("_"))
_OPS = ("placeholder", "call_module", "call_function", "call_method", "output")
_MAX_DEPTH = 16   # nesting of tuples/lists in one argument
# an input's name becomes a parameter of fx's generated forward: it must not shadow what that code uses
# (Python builtins such as `input` are fine: the generated code calls none)
_RESERVED = frozenset({"self", "torch", "operator", "_operator", "builtins", "fx_pytree", "pytree",
                       "inf", "nan", "NoneType", "device", "math"})


def _module_classes() -> dict:
    """Class name -> class of every module a model file may hold (the registered layers' integer
    modules; nothing else is ever instantiated from a file)."""
    return {c.__name__: c for c in layers.int_types()}


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
    if layers.for_int(m) is None:
        raise ValueError(f"cannot save module {type(m).__name__}: not the integer module of a registered "
                         "layer (tvm_intlstm/quant/layers.py)")
    attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
    return {"class": type(m).__name__, "attrs": attrs, "buffers": dict(m.named_buffers())}


def _module_from_spec(spec: dict) -> nn.Module:
    cls = _module_classes().get(spec["class"])
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


SEQ2SEQ_FORMAT = "tvm_intlstm.quantized-seq2seq/1"   # issue 18: an encoder + decoder pair in one file


def save_quantized(qmodel: QuantizedModel, path) -> str:
    """Write a QuantizedModel (or a seq2seq.QuantizedSeq2Seq: both models in one file) to `path`
    (a .pt file of tensors and plain data)."""
    from ..seq2seq import QuantizedSeq2Seq
    if not isinstance(qmodel, (QuantizedModel, QuantizedSeq2Seq)):
        raise TypeError(f"save_quantized takes a QuantizedModel or a QuantizedSeq2Seq, got {type(qmodel).__name__}"
                        + ("; convert it first: til.convert(model)" if hasattr(qmodel, "convert") else ""))
    blob = ({"format": SEQ2SEQ_FORMAT, "encoder": to_blob(qmodel.encoder), "decoder": to_blob(qmodel.decoder)}
            if isinstance(qmodel, QuantizedSeq2Seq) else to_blob(qmodel))
    path = os.fspath(path)
    torch.save(blob, path)
    return path


def to_blob(qmodel: QuantizedModel) -> dict:
    """A QuantizedModel as the data save_quantized writes."""
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
            "input_kinds": list(qmodel.input_kinds),
            # int8 activation inputs' scales (kind "act", issue 18), as {"index": scale}
            "input_scales": {str(k): float(v) for k, v in getattr(qmodel, "input_scales", {}).items()}}
    return blob


class ModelFileError(ValueError):
    """A quantized model file that is not valid data (the message names the file and the node)."""


def _is_ident(name) -> bool:
    """A plain Python identifier: not a keyword, not a dunder name."""
    return (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)
            and not (name.startswith("__") and name.endswith("__")))


def _is_dotted(name) -> bool:
    return isinstance(name, str) and bool(name) and all(_is_ident(p) for p in name.split("."))


def _check_arg(a, names: set, where: str, depth: int = 0) -> None:
    """An encoded graph argument: numbers, strings, None, lists, {"tuple": [...]},
    {"slice": [start, stop, step]} or {"node": name} of an earlier node."""
    if depth > _MAX_DEPTH:
        raise ModelFileError(f"{where}: arguments nested too deeply")
    if a is None or isinstance(a, (bool, int, float, str)):
        return
    if isinstance(a, list):
        for x in a:
            _check_arg(x, names, where, depth + 1)
        return
    if isinstance(a, dict) and len(a) == 1:
        (key, val), = a.items()
        if key == "node":
            if not isinstance(val, str) or val not in names:
                raise ModelFileError(f"{where}: refers to {val!r}, which is not an earlier node")
            return
        if key == "slice":
            if not (isinstance(val, list) and len(val) == 3
                    and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in val)):
                raise ModelFileError(f"{where}: malformed slice {val!r}")
            return
        if key == "tuple" and isinstance(val, list):
            for x in val:
                _check_arg(x, names, where, depth + 1)
            return
    raise ModelFileError(f"{where}: argument of unexpected form {a!r:.80}")


def _check_module_spec(name, spec, where: str) -> None:
    if not _is_dotted(name):
        raise ModelFileError(f"{where}: module name {name!r:.80} is not a dotted Python identifier")
    if not isinstance(spec, dict) or set(spec) != {"class", "attrs", "buffers"}:
        raise ModelFileError(f"{where}: module {name!r}: malformed description")
    if not isinstance(spec["class"], str) or spec["class"] not in _module_classes():
        raise ModelFileError(f"{where}: module {name!r}: unknown module type {spec['class']!r:.80}")
    if not isinstance(spec["attrs"], dict) or not isinstance(spec["buffers"], dict):
        raise ModelFileError(f"{where}: module {name!r}: malformed attributes")
    for k in spec["attrs"]:
        if not _is_ident(k) or k.startswith("_") or k == "training":
            raise ModelFileError(f"{where}: module {name!r}: attribute name {k!r:.80} is not allowed")
    for k, v in spec["buffers"].items():
        if not _is_ident(k) or k.startswith("_") or not isinstance(v, torch.Tensor):
            raise ModelFileError(f"{where}: module {name!r}: buffer {k!r:.80} is not allowed")


def validate_blob(blob, where: str = "quantized model file") -> None:
    """Check a loaded model file's content against the allow-list (see the module docstring);
    raises ModelFileError naming `where` and the offending node or module."""
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelFileError(f"{where} is not a tvm_intlstm quantized model file (format {FORMAT})")
    for key, typ in (("nodes", list), ("modules", dict), ("output_info", dict), ("input_kinds", list)):
        if not isinstance(blob.get(key), typ):
            raise ModelFileError(f"{where}: missing or malformed {key!r}")
    modules = blob["modules"]
    for name, spec in modules.items():
        _check_module_spec(name, spec, where)
    names: set = set()
    n_inputs = 0
    nodes = blob["nodes"]
    for i, e in enumerate(nodes):
        if not isinstance(e, dict):
            raise ModelFileError(f"{where}: node {i} is not a node description")
        op, name = e.get("op"), e.get("name")
        at = f"{where}: node {i} ({name!r:.80}, {op!r:.40})"
        if not isinstance(op, str) or op not in _OPS:
            raise ModelFileError(f"{at}: node kind {op!r:.80} is not allowed (allowed: {', '.join(_OPS)})")
        allowed_keys = {"op", "name", "args", "kwargs"} | ({"target"} if op != "output" else set())
        if not set(e) <= allowed_keys or not {"op", "name", "args", "kwargs"} <= set(e):
            raise ModelFileError(f"{at}: unexpected fields {sorted(map(str, e))}")
        if not _is_ident(name):
            raise ModelFileError(f"{at}: node name is not a Python identifier")
        if name in names:
            raise ModelFileError(f"{at}: duplicate node name")
        args, kwargs, target = e["args"], e["kwargs"], e.get("target")
        if not (isinstance(args, dict) and set(args) == {"tuple"} and isinstance(args["tuple"], list)):
            raise ModelFileError(f"{at}: malformed argument list")
        if not isinstance(kwargs, dict):
            raise ModelFileError(f"{at}: malformed keyword arguments")
        for k, v in kwargs.items():
            if not _is_ident(k):
                raise ModelFileError(f"{at}: keyword argument name {k!r:.80} is not a Python identifier")
            _check_arg(v, names, at)
        _check_arg(args, names, at)
        pos = args["tuple"]
        if op == "placeholder":
            if not _is_ident(target) or target in _RESERVED or pos or kwargs:
                raise ModelFileError(f"{at}: an input must be named by a plain Python identifier "
                                     f"(not one of {', '.join(sorted(_RESERVED))}), got {target!r:.80}")
            n_inputs += 1
        elif op == "call_module":
            if not isinstance(target, str) or target not in modules:
                raise ModelFileError(f"{at}: calls module {target!r:.80}, which the file does not define")
        elif op == "call_function":
            if not isinstance(target, str) or target not in _FUNCS:
                raise ModelFileError(f"{at}: function {target!r:.80} is not allowed in a quantized "
                                     f"model file (allowed: {', '.join(sorted(_FUNCS))})")
            if not pos or not (isinstance(pos[0], dict) and "node" in pos[0]):
                raise ModelFileError(f"{at}: a function must be applied to an earlier node")
        elif op == "call_method":
            if not isinstance(target, str) or target not in _METHODS:
                raise ModelFileError(f"{at}: method {target!r:.80} is not allowed in a quantized model "
                                     f"file (allowed: {', '.join(sorted(_METHODS))})")
            if not pos or not (isinstance(pos[0], dict) and "node" in pos[0]):
                raise ModelFileError(f"{at}: a method must be called on an earlier node")
        elif op == "output":
            if i != len(nodes) - 1 or len(pos) != 1 or kwargs:
                raise ModelFileError(f"{at}: the output must be the last node, with one argument")
        names.add(name)
    if not nodes or nodes[-1].get("op") != "output":
        raise ModelFileError(f"{where}: the node list does not end with an output node")
    kinds = blob["input_kinds"]
    if len(kinds) != n_inputs or any(k not in ("ids", "float", "state_h", "state_c", "lengths", "act") for k in kinds):  # states, act: issue 18
        raise ModelFileError(f"{where}: input_kinds {kinds!r:.80} do not match the {n_inputs} inputs")
    # optional (files before issue 18 have none): {"index": positive float} for each "act" input
    scales = blob.get("input_scales", {})
    if not isinstance(scales, dict) or set(scales) != {str(i) for i, k in enumerate(kinds) if k == "act"} or not all(
            isinstance(v, float) and v > 0 for v in scales.values()):
        raise ModelFileError(f"{where}: input_scales {scales!r:.80} must give a positive float scale for "
                             "each int8 activation input (kind 'act') and nothing else")


def load_quantized(path) -> QuantizedModel:
    """Read a file written by save_quantized. Data only: torch.load(weights_only=True) unpickles
    no code, and the graph is validated against an allow-list (`validate_blob`) before it is built;
    a file that does not pass raises ModelFileError (a ValueError) naming the offending node."""
    path = os.fspath(path)
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a tvm_intlstm quantized model file ({type(e).__name__}: {e})") from e
    if isinstance(blob, dict) and blob.get("format") == SEQ2SEQ_FORMAT:   # an encoder + decoder pair
        if set(blob) != {"format", "encoder", "decoder"}:
            raise ModelFileError(f"{path}: malformed encoder-decoder model file (fields {sorted(map(str, blob))})")
        from ..seq2seq import QuantizedSeq2Seq
        try:
            return QuantizedSeq2Seq(_from_blob(blob["encoder"], f"{path} (encoder)"),
                                    _from_blob(blob["decoder"], f"{path} (decoder)"))
        except (TypeError, ValueError) as e:
            if isinstance(e, ModelFileError):
                raise
            raise ModelFileError(f"{path}: inconsistent encoder-decoder model file ({e})") from e
    return _from_blob(blob, path)


def _from_blob(blob, path) -> QuantizedModel:
    try:
        validate_blob(blob, path)
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a form validate_blob did not foresee: still refused
        raise ModelFileError(f"{path}: malformed quantized model file ({type(e).__name__}: {e})") from e
    try:
        return _build(blob)
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a validated but inconsistent file
        raise ModelFileError(f"{path}: inconsistent quantized model file ({type(e).__name__}: {e})") from e


def _build(blob) -> QuantizedModel:
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
        args = _dec(e["args"], env)
        kwargs = {k: _dec(v, env) for k, v in e["kwargs"].items()}
        if e["op"] == "placeholder":
            n = g.placeholder(e["target"])
        elif e["op"] == "call_module":
            n = g.call_module(e["target"], args, kwargs)
        elif e["op"] == "call_function":
            n = g.call_function(_FUNCS[e["target"]], args, kwargs)
        elif e["op"] == "call_method":
            n = g.call_method(e["target"], args, kwargs)
        else:  # output (validate_blob allows nothing else)
            n = g.output(args[0])
        env[e["name"]] = n
    g.lint()
    gm = fx.GraphModule(root, g)
    return QuantizedModel(gm, info_from_data(blob["output_info"]), blob["input_kinds"],
                          {int(k): v for k, v in blob.get("input_scales", {}).items()})
