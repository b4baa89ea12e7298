"""Float-domain simulation for calibration and QAT: fake quantization with straight-through
gradients, and the PWL tables evaluated in float (same knots, slopes and bases as the integer tables,
so QAT trains against the functions that are deployed)."""
from __future__ import annotations

import torch

from ..quant.pwl import table_to_float


def fake_quant(x: torch.Tensor, scale, lo: int, hi: int) -> torch.Tensor:
    """round(x / scale) clamped to [lo, hi], times scale; clipped straight-through gradient.

    `scale` may be a float or a tensor broadcasting against x (per channel)."""
    s = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=x.dtype)
    xc = torch.maximum(torch.minimum(x, hi * s), lo * s)
    return xc + (torch.round(xc / s) * s - xc).detach()


def weight_row_scales(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-output-row scales [O, 1] of fake_quant_weight_per_row."""
    s = w.detach().abs().amax(dim=1, keepdim=True) / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def fake_quant_weight_per_row(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Symmetric per-output-row int8 weight fake quantization (spec 4)."""
    return fake_quant(w, weight_row_scales(w, qmax), -qmax, qmax)


@torch.no_grad()
def int_weight_per_row(w: torch.Tensor, s: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """The integers of fake_quant_weight_per_row(w) (= q * s), as int8."""
    xc = torch.maximum(torch.minimum(w, qmax * s), -qmax * s)
    return torch.round(xc / s).to(torch.int8)


class RecurrentProduct(torch.autograd.Function):
    """h @ wh^T for QAT LSTMs, valued exactly: h = k s_h and wh = q s_w on their integer grids, so the
    product is the integer product k q^T (exact in float64) times m = s_h s_w (float32), what the
    integer model computes, and the same in the Python loop and the fused kernel whatever the BLAS
    summation order. Gradients are those of the float product h @ wh^T."""

    @staticmethod
    def forward(ctx, h, wh, k, q, m):
        ctx.save_for_backward(h, wh)
        return torch.matmul(k.double(), q.double().t()).float() * m

    @staticmethod
    def backward(ctx, g):
        h, wh = ctx.saved_tensors
        return g.mm(wh), h.t().mm(g).t(), None, None, None


def fake_quant_weight_per_tensor(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    s = w.detach().abs().max() / qmax
    s = s if float(s) > 0 else torch.ones_like(s)
    return fake_quant(w, s, -qmax, qmax)


class FloatPWL:
    """A PWL table evaluated in float with autograd (the gradient is the piece's slope)."""

    def __init__(self, table):
        k, v, a = table_to_float(table)
        self.k = torch.tensor(k, dtype=torch.float32)
        self.v = torch.tensor(v, dtype=torch.float32)
        self.a = torch.tensor(a, dtype=torch.float32)
        self.n = len(v)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        xc = torch.maximum(torch.minimum(x, k[-1]), k[0])
        idx = torch.searchsorted(k[1:self.n].contiguous(), xc.detach().contiguous(), right=True)
        y = self.v[idx] + self.a[idx] * (xc - k[idx])
        return torch.clamp(y, -1.0, 32767 / 32768)  # the integer table saturates to int16
