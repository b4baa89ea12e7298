"""The layer registry: each layer type the quantizer supports, registered once.

A `Layer` ties together what the rest of the package needs to know about one layer type (the
model of torchao's `register_quantize_module_handler`):

- prepare (quant/graph.py): the float module types it replaces and the handler making the
  quantization-aware module (`prepare(float_module, call) -> QAT module`);
- convert (quant/graph.py): the QAT module's `to_int(input_scales)` makes the integer module;
  `inputs` says what the layer consumes and `out_info` what its integer outputs are;
- serialization (quant/serialize.py): the integer module's class is on the model file's
  allow-list (its attributes and buffers are stored as data);
- the numpy reference (quant/oracle.py): `reference(int_module, numpy_args)`, the integer
  module's forward with each torch op replaced by its numpy reference (`opdefs.reference_ops`).

Layers made from graph functions rather than modules (residual `+`, torch.cat, the input
boundary) are created by quant/graph.py and registered here for the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..nn import intmodules as im
from ..nn.ln_lstm import LayerNormLSTM
from ..nn import modules as qm
from ..opdefs import reference_ops as R
from .config import QuantConfig
from .errors import UnsupportedModelError  # noqa: F401  (re-exported)
from .ln_lstm import IntLNLSTM, QuantLNLSTM
from . import stateful


@dataclass
class QInfo:
    """What an integer value is: 'act' int8 (scale), 'logits' int32 (scale), 'cell' int16 (frac),
    'ids', 'stack' (per-row infos of h_n/c_n), or 'tuple'."""

    kind: str
    scale: Any = None
    items: list = field(default_factory=list)


@dataclass(frozen=True)
class LayerCall:
    """Where prepare meets a float layer: its graph node and what the handler may need."""

    node: fx.Node
    config: QuantConfig
    final: bool          # does its result reach a model output through layout ops only?


def _act_info(mod) -> QInfo:
    return QInfo("act", mod.out_scale)


@dataclass(frozen=True)
class Layer:
    int_type: type                               # the integer module (convert's product)
    reference: Callable[[nn.Module, list], Any]  # (integer module, numpy args) -> numpy outputs
    float_types: tuple = ()                      # float modules that prepare replaces
    prepare: Optional[Callable[[nn.Module, LayerCall], nn.Module]] = None
    qat_type: Optional[type] = None              # the quantization-aware module (to_int: convert)
    inputs: str = "act"                          # what it consumes: "act" (int8), "float", "ids", "any"
    out_info: Callable[[nn.Module], QInfo] = _act_info
    describe: str = ""                           # for error messages listing the supported layers


LAYERS: list[Layer] = []


def register_layer(layer: Layer) -> Layer:
    """Register a layer type (its integer module type must be new)."""
    if any(lay.int_type.__name__ == layer.int_type.__name__ for lay in LAYERS):
        # (model files name the integer module by class name: it must be unique)
        raise ValueError(f"a layer with integer module {layer.int_type.__name__} is already registered")
    if layer.inputs not in ("act", "float", "ids", "any"):
        raise ValueError(f"layer {layer.int_type.__name__}: inputs must be act, float, ids or any")
    if layer.float_types and layer.prepare is None:
        raise ValueError(f"layer {layer.int_type.__name__}: float types without a prepare handler")
    LAYERS.append(layer)
    return layer


def unregister_layer(int_type: type) -> None:
    """Remove a registration (for tests that register toy layers)."""
    LAYERS[:] = [lay for lay in LAYERS if lay.int_type is not int_type]


def _find(pred):
    return next((lay for lay in LAYERS if pred(lay)), None)


def for_float(mod: nn.Module) -> Optional[Layer]:
    """The layer replacing float module `mod` in prepare (None: not supported)."""
    return _find(lambda lay: isinstance(mod, lay.float_types))


def for_qat(mod: nn.Module) -> Optional[Layer]:
    return _find(lambda lay: lay.qat_type is not None and isinstance(mod, lay.qat_type))


def for_int(mod: nn.Module) -> Optional[Layer]:
    """The layer of an integer module (exact type: the model file and the reference key on it)."""
    return _find(lambda lay: type(mod) is lay.int_type)


def float_types() -> tuple:
    return tuple(t for lay in LAYERS for t in lay.float_types)


def int_types() -> tuple:
    """The integer module classes a quantized model (and its file) may hold."""
    return tuple(lay.int_type for lay in LAYERS)


def supported_list() -> str:
    return ", ".join(lay.describe for lay in LAYERS if lay.describe) + \
        ", residual '+', torch.cat and layout ops"


def to_numpy(t):
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def reference(mod: nn.Module, args: list):
    """Run one integer module of a quantized model on numpy arguments with the numpy reference."""
    layer = for_int(mod)
    if layer is None:
        raise NotImplementedError(f"reference has no implementation for {type(mod).__name__}")
    return layer.reference(mod, args)


# ---------------------------------------------------------------------------------------------
# the layers


register_layer(Layer(
    im.IntInput, qat_type=qm.QuantInput, inputs="float",
    reference=lambda mod, a: R.quantize_input(a[0], mod.scale)))


register_layer(Layer(
    im.IntEmbedding, float_types=(nn.Embedding,), qat_type=qm.QuantEmbedding, inputs="ids",
    prepare=lambda mod, call: qm.QuantEmbedding(mod, call.config),
    reference=lambda mod, a: R.embedding(a[0], to_numpy(mod.table)),
    describe="nn.Embedding"))


def _lstm_prepare(mod: nn.LSTM, call: LayerCall):
    stateful.lstm_state_args(call.node)  # initial states must be model inputs (quant/stateful.py)
    return qm.QuantLSTM(mod, call.config)


def _check_states(mod, hx, batch):
    """The integer model's state checks (IntLSTM.check_state) on numpy states: the oracle never
    casts a wrong dtype silently."""
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise ValueError("LSTM states must be a tuple (h0, c0)")
    mod.check_state(tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in hx), batch)


def _lstm_reference(mod: im.IntLSTM, a):
    x = a[0]
    h = np.swapaxes(x, 0, 1) if mod.batch_first else x
    hx = a[1] if len(a) > 1 else None  # initial states (docs/stateful.md)
    ndir = 2 if mod.bidirectional else 1
    if hx is not None:
        _check_states(mod, hx, h.shape[1])
    def direction(h, li, d):
        p, r = mod.direction_params(li, d), li * ndir + d
        return R.lstm_direction(h, *(to_numpy(p[k]) for k in im.IntLSTM.PARAMS),
                                p["mo"], p["so"], p["cell_frac"], d == 1,
                                None if hx is None else hx[0][r], None if hx is None else hx[1][r])

    return _stacked_reference(mod, h, ndir, direction)


def _stacked_reference(mod, h, ndir: int, direction):
    """A stacked (bidirectional) recurrent layer in the oracle: direction(h, layer, d) -> (y, h_T,
    c_T) per layer and direction, outputs concatenated, states stacked as nn.LSTM does."""
    hs, cs = [], []
    for li in range(mod.num_layers):
        outs = []
        for d in range(ndir):
            y, hT, cT = direction(h, li, d)
            outs.append(y)
            hs.append(hT)
            cs.append(cT)
        h = np.concatenate(outs, axis=-1)
    out = np.swapaxes(h, 0, 1) if mod.batch_first else h
    return out, (np.stack(hs), np.stack(cs))


def _lstm_info(mod: im.IntLSTM) -> QInfo:
    ndir = 2 if mod.bidirectional else 1
    h_rows = [QInfo("act", s) for s in mod.layer_scales for _ in range(ndir)]
    c_rows = [QInfo("cell", f) for f in mod.cell_fracs for _ in range(ndir)]
    return QInfo("tuple", items=[QInfo("act", mod.out_scale),
                                 QInfo("tuple", items=[QInfo("stack", items=h_rows),
                                                       QInfo("stack", items=c_rows)])])


register_layer(Layer(
    im.IntLSTM, float_types=(nn.LSTM,), qat_type=qm.QuantLSTM, prepare=_lstm_prepare,
    reference=_lstm_reference, out_info=_lstm_info,
    describe="nn.LSTM (any num_layers, bidirectional, batch_first, bias; no proj_size; initial "
             "states (h0, c0) as model inputs)"))


def _linear_reference(mod: im.IntLinear, a):
    w, b = to_numpy(mod.w), to_numpy(mod.b)
    if mod.final:
        return R.linear_i32(a[0], w, b)
    return R.linear_requant(a[0], w, b, to_numpy(mod.m), to_numpy(mod.s), 8)


def _linear_info(mod: im.IntLinear) -> QInfo:
    return QInfo("logits", mod.out_scale) if mod.final else QInfo("act", mod.out_scale)


register_layer(Layer(
    im.IntLinear, float_types=(nn.Linear,), qat_type=qm.QuantLinear,
    prepare=lambda mod, call: qm.QuantLinear(mod, call.config, final=call.final),
    reference=_linear_reference, out_info=_linear_info, describe="nn.Linear"))


register_layer(Layer(
    im.IntLayerNorm, float_types=(nn.LayerNorm,), qat_type=qm.QuantLayerNorm,
    prepare=lambda mod, call: qm.QuantLayerNorm(mod, call.config),
    reference=lambda mod, a: R.layer_norm(a[0], to_numpy(mod.gamma), to_numpy(mod.beta), mod.ml, mod.sl),
    describe="nn.LayerNorm (last dim)"))


register_layer(Layer(
    im.IntAdd, qat_type=qm.QuantAdd,
    reference=lambda mod, a: R.residual_add(a[0], a[1], mod.ma, mod.mb, mod.s)))


def _cat_reference(mod: im.IntCat, a):
    parts = [x if r is None else R.rescale(x, r[0], r[1]) for x, r in zip(a, mod.rescales)]
    return np.concatenate(parts, axis=mod.dim)


register_layer(Layer(im.IntCat, qat_type=qm.QuantCat, reference=_cat_reference))


# dropout is the identity at inference; the module stays in the graph and passes its input on
register_layer(Layer(
    nn.Identity, float_types=(nn.Dropout, nn.Identity), inputs="any",
    prepare=lambda mod, call: nn.Identity(), reference=lambda mod, a: a[0], describe="nn.Dropout"))


# --- layer-norm LSTM (tvm_intlstm.nn.LayerNormLSTM; spec 8b) --------------------------------------

def _ln_lstm_reference(mod, a):
    x = a[0]
    if len(a) > 1 and a[1] is not None:
        raise NotImplementedError("initial states of a LayerNormLSTM are not supported yet")
    h = np.swapaxes(x, 0, 1) if mod.batch_first else x

    def direction(h, li, d):
        args = mod.direction_args(li * mod.ndir + d)
        return R.ln_lstm_direction(h, *(to_numpy(v) if torch.is_tensor(v) else v for v in args))

    return _stacked_reference(mod, h, mod.ndir, direction)


register_layer(Layer(
    IntLNLSTM, float_types=(LayerNormLSTM,), qat_type=QuantLNLSTM,
    prepare=lambda mod, call: QuantLNLSTM(mod, call.config), reference=_ln_lstm_reference,
    out_info=_lstm_info,
    describe="tvm_intlstm.nn.LayerNormLSTM (any num_layers, bidirectional, batch_first; no states yet)"))


# ---------------------------------------------------------------------------------------------
# attention (issue 18 item 3; docs/integer_spec.md section 11): (query, keys[, lengths]) ->
# (context int8, weights int16 Q0.15). The source lengths are a model input of kind "lengths"
# (int32/int64 [B], passed to the integer model unchanged, like token ids).

from ..nn.attention import BahdanauAttention, LuongAttention, MultiheadAttention  # noqa: E402

LENGTHS_KIND = "lengths"
_ATTENTION_FLOAT = (LuongAttention, BahdanauAttention, MultiheadAttention)


def _attention_lengths_arg(node: fx.Node):
    """The lengths argument of an attention call node (positional or keyword), or None."""
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("lengths")


def lengths_input_kind(gm, placeholder: fx.Node):
    """"lengths" if this model input is the source lengths of attention layers (and nothing else),
    else None (quant/graph.py prepare asks it for every model input)."""
    roles = []
    for u in placeholder.users:
        is_att = u.op == "call_module" and isinstance(gm.get_submodule(u.target), _ATTENTION_FLOAT)
        roles.append(is_att and _attention_lengths_arg(u) is placeholder
                     and placeholder not in u.args[:2])
    if not any(roles):
        return None
    if not all(roles):
        raise UnsupportedModelError(
            f"model input '{placeholder.name}' is the source lengths of an attention layer and also used "
            "otherwise: give the lengths as their own model input (int32/int64 [B])")
    return LENGTHS_KIND


def _attention_prepare(qat_type):
    def prepare(mod, call: LayerCall):
        node = call.node
        if len(node.args) < 2 or set(node.kwargs) - {"lengths"} or len(node.args) + len(node.kwargs) > 3:
            raise UnsupportedModelError(f"attention layer '{node.target}' takes (query, keys, lengths=None)")
        lengths = _attention_lengths_arg(node)
        if lengths is not None:
            if not (isinstance(lengths, fx.Node) and lengths.op == "placeholder"):
                raise UnsupportedModelError(
                    f"attention layer '{node.target}': its lengths must be a model input (int32/int64 [B]) "
                    f"passed unchanged, got '{lengths}'")
            node.args, node.kwargs = (node.args[0], node.args[1], lengths), {}   # convert reads args only
        return qat_type(mod, call.config)
    return prepare


def _attention_reference(mod: im.IntAttention, a):
    query, keys = a[0], a[1]
    lengths = a[2] if len(a) > 2 else None
    mod.check_inputs(*(None if v is None else torch.from_numpy(np.ascontiguousarray(v)) for v in (query, keys, lengths)))
    squeeze = query.ndim == 2
    q = query[:, None] if squeeze else query
    if isinstance(mod, im.IntLuongAttention):
        if mod.general:
            q = R.linear_requant(q, to_numpy(mod.w), to_numpy(mod.b), to_numpy(mod.m), to_numpy(mod.s), 8)
        z = R.attention_dot(q, keys)
    else:
        qx = R.linear_requant(q, to_numpy(mod.w_q), to_numpy(mod.b_q), to_numpy(mod.m_q), to_numpy(mod.s_q), 16)
        kx = R.linear_requant(keys, to_numpy(mod.w_k), to_numpy(mod.b_k), to_numpy(mod.m_k), to_numpy(mod.s_k), 16)
        z = R.additive_scores(qx, kx, to_numpy(mod.v), to_numpy(mod.tanh_table))
    table = to_numpy(mod.exp_table)
    p = (R.softmax(z, mod.mz, mod.sz, table) if lengths is None
         else R.masked_softmax(z, lengths, mod.mz, mod.sz, table))
    ctx = R.attention_context(p, keys[:, None], mod.mc, mod.sc)
    return (ctx[:, 0], p[:, 0]) if squeeze else (ctx, p)


def _attention_info(mod: im.IntAttention) -> QInfo:
    # the weights are int16 at scale 2^-15: the "cell" kind's format (int16, scale 2^-frac)
    return QInfo("tuple", items=[QInfo("act", mod.out_scale), QInfo("cell", 15)])


register_layer(Layer(
    im.IntLuongAttention, float_types=(LuongAttention,), qat_type=qm.QuantLuongAttention,
    prepare=_attention_prepare(qm.QuantLuongAttention), reference=_attention_reference,
    out_info=_attention_info, describe="tvm_intlstm.nn.LuongAttention (dot, general; lengths masks)"))

register_layer(Layer(
    im.IntBahdanauAttention, float_types=(BahdanauAttention,), qat_type=qm.QuantBahdanauAttention,
    prepare=_attention_prepare(qm.QuantBahdanauAttention), reference=_attention_reference,
    out_info=_attention_info, describe="tvm_intlstm.nn.BahdanauAttention (lengths masks)"))



# --- multi-head attention for a decoder query (tvm_intlstm.nn.MultiheadAttention; spec 11.4) ------

def _mha_reference(mod: im.IntMultiheadAttention, a):
    query, keys = a[0], a[1]
    lengths = a[2] if len(a) > 2 else None
    mod.check_inputs(*(None if v is None else torch.from_numpy(np.ascontiguousarray(v)) for v in (query, keys, lengths)))
    squeeze = query.ndim == 2

    def linear(x, p):
        return R.linear_requant(x, *(to_numpy(getattr(mod, f"{n}_{p}")) for n in "wbms"), 8)

    q = linear(query[:, None] if squeeze else query, "q")
    k, v = linear(keys, "k"), linear(keys, "v")
    z = R.mha_scores(q, k, mod.num_heads)
    table = to_numpy(mod.exp_table)
    p = (R.softmax(z, mod.mz, mod.sz, table) if lengths is None
         else R.masked_softmax(z, lengths, mod.mz, mod.sz, table))
    B, S, E = v.shape
    H = mod.num_heads
    vh = v.reshape(B, S, H, E // H).transpose(0, 2, 1, 3)[:, :, None]      # [B, H, 1, S, dh]
    ctx = R.attention_context(p, vh, mod.mc, mod.sc)                      # [B, H, Q, dh]
    out = linear(ctx.transpose(0, 2, 1, 3).reshape(B, ctx.shape[2], E), "o")
    return (out[:, 0], p[:, :, 0]) if squeeze else (out, p)


register_layer(Layer(
    im.IntMultiheadAttention, float_types=(MultiheadAttention,), qat_type=qm.QuantMultiheadAttention,
    prepare=_attention_prepare(qm.QuantMultiheadAttention), reference=_mha_reference,
    out_info=_attention_info,
    describe="tvm_intlstm.nn.MultiheadAttention (a torch.nn.MultiheadAttention called as (query, keys, "
             "lengths); decoder queries over encoder states, lengths masks)"))


def unsupported_hint(mod: nn.Module) -> str:
    """A hint for a float module no layer supports, naming what to use instead ("" if none)."""
    if isinstance(mod, nn.MultiheadAttention):
        return (" For multi-head attention over encoder states use tvm_intlstm.nn.MultiheadAttention "
                "(a torch.nn.MultiheadAttention subclass with the same weights: "
                "tvm_intlstm.nn.MultiheadAttention.from_torch(mha)), called as attn(query, keys, lengths) "
                "with batch-first tensors and source lengths [B] instead of a key_padding_mask.")
    return ""
