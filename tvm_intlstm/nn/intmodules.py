"""Integer-only modules of a converted (deployable) model.

Each holds integer buffers only (plus the float scales of its outputs as metadata for
dequantization) and calls one `torch.ops.intlstm.*` op per integer operation, so `torch.export`
sees exactly the operators the compiler lowers. The numpy reference runs the same modules
through tvm_intlstm/quant/oracle.py.
"""
from __future__ import annotations

import torch
from torch import nn

from . import intops  # noqa: F401  (registers torch.ops.intlstm)

OPS = torch.ops.intlstm


class IntModule(nn.Module):
    """Base class: integer module with `out_scale` metadata (float, for dequantization only)."""

    out_scale: float = 1.0


class IntInput(IntModule):
    """Model boundary: float32 features -> int8 (spec 1)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.out_scale = self.scale

    def forward(self, x):
        if not torch.is_tensor(x) or x.dtype != torch.float32:
            raise TypeError(
                f"this model input takes float32 features, got {getattr(x, 'dtype', type(x))}; "
                "convert with x.float()")
        return OPS.quantize_input(x, self.scale)


class IntEmbedding(IntModule):
    def __init__(self, table: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("table", table.to(torch.int8))
        self.out_scale = float(scale)

    def forward(self, ids):
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"embedding input must be int64/int32 token ids, got {ids.dtype}")
        return OPS.embedding(ids, self.table)


class IntLinear(IntModule):
    """Hidden linear (int8 out, per-row multipliers) or final linear (int32 logits)."""

    def __init__(self, w, b, m=None, s=None, out_scale: float = 1.0):
        super().__init__()
        self.register_buffer("w", w.to(torch.int8))
        self.register_buffer("b", b.to(torch.int32))
        self.final = m is None
        if not self.final:
            self.register_buffer("m", m.to(torch.int32))
            self.register_buffer("s", s.to(torch.int32))
        self.out_scale = float(out_scale)

    def forward(self, x):
        if self.final:
            return OPS.linear_i32(x, self.w, self.b)
        return OPS.linear_requant(x, self.w, self.b, self.m, self.s, 8)


class IntLSTM(IntModule):
    """Stacked (optionally bidirectional) integer LSTM with nn.LSTM's call convention and outputs:
    (out int8, (h_n int8 [L*D, B, H], c_n int16 [L*D, B, H])). h_n rows have their layer's scale."""

    PARAMS = ("w_x", "w_h", "bias", "mx", "sx", "mh", "sh", "sig", "tanh", "tanh_c")

    def __init__(self, layers: list, batch_first: bool, bidirectional: bool):
        """layers: per layer a list (one per direction) of dicts with PARAMS tensors and ints
        mo, so, cell_frac; plus per layer 'scale' (s_h)."""
        super().__init__()
        self.batch_first = batch_first
        self.bidirectional = bidirectional
        self.num_layers = len(layers)
        self.scalars = []  # per (layer, dir): (mo, so, cell_frac)
        self.layer_scales = []
        self.cell_fracs = []
        for li, dirs in enumerate(layers):
            for d, p in enumerate(dirs):
                for k in self.PARAMS:
                    self.register_buffer(f"l{li}_d{d}_{k}", p[k])
                self.scalars.append((int(p["mo"]), int(p["so"]), int(p["cell_frac"])))
            self.layer_scales.append(float(dirs[0]["scale"]))
            self.cell_fracs.append(int(dirs[0]["cell_frac"]))
        self.out_scale = self.layer_scales[-1]

    def direction_params(self, li: int, d: int) -> dict:
        ndir = 2 if self.bidirectional else 1
        mo, so, cf = self.scalars[li * ndir + d]
        p = {k: getattr(self, f"l{li}_d{d}_{k}") for k in self.PARAMS}
        p.update(mo=mo, so=so, cell_frac=cf)
        return p

    def check_state(self, hx, batch) -> None:
        """Initial states must be the integer states of docs/stateful.md: h0 int8 and c0 int16, both
        [L*D, B, H] (a StateError, a ValueError, names what is wrong and how to get them right)."""
        from ..quant.state_format import StateError
        ndir = 2 if self.bidirectional else 1
        H = self.l0_d0_w_h.shape[1]
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise StateError("LSTM states must be a tuple (h0, c0)")
        for name, v, dt in (("h0", hx[0], torch.int8), ("c0", hx[1], torch.int16)):
            if not torch.is_tensor(v) or v.dtype != dt:
                raise StateError(
                    f"LSTM state {name} must be {str(dt)[6:]} [{self.num_layers * ndir}, B, {H}] (integer "
                    f"states, docs/stateful.md), got {getattr(v, 'dtype', type(v).__name__)}: start from "
                    "model.zero_state(batch), feed back the returned h_n / c_n, or convert float states "
                    "with model.quantize_state(...)")
            if v.dim() != 3 or v.shape[0] != self.num_layers * ndir or v.shape[2] != H or v.shape[1] != batch:
                raise StateError(f"LSTM state {name} has shape {list(v.shape)}, expected "
                                 f"[{self.num_layers * ndir}, {batch}, {H}] (num_layers * num_directions, "
                                 "batch, hidden)")

    def forward(self, x, hx=None):
        if x.dtype != torch.int8:
            raise TypeError(f"quantized LSTM input must be int8, got {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"LSTM input must be 3-D ({'[B, T, I]' if self.batch_first else '[T, B, I]'}), "
                             f"got shape {tuple(x.shape)}")
        h = x.transpose(0, 1) if self.batch_first else x
        ndir = 2 if self.bidirectional else 1
        if hx is not None:
            self.check_state(hx, h.shape[1])
        hs, cs = [], []
        for li in range(self.num_layers):
            outs = []
            for d in range(ndir):
                p = self.direction_params(li, d)
                # initial states (row li * ndir + d, as nn.LSTM stacks them) are passed positionally
                state = () if hx is None else (hx[0][li * ndir + d], hx[1][li * ndir + d])
                y, hT, cT = OPS.lstm_direction(
                    h, p["w_x"], p["w_h"], p["bias"], p["mx"], p["sx"], p["mh"], p["sh"],
                    p["sig"], p["tanh"], p["tanh_c"], p["mo"], p["so"], p["cell_frac"], d == 1, *state)
                outs.append(y)
                hs.append(hT)
                cs.append(cT)
            h = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        out = h.transpose(0, 1) if self.batch_first else h
        return out, (torch.stack(hs, 0), torch.stack(cs, 0))


class IntLayerNorm(IntModule):
    def __init__(self, gamma, beta, ml: int, sl: int, out_scale: float):
        super().__init__()
        self.register_buffer("gamma", gamma.to(torch.int16))
        self.register_buffer("beta", beta.to(torch.int64))
        self.ml, self.sl = int(ml), int(sl)
        self.out_scale = float(out_scale)

    def forward(self, x):
        return OPS.layer_norm(x, self.gamma, self.beta, self.ml, self.sl)


class IntAdd(IntModule):
    def __init__(self, ma: int, mb: int, s: int, out_scale: float):
        super().__init__()
        self.ma, self.mb, self.s = int(ma), int(mb), int(s)
        self.out_scale = float(out_scale)

    def forward(self, a, b):
        return OPS.residual_add(a, b, self.ma, self.mb, self.s)


class IntCat(IntModule):
    """Concatenation of int8 tensors; inputs at another scale are rescaled first (spec 2)."""

    def __init__(self, dim: int, rescales: list, out_scale: float):
        super().__init__()
        self.dim = int(dim)
        self.rescales = [None if r is None else (int(r[0]), int(r[1])) for r in rescales]
        self.out_scale = float(out_scale)

    def forward(self, *xs):
        parts = [x if r is None else OPS.rescale(x, r[0], r[1]) for x, r in zip(xs, self.rescales)]
        return torch.cat(parts, dim=self.dim)


# ---------------------------------------------------------------------------------------------
# attention (issue 18 item 3; docs/integer_spec.md section 11)


class IntAttention:
    """Mixin of the integer attention layers (not a layer itself: every IntModule subclass is a
    registered layer): forward(query int8 [B, Dq] or [B, Q, Dq], keys int8 [B, S, Dk], lengths
    int32/int64 [B] or None) -> (context int8 [B, (Q,) Dk] at `out_scale`, weights int16 [B, (Q,) S]
    Q0.15). The layers give `scores(q [B, Q, Dq], keys) -> int32`."""

    def init_attention(self, query_size: int, key_size: int, mz: int, sz: int, exp_table, mc: int, sc: int,
                       out_scale: float):
        self.query_size, self.key_size = int(query_size), int(key_size)
        self.mz, self.sz, self.mc, self.sc = int(mz), int(sz), int(mc), int(sc)
        self.register_buffer("exp_table", exp_table.to(torch.int32))
        self.out_scale = float(out_scale)

    def check_inputs(self, query, keys, lengths) -> None:
        """Clear errors for wrong dtypes, shapes and negative lengths (the torch ops would not)."""
        for name, v, size in (("query", query, self.query_size), ("keys", keys, self.key_size)):
            if v.dtype != torch.int8:
                raise TypeError(f"integer attention {name} must be int8, got {v.dtype}")
            if v.shape[-1] != size:
                raise ValueError(f"integer attention {name} must have {size} features, got {list(v.shape)}")
        if query.dim() not in (2, 3) or keys.dim() != 3:
            raise ValueError(f"integer attention takes query [B, Dq] or [B, Q, Dq] and keys [B, S, Dk], got "
                             f"{list(query.shape)} and {list(keys.shape)}")
        if lengths is None:
            return
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"attention lengths must be int32/int64 [B], got {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"attention lengths must be [B], got {list(lengths.shape)}")
        # (a value check: not while torch.export traces the graph, where it has no value)
        if not torch.compiler.is_compiling() and lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"attention lengths must be >= 0, got {int(lengths.min())}")

    def forward(self, query, keys, lengths=None):
        self.check_inputs(query, keys, lengths)
        squeeze = query.dim() == 2
        q = query.unsqueeze(1) if squeeze else query
        z = self.scores(q, keys)
        if lengths is None:
            p = OPS.softmax(z, self.mz, self.sz, self.exp_table)
        else:
            p = OPS.masked_softmax(z, lengths, self.mz, self.sz, self.exp_table)
        ctx = OPS.attention_context(p, keys.unsqueeze(1), self.mc, self.sc)   # values = keys
        return (ctx.squeeze(1), p.squeeze(1)) if squeeze else (ctx, p)


class IntLuongAttention(IntAttention, IntModule):
    """Luong dot (w is None) or general (q' = requantize_8(W q) first) scores (spec 11.1)."""

    def __init__(self, query_size, key_size, w, m, s, **common):
        IntModule.__init__(self)
        self.init_attention(query_size, key_size, **common)
        self.general = w is not None
        if self.general:
            self.register_buffer("w", w.to(torch.int8))
            self.register_buffer("b", torch.zeros(w.shape[0], dtype=torch.int32))
            self.register_buffer("m", m.to(torch.int32))
            self.register_buffer("s", s.to(torch.int32))

    def scores(self, q, keys):
        if self.general:
            q = OPS.linear_requant(q, self.w, self.b, self.m, self.s, 8)
        return OPS.attention_dot(q, keys)


class IntBahdanauAttention(IntAttention, IntModule):
    """Additive scores (spec 11.1): Q3.12 projections of queries and keys, PWL tanh, dot with v."""

    def __init__(self, query_size, key_size, w_q, m_q, s_q, w_k, b_k, m_k, s_k, v, tanh_table, **common):
        IntModule.__init__(self)
        self.init_attention(query_size, key_size, **common)
        for name, t, dt in (("w_q", w_q, torch.int8), ("m_q", m_q, torch.int32), ("s_q", s_q, torch.int32),
                            ("w_k", w_k, torch.int8), ("b_k", b_k, torch.int32), ("m_k", m_k, torch.int32),
                            ("s_k", s_k, torch.int32), ("v", v, torch.int8), ("tanh_table", tanh_table, torch.int32)):
            self.register_buffer(name, t.to(dt))
        self.register_buffer("b_q", torch.zeros(w_q.shape[0], dtype=torch.int32))

    def scores(self, q, keys):
        qx = OPS.linear_requant(q, self.w_q, self.b_q, self.m_q, self.s_q, 16)
        kx = OPS.linear_requant(keys, self.w_k, self.b_k, self.m_k, self.s_k, 16)   # all positions at once
        return OPS.additive_scores(qx, kx, self.v, self.tanh_table)


class IntMultiheadAttention(IntAttention, IntModule):
    """Multi-head attention for a decoder query (spec 11.4): int8 q/k/v projections (hidden linear
    layers, k and v over every source position), per-head dot scores (`mha_scores`; 1/sqrt(dh) is
    in (mz, sz)), the (masked) softmax per head, each head's context (`attention_context`, one
    scale for all heads), the heads concatenated and the int8 output projection. forward(query,
    keys, lengths) -> (output int8 [B, (Q,) E] at `out_scale`, weights int16 [B, H, (Q,) S] Q0.15)."""

    PROJECTIONS = ("q", "k", "v", "o")

    def __init__(self, query_size, key_size, num_heads, proj: dict, ctx_scale: float, out_scale: float,
                 **common):
        """proj: for each of q, k, v, o a tuple (w int8, b int32, m int32, s int32) of its hidden
        linear layer (spec 5); common: mz, sz, exp_table, mc, sc as the other attention layers."""
        IntModule.__init__(self)
        self.init_attention(query_size, key_size, out_scale=ctx_scale, **common)
        self.num_heads = int(num_heads)
        if self.num_heads < 1 or self.query_size % self.num_heads:
            raise ValueError(f"embed size {self.query_size} must be a multiple of num_heads {self.num_heads}")
        self.ctx_scale = float(ctx_scale)
        self.out_scale = float(out_scale)
        for p in self.PROJECTIONS:
            for name, t, dt in zip("wbms", proj[p], (torch.int8, torch.int32, torch.int32, torch.int32)):
                self.register_buffer(f"{name}_{p}", t.to(dt))

    def linear(self, x, p: str):
        """The hidden linear layer of projection p (q, k, v or o): requantize_8(W x + b)."""
        return OPS.linear_requant(x, getattr(self, f"w_{p}"), getattr(self, f"b_{p}"), getattr(self, f"m_{p}"),
                                  getattr(self, f"s_{p}"), 8)

    def forward(self, query, keys, lengths=None):
        self.check_inputs(query, keys, lengths)
        squeeze = query.dim() == 2
        q = self.linear(query.unsqueeze(1) if squeeze else query, "q")   # [B, Q, E]
        k = self.linear(keys, "k")                                        # [B, S, E], every position
        v = self.linear(keys, "v")
        z = OPS.mha_scores(q, k, self.num_heads)                          # [B, H, Q, S]
        if lengths is None:
            p = OPS.softmax(z, self.mz, self.sz, self.exp_table)
        else:
            p = OPS.masked_softmax(z, lengths, self.mz, self.sz, self.exp_table)
        dh = self.query_size // self.num_heads
        vh = v.unflatten(-1, (self.num_heads, dh)).transpose(1, 2).unsqueeze(2)   # [B, H, 1, S, dh]
        ctx = OPS.attention_context(p, vh, self.mc, self.sc)               # [B, H, Q, dh]
        out = self.linear(ctx.transpose(1, 2).flatten(-2), "o")            # heads concatenated: [B, Q, E]
        return (out.squeeze(1), p.squeeze(2)) if squeeze else (out, p)
