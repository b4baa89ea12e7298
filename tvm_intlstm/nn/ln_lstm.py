"""Float layer-norm LSTM (Ba et al. 2016), the model-side module of docs/integer_spec.md section 8b.

    lstm = tvm_intlstm.nn.LayerNormLSTM(input_size, hidden_size, num_layers=1, batch_first=False,
                                        bidirectional=False)
    y, (h_n, c_n) = lstm(x, (h_0, c_0))     # the nn.LSTM interface

Per gate block q (i, f, g, o: PyTorch's order) and step:

    z_q = LN(W_x,q x_t) * gamma_ih,q + beta_ih,q + LN(W_h,q h_{t-1}) * gamma_hh,q
    c_t = sigmoid(z_f) c_{t-1} + sigmoid(z_i) tanh(z_g)
    h_t = sigmoid(z_o) tanh(LN(c_t) * gamma_c + beta_c)

LN normalizes over the H units of a block (biased variance, eps). `beta_ih` is the only gate bias:
Ba et al.'s separate bias and recurrent beta add to the same sum, so one parameter carries them
(the integer model folds them the same way). The time loop runs in Python: this module is for
training small models and for calibration, not for speed.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def gate_layer_norm(a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """LN over each gate block of a [..., 4H] (gamma / beta [4H], beta optional)."""
    H = a.shape[-1] // 4
    blocks = a.unflatten(-1, (4, H))
    mean = blocks.mean(-1, keepdim=True)
    var = blocks.var(-1, unbiased=False, keepdim=True)
    y = (blocks - mean) / torch.sqrt(var + eps) * gamma.view(4, H)
    if beta is not None:
        y = y + beta.view(4, H)
    return y.flatten(-2)


def cell_layer_norm(c: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
    return nn.functional.layer_norm(c, c.shape[-1:], gamma, beta, eps)


class LayerNormLSTMDirection(nn.Module):
    """One direction of one layer (the parameters of spec 8b in float)."""

    def __init__(self, input_size: int, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        H = hidden_size
        self.input_size, self.hidden_size, self.eps = int(input_size), int(H), float(eps)
        k = 1.0 / math.sqrt(H)
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size).uniform_(-k, k))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H).uniform_(-k, k))
        self.gamma_ih = nn.Parameter(torch.ones(4 * H))
        beta = torch.zeros(4 * H)
        beta[H:2 * H] = 1.0      # forget gate open at the start, the usual LSTM initialization
        self.beta_ih = nn.Parameter(beta)
        self.gamma_hh = nn.Parameter(torch.ones(4 * H))
        self.gamma_c = nn.Parameter(torch.ones(H))
        self.beta_c = nn.Parameter(torch.zeros(H))

    def input_gates(self, x: torch.Tensor) -> torch.Tensor:
        """LN_x(W_x x) + beta for all steps at once: [..., I] -> [..., 4H]."""
        return gate_layer_norm(x @ self.weight_ih.t(), self.gamma_ih, self.beta_ih, self.eps)

    def step(self, gx_t, h, c):
        H = self.hidden_size
        z = gx_t + gate_layer_norm(h @ self.weight_hh.t(), self.gamma_hh, None, self.eps)
        i, f = torch.sigmoid(z[..., :H]), torch.sigmoid(z[..., H:2 * H])
        g, o = torch.tanh(z[..., 2 * H:3 * H]), torch.sigmoid(z[..., 3 * H:])
        c = f * c + i * g
        h = o * torch.tanh(cell_layer_norm(c, self.gamma_c, self.beta_c, self.eps))
        return h, c

    def forward(self, x, h, c, reverse: bool = False):
        """x [T, B, I] (time major), h / c [B, H] -> (y [T, B, H], h_T, c_T)."""
        gx = self.input_gates(x)
        ys = [None] * x.shape[0]
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            h, c = self.step(gx[t], h, c)
            ys[t] = h
        return torch.stack(ys), h, c


class LayerNormLSTM(nn.Module):
    """Layer-norm LSTM with nn.LSTM's interface (stacked, bidirectional, batch_first, states)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 batch_first: bool = False, bidirectional: bool = False, dropout: float = 0.0,
                 eps: float = 1e-5):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.batch_first = int(num_layers), bool(batch_first)
        self.bidirectional, self.dropout = bool(bidirectional), float(dropout)
        D = 2 if bidirectional else 1
        self.directions = nn.ModuleList(
            LayerNormLSTMDirection(input_size if l == 0 else hidden_size * D, hidden_size, eps)
            for l in range(num_layers) for _ in range(D))

    def forward(self, x: torch.Tensor, hx=None):
        if x.dim() != 3:
            raise ValueError(f"LayerNormLSTM takes a 3-d input (T, B, I) or (B, T, I) with "
                             f"batch_first=True, got shape {tuple(x.shape)}")
        if self.batch_first:
            x = x.transpose(0, 1)
        D = 2 if self.bidirectional else 1
        B, H = x.shape[1], self.hidden_size
        if hx is None:
            h0 = c0 = x.new_zeros(self.num_layers * D, B, H)
        else:
            h0, c0 = hx
        hs, cs = [], []
        for l in range(self.num_layers):
            outs = []
            for d in range(D):
                k = l * D + d
                y, h, c = self.directions[k](x, h0[k], c0[k], reverse=d == 1)
                outs.append(y)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, -1) if D == 2 else outs[0]
            if self.dropout and self.training and l < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, True)
        y = x.transpose(0, 1) if self.batch_first else x
        return y, (torch.stack(hs), torch.stack(cs))
