"""Quantization of tvm_intlstm.nn.LayerNormLSTM (docs/integer_spec.md 8b, 10b), in one file.

`ln_lstm_ranges` runs a float direction on calibration inputs and records the ranges the integer
model needs; `quantize_ln_lstm_direction` turns the float parameters and those ranges into
`reference.ops.LNLSTMDirectionParams`; `QuantLNLSTM` is the layer under calibration / QAT and
`IntLNLSTM` the integer layer of a converted model (registered in quant/layers.py). Float is
allowed here (host side, quantization time only).
"""
from __future__ import annotations

from dataclasses import dataclass

import dataclasses

import numpy as np
import torch
from torch import nn

from ..nn.fake_quant import fake_quant, fake_quant_weight_per_row
from ..nn.intops import pack_table
from ..nn.ln_lstm import cell_layer_norm, gate_layer_norm
from ..nn.modules import QuantModule
from ..reference.ops import LayerNorm16Params, LNLSTMDirectionParams
from .fixed_point import (power_of_two_frac, quantize_multiplier, quantize_multiplier15,
                          quantize_multiplier_array)
from .pwl import fit_pwl

_EPS = 1e-12


@dataclass
class LNLSTMRanges:
    """Largest magnitudes seen in calibration: of W_x x, of W_h h (the layer norms' inputs), of the
    cell c and of the hidden state h."""

    ax: float = 0.0
    ah: float = 0.0
    c: float = 0.0
    h: float = 0.0


@torch.no_grad()
def ln_lstm_ranges(direction, inputs, reverse: bool = False,
                   ranges: LNLSTMRanges | None = None) -> LNLSTMRanges:
    """Ranges of `direction` (nn.ln_lstm.LayerNormLSTMDirection) over float inputs [T, B, I]."""
    r = ranges or LNLSTMRanges()
    for x in inputs:
        observe_direction(direction, x, reverse, r)
    return r


@torch.no_grad()
def observe_direction(direction, x, reverse: bool, r: LNLSTMRanges):
    """The exact float run of one direction over x [T, B, I] from the zero state, widening the
    ranges `r`; returns (y [T, B, H], h_T, c_T)."""
    B, H = x.shape[1], direction.hidden_size
    h, c = x.new_zeros(B, H), x.new_zeros(B, H)
    ax = x @ direction.weight_ih.t()
    r.ax = max(r.ax, float(ax.abs().max()))
    gx = gate_layer_norm(ax, direction.gamma_ih, direction.beta_ih, direction.eps)  # input_gates(x)
    ys = [None] * x.shape[0]
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        r.ah = max(r.ah, float((h @ direction.weight_hh.t()).abs().max()))
        h, c = direction.step(gx[t], h, c)
        r.c = max(r.c, float(c.abs().max()))
        r.h = max(r.h, float(h.abs().max()))
        ys[t] = h
    return torch.stack(ys), h, c


def _layer_norm16(gamma: torch.Tensor, beta: torch.Tensor | None, s_in: float,
                  eps: float) -> LayerNorm16Params:
    """gamma int16 at s_g = max|gamma| / 32767, beta int64 at s_g 2^-12, (Ml, sl) for s_g, and the
    float epsilon in units of the input scale s_in squared."""
    g = gamma.detach().double().numpy()
    s_g = max(float(np.abs(g).max()), _EPS) / 32767.0
    gq = np.clip(np.round(g / s_g), -32768, 32767).astype(np.int16)
    b = np.zeros_like(g) if beta is None else beta.detach().double().numpy()
    bq = np.round(b / (s_g * 2.0**-12)).astype(np.int64)
    if np.abs(bq).max(initial=0) >= 2**47:
        raise ValueError("layer-norm beta is too large against its gamma for spec 10b (|beta| / "
                         "max|gamma| must stay below 2^35)")
    ml, sl = quantize_multiplier15(s_g)
    return LayerNorm16Params(gq, bq, ml, sl, int(min(round(eps / s_in**2), 2**46 - 1)))


def _weights_per_row(w: torch.Tensor, wmax: int = 127):
    w = w.detach().double().numpy()
    s = np.maximum(np.abs(w).max(axis=1), _EPS) / wmax
    return np.clip(np.round(w / s[:, None]), -wmax, wmax).astype(np.int8), s


def quantize_ln_lstm_direction(direction, s_x: float, ranges: LNLSTMRanges, s_h: float | None = None,
                               pieces: int = 16, wmax: int = 127,
                               pwl_method: str = "adaptive") -> LNLSTMDirectionParams:
    """Integer parameters (spec 8b) of a float LayerNormLSTMDirection whose input has scale s_x.
    s_h: the hidden-state scale (default max|h| / 127 from the ranges; a bidirectional layer passes
    one scale for both directions, as spec 8 asks); wmax: largest |weight| (127 for 8-bit weights,
    63 for QuantConfig(weight_bits=7))."""
    if s_h is None:
        s_h = max(ranges.h, _EPS) / 127.0
    wx, s_wx = _weights_per_row(direction.weight_ih, wmax)
    wh, s_wh = _weights_per_row(direction.weight_hh, wmax)
    s_ax = max(ranges.ax, _EPS) / 32767.0
    s_ah = max(ranges.ah, _EPS) / 32767.0
    mx, sx = quantize_multiplier_array(s_x * s_wx / s_ax)
    mh, sh = quantize_multiplier_array(s_h * s_wh / s_ah)
    mo, so = quantize_multiplier(2.0**-30 / s_h)
    cell_frac = power_of_two_frac(ranges.c, 16, 0, 15)
    return LNLSTMDirectionParams(
        w_x=wx, w_h=wh, mx=mx, sx=sx, mh=mh, sh=sh,
        ln_x=_layer_norm16(direction.gamma_ih, direction.beta_ih, s_ax, direction.eps),
        ln_h=_layer_norm16(direction.gamma_hh, None, s_ah, direction.eps),
        ln_c=_layer_norm16(direction.gamma_c, direction.beta_c, 2.0**-cell_frac, direction.eps),
        mo=int(mo), so=int(so), cell_frac=cell_frac,
        sig=fit_pwl("sigmoid", pieces, 12, pwl_method), tanh=fit_pwl("tanh", pieces, 12, pwl_method),
        tanh_c=fit_pwl("tanh", pieces, 12, pwl_method))


# ---------------------------------------------------------------------------------------------
# the QAT / calibration module and the integer module of a LayerNormLSTM; the layer is registered
# once in quant/layers.py (prepare, convert, serialization, reference)


def _fq(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    return fake_quant(x, scale, lo, hi)


class QuantLNLSTM(QuantModule):
    """A LayerNormLSTM under calibration (mode "observe": the exact float model, ranges recorded)
    or quantization-aware training (mode "fake": the weights, the hidden state and the cell on the
    integer model's grids, straight-through gradients; the layer norms and the sigmoid / tanh stay
    float: the integer model's PWL tables and int16 layer norms are not simulated in training)."""

    def __init__(self, lstm, config):
        super().__init__(config)
        self.lstm = lstm
        D = 2 if lstm.bidirectional else 1
        self.ranges = [LNLSTMRanges() for _ in range(lstm.num_layers * D)]
        self.seen = 0

    @property
    def ndir(self) -> int:
        return 2 if self.lstm.bidirectional else 1

    def _layer_range(self, li: int, field: str) -> float:
        return max(getattr(self.ranges[li * self.ndir + d], field) for d in range(self.ndir))

    def hidden_scale(self, li: int) -> float:
        """s_h of layer li, shared by its directions (spec 8)."""
        if not self.seen:
            raise RuntimeError("LayerNormLSTM ranges were never observed: run calibration data through "
                               "the model (tvm_intlstm.quantize(model, calib_data)) before converting")
        return max(self._layer_range(li, "h"), 1e-12) / 127

    def cell_frac(self, li: int) -> int:
        if self.config.cell_frac is not None:
            return self.config.cell_frac
        return power_of_two_frac(self._layer_range(li, "c"), 16, 0, 15)

    def forward_observe(self, x, hx=None):
        return self._run(x, hx, fake=False)

    def forward_fake(self, x, hx=None):
        return self._run(x, hx, fake=True)

    def _run(self, x, hx, fake: bool):
        if hx is not None:
            raise NotImplementedError("initial states of a LayerNormLSTM are not supported yet: call it "
                                      "without (h0, c0)")
        m = self.lstm
        if x.dim() != 3:
            raise ValueError(f"LayerNormLSTM input must be 3-D, got shape {tuple(x.shape)}")
        h_in = x.transpose(0, 1) if m.batch_first else x
        if not fake:
            self.seen += 1
        hs, cs = [], []
        for li in range(m.num_layers):
            outs = []
            s_h = self.hidden_scale(li) if fake else None
            c_s = 2.0 ** -self.cell_frac(li) if fake else None
            for d in range(self.ndir):
                k = li * self.ndir + d
                direction = m.directions[k]
                y, h, c = (self._direction_fake(direction, h_in, d == 1, s_h, c_s) if fake
                           else observe_direction(direction, h_in, d == 1, self.ranges[k]))
                outs.append(y)
                hs.append(h)
                cs.append(c)
            h_in = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
            if m.dropout and self.training and li < m.num_layers - 1:
                h_in = nn.functional.dropout(h_in, m.dropout, True)
                if fake:
                    h_in = _fq(h_in, s_h, -128, 127)
        out = h_in.transpose(0, 1) if m.batch_first else h_in
        return out, (torch.stack(hs), torch.stack(cs))

    def _direction_fake(self, direction, x, reverse, s_h, c_s):
        wx = fake_quant_weight_per_row(direction.weight_ih, self.wmax)
        wh = fake_quant_weight_per_row(direction.weight_hh, self.wmax)
        eps = direction.eps
        gx = gate_layer_norm(x @ wx.t(), direction.gamma_ih, direction.beta_ih, eps)
        B, H = x.shape[1], direction.hidden_size
        h, c = x.new_zeros(B, H), x.new_zeros(B, H)
        ys = [None] * x.shape[0]
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            z = gx[t] + gate_layer_norm(h @ wh.t(), direction.gamma_hh, None, eps)
            i, f = torch.sigmoid(z[..., :H]), torch.sigmoid(z[..., H:2 * H])
            g, o = torch.tanh(z[..., 2 * H:3 * H]), torch.sigmoid(z[..., 3 * H:])
            c = _fq(f * c + i * g, c_s, -32768, 32767)
            h = _fq(o * torch.tanh(cell_layer_norm(c, direction.gamma_c, direction.beta_c, eps)),
                    s_h, -128, 127)
            ys[t] = h
        return torch.stack(ys), h, c

    def to_int(self, in_scales):
        (s_x,) = in_scales
        m, cfg = self.lstm, self.config
        layers = []
        for li in range(m.num_layers):
            s_h = self.hidden_scale(li)
            c_max = self._layer_range(li, "c")
            dirs = []
            for d in range(self.ndir):
                r = self.ranges[li * self.ndir + d]
                rng = LNLSTMRanges(ax=r.ax, ah=r.ah, c=c_max, h=r.h)   # F_c shared by the directions
                p = quantize_ln_lstm_direction(m.directions[li * self.ndir + d], s_x, rng, s_h=s_h,
                                               pieces=cfg.pwl_pieces, wmax=self.wmax,
                                               pwl_method=cfg.pwl_method)
                if cfg.cell_frac is not None and p.cell_frac != cfg.cell_frac:
                    p = dataclasses.replace(p, cell_frac=cfg.cell_frac)
                dirs.append(p)
            layers.append(dirs)
            s_x = s_h
        return IntLNLSTM.from_params(layers, [self.hidden_scale(li) for li in range(m.num_layers)],
                                     m.batch_first, m.bidirectional)


class IntLNLSTM(nn.Module):
    """Integer layer-norm LSTM (spec 8b), nn.LSTM's call convention and outputs: (out int8,
    (h_n int8 [L*D, B, H], c_n int16 [L*D, B, H])), one torch.ops.intlstm.ln_lstm_direction call per
    layer and direction."""

    TENSORS = ("w_x", "w_h", "mx", "sx", "mh", "sh", "gamma_x", "beta_x", "gamma_h", "beta_h",
               "gamma_c", "beta_c", "sig", "tanh", "tanh_c")
    SCALARS = ("mo", "so", "cell_frac", "ml_x", "sl_x", "eps_x", "ml_h", "sl_h", "eps_h",
               "ml_c", "sl_c", "eps_c")

    def __init__(self, tensors: list, scalars: list, layer_scales: list, batch_first: bool,
                 bidirectional: bool):
        """tensors / scalars: per (layer, direction), row li * D + d, dicts keyed by TENSORS /
        SCALARS; layer_scales: s_h per layer."""
        super().__init__()
        self.batch_first, self.bidirectional = bool(batch_first), bool(bidirectional)
        self.num_layers = len(layer_scales)
        self.layer_scales = [float(s) for s in layer_scales]
        self.scalars = [tuple(int(sc[k]) for k in self.SCALARS) for sc in scalars]
        for k, t in enumerate(tensors):
            for name in self.TENSORS:
                self.register_buffer(f"r{k}_{name}", t[name])
        self.cell_fracs = [self.scalars[li * self.ndir][2] for li in range(self.num_layers)]
        self.out_scale = self.layer_scales[-1]

    @property
    def ndir(self) -> int:
        return 2 if self.bidirectional else 1

    @classmethod
    def from_params(cls, layers: list, layer_scales: list, batch_first: bool, bidirectional: bool):
        """From reference.ops.LNLSTMDirectionParams per layer and direction."""
        tensors, scalars = [], []
        for dirs in layers:
            for p in dirs:
                t = torch.from_numpy
                tensors.append(dict(
                    w_x=t(p.w_x), w_h=t(p.w_h), mx=t(p.mx), sx=t(p.sx), mh=t(p.mh), sh=t(p.sh),
                    gamma_x=t(p.ln_x.gamma), beta_x=t(p.ln_x.beta), gamma_h=t(p.ln_h.gamma),
                    beta_h=t(p.ln_h.beta), gamma_c=t(p.ln_c.gamma), beta_c=t(p.ln_c.beta),
                    sig=pack_table(p.sig), tanh=pack_table(p.tanh), tanh_c=pack_table(p.tanh_c)))
                scalars.append(dict(mo=p.mo, so=p.so, cell_frac=p.cell_frac,
                                    ml_x=p.ln_x.ml, sl_x=p.ln_x.sl, eps_x=p.ln_x.eps,
                                    ml_h=p.ln_h.ml, sl_h=p.ln_h.sl, eps_h=p.ln_h.eps,
                                    ml_c=p.ln_c.ml, sl_c=p.ln_c.sl, eps_c=p.ln_c.eps))
        return cls(tensors, scalars, layer_scales, batch_first, bidirectional)

    def direction_args(self, k: int) -> tuple:
        """The op's arguments after x for row k = li * D + d (tensors, then scalars with reverse)."""
        sc = self.scalars[k]
        return (tuple(getattr(self, f"r{k}_{n}") for n in self.TENSORS)
                + sc[:3] + (k % self.ndir == 1,) + sc[3:])

    def forward(self, x, hx=None):
        if hx is not None:
            raise NotImplementedError("initial states of a LayerNormLSTM are not supported yet")
        if x.dtype != torch.int8 or x.dim() != 3:
            raise TypeError(f"quantized LayerNormLSTM input must be int8 and 3-D, got {x.dtype} "
                            f"{tuple(x.shape)}")
        h = x.transpose(0, 1) if self.batch_first else x
        hs, cs = [], []
        for li in range(self.num_layers):
            outs = []
            for d in range(self.ndir):
                y, hT, cT = torch.ops.intlstm.ln_lstm_direction(h, *self.direction_args(li * self.ndir + d))
                outs.append(y)
                hs.append(hT)
                cs.append(cT)
            h = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        out = h.transpose(0, 1) if self.batch_first else h
        return out, (torch.stack(hs), torch.stack(cs))
