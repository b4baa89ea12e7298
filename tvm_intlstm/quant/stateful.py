"""LSTM states as model inputs and outputs (docs/stateful.md).

A float model whose forward passes model inputs as initial states, `self.lstm(x, (h0, c0))`,
becomes an integer model whose state inputs are integers in the formats of docs/integer_spec.md
section 8, one row per (layer, direction) as nn.LSTM stacks them:

    h0  int8  [L*D, B, H]   row l*D + d in layer l's hidden scale s_h (the scale of its h_n row)
    c0  int16 [L*D, B, H]   row l*D + d in layer l's cell format 2^-F_c

which are exactly the formats of the LSTM's h_n / c_n outputs: a step's returned states feed the
next step unchanged. `StateFormat` describes one state input (and converts float states);
`add_lstm_states` turns a quantized model without state inputs (e.g. the shipped char LM) into one
with them, keeping every integer module (same weights, same scales, no retraining).

Kept apart from graph.py so that the layer handling there stays a few marked lines.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

STATE_KINDS = ("state_h", "state_c")   # input kinds of state inputs (QuantizedModel.input_kinds)


class StateError(ValueError):
    """An LSTM state given in the wrong form (dtype, shape) or to a model that takes none."""


@dataclass(frozen=True)
class StateFormat:
    """One state input of an integer model: which input, which LSTM, and the format of each row.

    kind "h": int8, row r holds layer r // D's hidden state at scale `scales[r]`;
    kind "c": int16, row r holds its cell state at scale `scales[r]` = 2^-cell_fracs[r]."""

    input_index: int      # position among the model's inputs
    kind: str             # "h" or "c"
    layer: str            # the LSTM module's name in the model
    num_layers: int
    num_directions: int
    hidden: int
    scales: tuple         # per row (L*D of them)
    cell_fracs: tuple = ()  # per row, kind "c" only

    @property
    def rows(self) -> int:
        return self.num_layers * self.num_directions

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.kind == "h" else torch.int16

    @property
    def bits(self) -> int:
        return 8 if self.kind == "h" else 16

    def shape(self, batch) -> tuple:
        return (self.rows, int(batch), self.hidden)

    def zeros(self, batch: int) -> torch.Tensor:
        """The zero state (what an LSTM called without states starts from)."""
        return torch.zeros(self.shape(batch), dtype=self.dtype)

    def quantize(self, x) -> torch.Tensor:
        """Float state [L*D, B, H] -> integers, each row with its own scale, by the input boundary's
        rule (spec 1): sat(floor(float32(x / s) + 0.5f)). Host-side, like quantizing features."""
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise StateError(f"quantize takes a float state, got {x.dtype} (integer states are already "
                             "quantized)")
        self._check_shape(tuple(x.shape), "float state")
        s = torch.tensor(self.scales, dtype=torch.float32).view(-1, 1, 1)
        q = torch.floor(x.to(torch.float32) / s + torch.tensor(0.5, dtype=torch.float32))
        lim = 2 ** (self.bits - 1)
        return q.clamp(-lim, lim - 1).to(self.dtype)

    def dequantize(self, q) -> torch.Tensor:
        """Integer state -> float32 (q * s per row)."""
        q = torch.as_tensor(q)
        self.check(q, "state")
        return q.to(torch.float32) * torch.tensor(self.scales, dtype=torch.float32).view(-1, 1, 1)

    def _check_shape(self, shape, what, batch=None):
        if len(shape) != 3 or shape[0] != self.rows or shape[2] != self.hidden or (
                batch is not None and shape[1] != batch):
            want = f"[{self.rows}, {'B' if batch is None else batch}, {self.hidden}]"
            raise StateError(
                f"{what} {self.kind}0 of LSTM '{self.layer}' has shape {list(shape)}, expected {want} "
                f"(num_layers * num_directions, batch, hidden)")

    def check(self, q, what="input", batch=None) -> None:
        """Raise StateError unless `q` (torch or numpy) is this state's dtype and shape."""
        dt = str(getattr(q, "dtype", type(q).__name__)).replace("torch.", "")
        want = "int8" if self.kind == "h" else "int16"
        if dt != want:
            raise StateError(
                f"{what} {self.kind}0 of LSTM '{self.layer}' must be {want} (the integer state, "
                f"[{self.rows}, B, {self.hidden}]), got {dt}: start from model.zero_state(batch), feed back "
                "the h_n / c_n the model returned, or convert float states with model.quantize_state(...)")
        self._check_shape(tuple(q.shape), what, batch)

    def to_data(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}

    @classmethod
    def from_data(cls, d: dict) -> "StateFormat":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


# --------------------------------------------------------------------------------------------
# prepare: recognise state inputs of nn.LSTM calls


def lstm_state_args(node: fx.Node):
    """The (h0, c0) nodes an nn.LSTM call node passes as initial states, or None without states.
    Raises UnsupportedModelError for forms the compiler cannot take."""
    from .graph import UnsupportedModelError
    extra = list(node.args[1:]) + [node.kwargs[k] for k in node.kwargs]
    if set(node.kwargs) - {"hx"} or len(extra) > 1:
        raise UnsupportedModelError(f"layer '{node.target}' (nn.LSTM) takes (input, hx) only, got "
                                    f"{len(node.args)} positional and {sorted(node.kwargs)} keyword arguments")
    if not extra or extra[0] is None:
        return None
    hx = extra[0]
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise UnsupportedModelError(
            f"layer '{node.target}' (nn.LSTM) gets its initial state as one value '{hx}': pass the two "
            "states as separate model inputs, `self.lstm(x, (h0, c0))` with forward(self, x, h0, c0)")
    for name, v in zip(("h0", "c0"), hx):
        if not (isinstance(v, fx.Node) and v.op == "placeholder"):
            raise UnsupportedModelError(
                f"layer '{node.target}' (nn.LSTM): its initial state {name} must be a model input (an "
                f"argument of forward) passed unchanged, got '{v}'; computed initial states are not "
                "supported")
    if hx[0] is hx[1]:
        raise UnsupportedModelError(f"layer '{node.target}' (nn.LSTM) takes the same input as h0 and c0; "
                                    "give them as two model inputs")
    return tuple(hx)


def state_input_kind(gm: fx.GraphModule, placeholder: fx.Node):
    """"state_h" / "state_c" if this model input is an nn.LSTM's initial state, else None.
    A state input must feed exactly one LSTM call and nothing else."""
    from torch import nn
    from .graph import UnsupportedModelError
    roles = []
    for u in placeholder.users:
        role = None
        if u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.LSTM):
            hx = lstm_state_args(u)
            if hx is not None and placeholder in hx:
                role = STATE_KINDS[hx.index(placeholder)]
        roles.append((u, role))
    kinds = {r for _, r in roles if r is not None}
    if not kinds:
        return None
    if len(roles) > 1:
        raise UnsupportedModelError(
            f"model input '{placeholder.name}' is an LSTM initial state and also used by "
            f"{', '.join(str(u) for u, _ in roles)}: a state input must feed one nn.LSTM call only")
    return kinds.pop()


def observe_states(module, hx):
    """Per-layer (h0, c0) float slices of an LSTM state tuple, for observers and the float loops;
    checks the shapes like nn.LSTM does. Returns None for hx=None."""
    if hx is None:
        return None
    m = module.lstm
    ndir = 2 if m.bidirectional else 1
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise ValueError("nn.LSTM initial state must be a tuple (h0, c0)")
    h0, c0 = hx
    for name, s in (("h0", h0), ("c0", c0)):
        if s.dim() != 3 or s.shape[0] != m.num_layers * ndir or s.shape[2] != m.hidden_size:
            raise ValueError(f"nn.LSTM initial state {name} must be [{m.num_layers * ndir}, B, {m.hidden_size}] "
                             f"(num_layers * num_directions, batch, hidden), got {list(s.shape)}")
    return h0, c0


# --------------------------------------------------------------------------------------------
# the integer model's state inputs


def state_formats(gm: fx.GraphModule) -> list:
    """StateFormat of every state input of an integer graph, in input order."""
    from ..nn.intmodules import IntLSTM
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) < 2 or node.args[1] is None:
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, IntLSTM):
            continue
        ndir = 2 if mod.bidirectional else 1
        H = int(mod.l0_d0_w_h.shape[1])
        for kind, ph in zip("hc", node.args[1]):
            if kind == "h":
                scales = tuple(float(s) for s in mod.layer_scales for _ in range(ndir))
                fracs = ()
            else:
                fracs = tuple(int(f) for f in mod.cell_fracs for _ in range(ndir))
                scales = tuple(2.0 ** -f for f in fracs)
            out.append(StateFormat(placeholders.index(ph), kind, str(node.target), mod.num_layers, ndir, H,
                                   scales, fracs))
    return sorted(out, key=lambda f: f.input_index)


def add_lstm_states(qmodel, layers=None):
    """A copy of an integer model whose LSTMs (all, or those named in `layers`) take their initial
    states as extra inputs and return their final states as extra outputs.

    New inputs come after the model's own, (h0, c0) per LSTM in graph order; outputs become
    (original outputs..., h_n, c_n per LSTM). Every integer module is kept: same weights, same
    scales, same bits from the zero state (so a model trained and quantized without states, like
    the shipped char LM, streams without retraining). Raises for LSTMs that already take states."""
    import copy

    from ..nn.intmodules import IntLSTM
    from .graph import QuantizedModel
    gm = copy.deepcopy(qmodel.gm)
    g = gm.graph
    lstms = [n for n in g.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), IntLSTM)]
    if layers is not None:
        unknown = set(layers) - {n.target for n in lstms}
        if unknown:
            raise ValueError(f"no LSTM named {sorted(unknown)} in the model; its LSTMs: "
                             f"{[n.target for n in lstms]}")
        lstms = [n for n in lstms if n.target in layers]
    if not lstms:
        raise ValueError("the model has no LSTM to give states to")
    out_node = next(n for n in g.nodes if n.op == "output")
    last_input = [n for n in g.nodes if n.op == "placeholder"][-1]
    outs, kinds = [], list(qmodel.input_kinds)
    for node in lstms:
        if len(node.args) > 1 and node.args[1] is not None:
            raise ValueError(f"LSTM '{node.target}' already takes states")
        stem = node.target.replace(".", "_")
        with g.inserting_after(last_input):
            c0 = g.placeholder(f"{stem}_c0")
        with g.inserting_after(last_input):
            h0 = g.placeholder(f"{stem}_h0")
        last_input = c0
        node.args = (node.args[0], (h0, c0))
        kinds += list(STATE_KINDS)
        with g.inserting_before(out_node):
            state = g.call_function(operator.getitem, (node, 1))
            outs += [g.call_function(operator.getitem, (state, 0)), g.call_function(operator.getitem, (state, 1))]
    old = out_node.args[0]
    old_outs = list(old) if isinstance(old, (tuple, list)) else [old]
    out_node.args = (tuple(old_outs + outs),)
    g.lint()
    gm.recompile()
    old_info = qmodel.output_info
    old_infos = list(old_info) if isinstance(old_info, (tuple, list)) else [old_info]
    from . import layers
    new_infos = []
    for node in lstms:
        mod = gm.get_submodule(node.target)
        st = layers.for_int(mod).out_info(mod).items[1]
        new_infos += list(st.items)
    return QuantizedModel(gm, tuple(old_infos + new_infos), kinds)


def convert_states(formats: list, states, how: str) -> tuple:
    """quantize / dequantize one state per StateFormat (shared by QuantizedModel and CompiledModule)."""
    if not formats:
        raise StateError("this model takes no LSTM states (see tvm_intlstm.add_lstm_states)")
    if len(states) != len(formats):
        raise StateError(f"the model has {len(formats)} state inputs "
                         f"({', '.join(f.kind + '0 of ' + f.layer for f in formats)}), got {len(states)} states")
    return tuple(getattr(f, how)(s) for f, s in zip(formats, states))


def input_count_hint(kinds: list, n_given: int) -> str:
    """The end of a wrong-input-count error: what the state inputs are, or that there are none."""
    n_states = sum(k in STATE_KINDS for k in kinds)
    if n_states:
        return (f" ({len(kinds) - n_states} data inputs, then {n_states} LSTM states: h0 int8 / c0 int16 "
                "[L*D, B, H] per LSTM; model.zero_state(batch) gives the initial ones)")
    if n_given > len(kinds):
        return ("; this model takes no LSTM states (it runs every call from the zero state): quantize a "
                "model whose forward passes (h0, c0) to nn.LSTM, or use tvm_intlstm.add_lstm_states(qmodel)")
    return ""
