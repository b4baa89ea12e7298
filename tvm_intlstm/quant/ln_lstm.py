"""Post-training quantization of one layer-norm LSTM direction (docs/integer_spec.md 8b, 10b).

`ln_lstm_ranges` runs the float direction on calibration inputs and records the ranges the
integer model needs; `quantize_ln_lstm_direction` turns the float parameters and those ranges into
`reference.ops.LNLSTMDirectionParams`. Float is allowed here (host side, quantization time only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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

    def update(self, ax, ah, c, h):
        self.ax = max(self.ax, float(ax.abs().max()))
        self.ah = max(self.ah, float(ah.abs().max()))
        self.c = max(self.c, float(c.abs().max()))
        self.h = max(self.h, float(h.abs().max()))


@torch.no_grad()
def ln_lstm_ranges(direction, inputs, reverse: bool = False,
                   ranges: LNLSTMRanges | None = None) -> LNLSTMRanges:
    """Ranges of `direction` (nn.ln_lstm.LayerNormLSTMDirection) over float inputs [T, B, I]."""
    r = ranges or LNLSTMRanges()
    for x in inputs:
        B, H = x.shape[1], direction.hidden_size
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        gx = direction.input_gates(x)
        r.ax = max(r.ax, float((x @ direction.weight_ih.t()).abs().max()))
        for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
            ah = h @ direction.weight_hh.t()
            h, c = direction.step(gx[t], h, c)
            r.update(x.new_zeros(1), ah, c, h)
    return r


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


def _weights_per_row(w: torch.Tensor):
    w = w.detach().double().numpy()
    s = np.maximum(np.abs(w).max(axis=1), _EPS) / 127.0
    return np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8), s


def quantize_ln_lstm_direction(direction, s_x: float, ranges: LNLSTMRanges, s_h: float | None = None,
                               pieces: int = 16) -> LNLSTMDirectionParams:
    """Integer parameters (spec 8b) of a float LayerNormLSTMDirection whose input has scale s_x.
    s_h: the hidden-state scale (default max|h| / 127 from the ranges; a bidirectional layer passes
    one scale for both directions, as spec 8 asks)."""
    if s_h is None:
        s_h = max(ranges.h, _EPS) / 127.0
    wx, s_wx = _weights_per_row(direction.weight_ih)
    wh, s_wh = _weights_per_row(direction.weight_hh)
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
        sig=fit_pwl("sigmoid", pieces, 12), tanh=fit_pwl("tanh", pieces, 12),
        tanh_c=fit_pwl("tanh", pieces, 12))
