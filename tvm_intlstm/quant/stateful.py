"""LSTM states as model inputs and outputs (docs/stateful.md).

A float model whose forward passes model inputs as initial states, `self.lstm(x, (h0, c0))`,
becomes an integer model whose state inputs are integers in the formats of docs/integer_spec.md
section 8, one row per (layer, direction) as nn.LSTM stacks them:

    h0  int8  [L*D, B, H]   row l*D + d in layer l's hidden scale s_h (the scale of its h_n row)
    c0  int16 [L*D, B, H]   row l*D + d in layer l's cell format 2^-F_c

which are exactly the formats of the LSTM's h_n / c_n outputs: a step's returned states feed the
next step unchanged. `StateFormat` (quant/state_format.py, a leaf the integer modules import) describes one state input
and converts float states; this module finds the state inputs of a model graph (prepare) and their
formats (convert); `api.add_lstm_states` turns a quantized model without state inputs (e.g. the
shipped char LM) into one with them, keeping every integer module (no retraining).
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..nn.intmodules import IntLSTM
from .errors import UnsupportedModelError
from .state_format import STATE_KINDS, StateFormat

# --------------------------------------------------------------------------------------------
# prepare: recognise state inputs of nn.LSTM calls


def lstm_state_args(node: fx.Node):
    """The (h0, c0) nodes an nn.LSTM call node passes as initial states, or None without states.
    Raises UnsupportedModelError for forms the compiler cannot take."""
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


# --------------------------------------------------------------------------------------------
# the integer model's state inputs


def state_formats(gm: fx.GraphModule) -> list:
    """StateFormat of every state input of an integer graph, in input order."""
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
