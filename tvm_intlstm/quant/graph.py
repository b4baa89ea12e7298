"""Model graph handling: trace a float model with torch.fx, swap supported layers for
quantization-aware modules (prepare), and turn a prepared model into an integer-only model (convert).

Supported layers: those registered in quant/layers.py (nn.Embedding, nn.LSTM, nn.Linear,
nn.LayerNorm, nn.Dropout, nn.Identity), which also says how each is prepared and converted.
Supported glue: residual `+`, torch.cat, tuple indexing, and layout ops (transpose, permute,
reshape/view, flatten, contiguous, squeeze/unsqueeze, tensor indexing).
A Linear whose result reaches a model output is the final layer (int32 logits).
An nn.LSTM may take its initial states (h0, c0) from model inputs (quant/stateful.py, docs/stateful.md).
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn

from ..nn import modules as qm
from . import layers, state_format, stateful
from .config import QuantConfig
from .layers import LayerCall, QInfo, UnsupportedModelError  # noqa: F401  (re-exported)

LAYOUT_FUNCS = {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze,
                torch.unsqueeze, operator.getitem}
LAYOUT_METHODS = {"transpose", "permute", "reshape", "view", "flatten", "contiguous", "squeeze",
                  "unsqueeze", "__getitem__"}
ADD_FUNCS = {operator.add, torch.add, operator.iadd}
CAT_FUNCS = {torch.cat, torch.concat}


def _supported_list() -> str:
    return layers.supported_list()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        if isinstance(m, layers.float_types()):
            return True
        # any other torch.nn layer with its own parameters or computation is a leaf (rejected later)
        if type(m).__module__.startswith("torch.nn") and not isinstance(
                m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python in forward, ...
        raise UnsupportedModelError(
            f"could not trace {type(model).__name__}.forward with torch.fx ({type(e).__name__}: {e}). "
            "Models must have a static forward made of supported layers: " + _supported_list()) from e
    return fx.GraphModule(model, graph, type(model).__name__)


def _is_final(node: fx.Node) -> bool:
    """Does this node's value reach a graph output through layout-only ops?"""
    todo, seen = list(node.users), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "output":
            return True
        if (u.op == "call_function" and u.target in LAYOUT_FUNCS) or (
                u.op == "call_method" and u.target in LAYOUT_METHODS):
            todo.extend(u.users)
    return False


# input kind of an int8 activation computed outside the model at a known scale (issue 18: the
# decoder's encoder states, quant/seq2seq.py): no quantize kernel, its consumers see int8 at that scale
INT8_ACT_KIND = "act"


def _int8_input_scales(placeholders, int8_inputs) -> dict:
    """{placeholder node: scale} from `int8_inputs` ({input name or index: scale})."""
    out = {}
    for key, scale in (int8_inputs or {}).items():
        found = [n for i, n in enumerate(placeholders) if key in (i, n.target, n.name)]
        if not found:
            raise ValueError(f"int8_inputs names input {key!r}, but the model's inputs are "
                             f"{[n.target for n in placeholders]}")
        if not (isinstance(scale, float) or isinstance(scale, int)) or not scale > 0:
            raise ValueError(f"int8 input {key!r}: its scale must be a positive number, got {scale!r}")
        out[found[0]] = float(scale)
    return out


def prepare(model: nn.Module, config: QuantConfig, int8_inputs: dict | None = None) -> fx.GraphModule:
    """Trace `model` and swap its layers for quantization-aware modules (observe mode).

    int8_inputs ({input name or index: scale}): inputs that arrive as int8 activations at that scale
    (input kind "act"), e.g. an encoder's integer output fed to a decoder; calibration feeds them
    as floats on that grid (q * scale)."""
    model = copy.deepcopy(model)
    gm = trace(model)
    g = gm.graph
    counter = 0
    int8_scales = _int8_input_scales([n for n in g.nodes if n.op == "placeholder"], int8_inputs)

    def add_module(prefix, mod):
        nonlocal counter
        counter += 1
        name = f"{prefix}_{counter}"
        gm.add_submodule(name, mod)
        return name

    for node in list(g.nodes):
        if node.op == "placeholder":
            users = list(node.users)
            if node in int8_scales:  # issue 18: an external int8 activation, not quantized here
                node.meta["til_kind"], node.meta["til_scale"] = INT8_ACT_KIND, int8_scales[node]
                continue
            if users and all(u.op == "call_module" and getattr(layers.for_float(gm.get_submodule(u.target)),
                                                               "inputs", None) == "ids" for u in users):
                node.meta["til_kind"] = "ids"
                continue
            if not users:
                continue
            if layers.lengths_input_kind(gm, node):  # issue 18: attention source lengths, never quantized
                node.meta["til_kind"] = layers.LENGTHS_KIND
                continue
            state_kind = stateful.state_input_kind(gm, node)  # issue 18: an LSTM's (h0, c0) input
            if state_kind is not None:  # stays float here; the integer model takes integer states
                node.meta["til_kind"] = state_kind
                continue
            name = add_module("quant_input", qm.QuantInput(config))
            with g.inserting_after(node):
                q = g.call_module(name, (node,))
            node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            layer = layers.for_float(mod)
            if layer is not None:
                new = layer.prepare(mod, LayerCall(node, config, _is_final(node)))
            elif isinstance(mod, qm.QuantModule):
                continue
            else:
                raise UnsupportedModelError(
                    f"unsupported layer '{node.target}' ({type(mod).__module__}.{type(mod).__name__})."
                    f"{layers.unsupported_hint(mod)} Supported: {_supported_list()}")
            _set_submodule(gm, node.target, new)
        elif node.op == "call_function":
            if node.target in ADD_FUNCS:
                if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
                    raise UnsupportedModelError(
                        f"'{node.name}': only the sum of two tensors (a residual connection) is supported")
                name = add_module("residual_add", qm.QuantAdd(config))
                with g.inserting_before(node):
                    new_node = g.call_module(name, tuple(node.args))
                node.replace_all_uses_with(new_node)
                g.erase_node(node)
            elif node.target in CAT_FUNCS:
                tensors = node.args[0]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                name = add_module("cat", qm.QuantCat(dim, config))
                with g.inserting_before(node):
                    new_node = g.call_module(name, tuple(tensors))
                node.replace_all_uses_with(new_node)
                g.erase_node(node)
            elif node.target in LAYOUT_FUNCS:
                continue
            elif node.target is nn.functional.dropout:
                node.replace_all_uses_with(node.args[0])
                g.erase_node(node)
            else:
                raise UnsupportedModelError(
                    f"unsupported operation {getattr(node.target, '__name__', node.target)} at '{node.name}'. "
                    f"Supported: {_supported_list()}")
        elif node.op == "call_method":
            if node.target not in LAYOUT_METHODS:
                raise UnsupportedModelError(
                    f"unsupported tensor method .{node.target}() at '{node.name}'. Supported: {_supported_list()}")
        elif node.op == "get_attr":
            raise UnsupportedModelError(
                f"the model reads parameter/buffer '{node.target}' directly in forward; only layers are supported")
    g.lint()
    gm.recompile()
    return gm


def _set_submodule(gm: nn.Module, target: str, new: nn.Module):
    *path, last = target.split(".")
    parent = gm
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, new)


def set_mode(gm: nn.Module, mode: str):
    for m in gm.modules():
        if isinstance(m, qm.QuantModule):
            m.mode = mode


# --------------------------------------------------------------------------------------------
# convert: integer module per layer, scales propagated along the graph


def info_to_data(inf) -> dict:
    """QInfo (or a tuple of them) as plain data, for model files and library metadata."""
    if isinstance(inf, (tuple, list)):
        return {"seq": [info_to_data(i) for i in inf]}
    return {"kind": inf.kind, "scale": inf.scale, "items": [info_to_data(i) for i in inf.items]}


def info_from_data(d: dict):
    if "seq" in d:
        return tuple(info_from_data(i) for i in d["seq"])
    return QInfo(d["kind"], d["scale"], [info_from_data(i) for i in d["items"]])


def _getitem_info(src: QInfo, idx) -> QInfo:
    if src.kind == "tuple":
        return src.items[idx]
    if src.kind == "stack":
        rows = list(range(len(src.items)))
        first = idx[0] if isinstance(idx, tuple) else idx
        sel = rows[first] if isinstance(first, (int, slice)) else None
        if sel is None:
            raise UnsupportedModelError("h_n/c_n of an LSTM may only be indexed along the layer axis with an "
                                        "int or a slice")
        sel = sel if isinstance(sel, list) else [sel]
        infos = [src.items[i] for i in sel]
        if any(i.kind != infos[0].kind or i.scale != infos[0].scale for i in infos):
            raise UnsupportedModelError("selected rows of h_n/c_n come from layers with different scales; "
                                        "use one layer's rows (e.g. h_n[-1])")
        return infos[0]
    return src  # tensor indexing keeps the scale


def convert(prepared: fx.GraphModule) -> "QuantizedModel":
    """Integer-only model from a calibrated/trained prepared model."""
    gm = copy.deepcopy(prepared)
    info: dict[fx.Node, QInfo] = {}
    used: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind = node.meta.get("til_kind")
            if kind == INT8_ACT_KIND:   # an external int8 activation (prepare's int8_inputs)
                info[node] = QInfo(INT8_ACT_KIND, node.meta["til_scale"])
                continue
            info[node] = QInfo(kind) if kind in ("ids", layers.LENGTHS_KIND) + stateful.STATE_KINDS else QInfo("float")
        elif node.op == "call_module":
            mod = prepared.get_submodule(node.target)  # the prepared module (gm's copy gets replaced)
            if isinstance(mod, nn.Identity):
                info[node] = info[node.args[0]]
                continue
            layer = layers.for_qat(mod)
            if layer is None:
                raise UnsupportedModelError(f"'{node.target}' ({type(mod).__name__}) is not a registered layer "
                                            "(tvm_intlstm/quant/layers.py)")
            ins = [info[a] for a in node.args if isinstance(a, fx.Node)]
            for a, i in zip(node.args, ins):
                if layer.inputs == "float":
                    continue
                if layer.inputs == "ids":
                    if i.kind != "ids":
                        raise UnsupportedModelError(f"'{node.target}' ({_float_name(layer)}) must take a model "
                                                    "input of token ids directly")
                    continue
                if i.kind == layers.LENGTHS_KIND and getattr(mod, "takes_lengths", False):
                    continue  # issue 18: attention source lengths (quant/layers.py)
                if i.kind != "act":
                    raise UnsupportedModelError(
                        f"'{node.target}' consumes a {i.kind} value from '{a}'; integer layers take int8 "
                        "activations (a final linear layer's int32 logits and LSTM cell states cannot feed "
                        "other layers)")
            new = mod.to_int([i.scale for i in ins])
            k = used[node.target] = used.get(node.target, 0) + 1
            if k > 1:  # a layer called twice may see different input scales: one integer module per call
                name = node.target.replace(".", "_") + f"_call{k}"
                gm.add_submodule(name, new)
                node.target = name
            else:
                _set_submodule(gm, node.target, new)
            info[node] = layers.for_int(new).out_info(new)
        elif node.op in ("call_function", "call_method"):
            src = info[node.args[0]]
            if node.target in (operator.getitem, "__getitem__"):
                info[node] = _getitem_info(src, node.args[1])
            else:
                if src.kind in ("tuple", "stack") and node.target not in ("contiguous",):
                    raise UnsupportedModelError(f"layout op {node.target} on a tuple/stack value at '{node.name}'")
                info[node] = src
        elif node.op == "output":
            outs = node.args[0]
            info[node] = _tree_map(outs, lambda n: info[n])
    gm.recompile()
    out_info = info[next(n for n in gm.graph.nodes if n.op == "output")]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    in_kinds = [info[n].kind for n in placeholders]
    in_scales = {i: info[n].scale for i, n in enumerate(placeholders) if info[n].kind == INT8_ACT_KIND}
    return QuantizedModel(gm, out_info, in_kinds, in_scales)


def _float_name(layer) -> str:
    return ", ".join(f"nn.{t.__name__}" for t in layer.float_types) or layer.int_type.__name__


def _tree_map(x, f):
    if isinstance(x, (tuple, list)):
        return type(x)(_tree_map(v, f) for v in x)
    if isinstance(x, dict):
        return {k: _tree_map(v, f) for k, v in x.items()}
    if isinstance(x, fx.Node):
        return f(x)
    return x


def check_int8_inputs(args, kinds, scales) -> None:
    """Inputs of kind "act" (int8 activations computed elsewhere, e.g. an encoder's output) must be
    int8 (torch or numpy): a float there would be read as integers silently."""
    for i, (a, kind) in enumerate(zip(args, kinds)):
        dt = str(getattr(a, "dtype", type(a).__name__)).replace("torch.", "")
        if kind == INT8_ACT_KIND and dt != "int8":
            raise TypeError(f"input {i} takes int8 activations at scale {scales.get(i)} (an integer "
                            f"model's output, e.g. the encoder's), got {dt}")


class QuantizedModel(nn.Module):
    """An integer-only model: forward takes float32 features or int64 token ids and returns integer
    tensors (int8 activations, int32 logits). `output_info`/`output_scales` describe the outputs;
    `dequantize(outputs)` turns them into floats (the optional output boundary)."""

    def __init__(self, gm: fx.GraphModule, output_info, input_kinds, input_scales=None):
        super().__init__()
        self.gm = gm
        self.output_info = output_info
        self.input_kinds = input_kinds
        # {input index: scale} of the int8 activation inputs (kind "act", prepare's int8_inputs)
        self.input_scales = {int(k): float(v) for k, v in (input_scales or {}).items()}
        self.eval()

    def forward(self, *args):
        if len(args) != len(self.input_kinds):
            raise TypeError(f"model takes {len(self.input_kinds)} inputs, got {len(args)}"
                            + state_format.input_count_hint(self.input_kinds, len(args)))
        check_int8_inputs(args, self.input_kinds, self.input_scales)
        with torch.no_grad():
            return self.gm(*args)

    # LSTM states as inputs (issue 18; quant/stateful.py, docs/stateful.md) --------------------
    def state_formats(self) -> list:
        """StateFormat of each state input (int8 h / int16 c [L*D, B, H]), in input order; [] if the
        model takes no states."""
        return stateful.state_formats(self.gm)

    def zero_state(self, batch: int) -> tuple:
        """Zero integer states for every state input, in input order (append them to the inputs)."""
        return tuple(f.zeros(batch) for f in self.state_formats())

    def quantize_state(self, *states) -> tuple:
        """Float states (one per state input, in input order) -> integer states."""
        return state_format.convert_states(self.state_formats(), states, "quantize")

    def dequantize_state(self, *states) -> tuple:
        """Integer states (one per state input, in input order) -> float32."""
        return state_format.convert_states(self.state_formats(), states, "dequantize")

    @property
    def output_scales(self):
        return _tree_map_info(self.output_info, lambda i: i.scale)

    def dequantize(self, outputs):
        def deq(val, inf):
            if isinstance(inf, (tuple, list)):
                return type(inf)(deq(v, i) for v, i in zip(val, inf))
            if inf.kind == "tuple":
                return tuple(deq(v, i) for v, i in zip(val, inf.items))
            if inf.kind in ("act", "logits"):
                return val.to(torch.float32) * float(inf.scale)
            if inf.kind == "cell":
                return val.to(torch.float32) * 2.0**-inf.scale
            if inf.kind == "stack":
                return torch.stack([deq(v, i) for v, i in zip(val, inf.items)])
            return val
        return deq(outputs, self.output_info)


def _tree_map_info(inf, f):
    if isinstance(inf, (tuple, list)):
        return type(inf)(_tree_map_info(v, f) for v in inf)
    if inf.kind in ("tuple", "stack"):
        return tuple(_tree_map_info(v, f) for v in inf.items)
    return f(inf)
