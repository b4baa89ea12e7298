"""The integer formats of LSTM state inputs and outputs (docs/stateful.md): `StateFormat`, the
errors of misused states, conversions. A leaf module (torch only): the integer and QAT modules
(nn/) import it without importing the quantizer's graph handling (quant/stateful.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
