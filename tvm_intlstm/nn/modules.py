"""Quantization-aware modules: each wraps a float layer and runs in one of two modes.

- "observe": the float layer's own arithmetic, recording activation ranges (PTQ calibration).
- "qat": fake quantization with straight-through gradients and the PWL tables in float, so
  training sees the deployed numerics.

`to_int(in_scales)` turns a module into its integer counterpart (tvm_intlstm/nn/intmodules.py) using
docs/integer_spec.md; the graph-level driver (tvm_intlstm/quant/graph.py) supplies input scales.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import fixed_point as fp
from ..quant.config import QuantConfig
from ..quant.pwl import fit_pwl
from ..reference.ops import GATE_FRAC
from . import intmodules as im
from . import qat_fast
from .fake_quant import (FloatPWL, RecurrentProduct, fake_quant, fake_quant_weight_per_row,
                         fake_quant_weight_per_tensor, int_weight_per_row, weight_row_scales)
from .intops import pack_table


class RangeObserver(nn.Module):
    """Running max of |x| (symmetric ranges)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("max_abs", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def update(self, x: torch.Tensor):
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("an activation became non-finite (NaN or inf) during calibration; it would "
                             "poison the observed range: check the model's weights and the calibration data")
        if x.numel():
            self.max_abs.copy_(torch.maximum(self.max_abs, x.detach().abs().max().float()))
        self.seen += 1

    def scale(self, qmax: int = 127) -> float:
        if int(self.seen) == 0:
            raise RuntimeError("activation range was never observed: run calibration data through the "
                               "model (tvm_intlstm.quantize(model, calib_data)) before converting")
        m = float(self.max_abs)
        return (m if m > 0 else 1.0) / qmax


class QuantModule(nn.Module):
    mode = "observe"

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.config = config

    @property
    def wmax(self) -> int:
        """Largest |weight| of the GEMM weights: 127 (weight_bits=8) or 63 (weight_bits=7)."""
        return 2 ** (self.config.weight_bits - 1) - 1

    def forward(self, *args):
        if self.mode == "observe":
            return self.forward_observe(*args)
        return self.forward_fake(*args)


def _weight_scales_per_row(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    s = w.detach().abs().amax(dim=1).double() / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def _quant_weight(w: torch.Tensor, scales: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    s = scales.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w.detach().double() / s), -qmax, qmax).to(torch.int8)


def _quant_bias(b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q = torch.round(b.detach().double() / scales)
    if q.abs().max() > 2**30:
        raise ValueError("a bias is too large for its int32 scale (|b| / (s_in s_w) > 2^30); "
                         "check the layer's weights and calibration ranges")
    return q.to(torch.int32)


# --------------------------------------------------------------------------------------------


class QuantInput(QuantModule):
    """Quantizes a float model input to int8 (the model boundary)."""

    def __init__(self, config):
        super().__init__(config)
        self.obs = RangeObserver()

    def forward_observe(self, x):
        self.obs.update(x)
        return x

    def forward_fake(self, x):
        return fake_quant(x, self.obs.scale(), -128, 127)

    def to_int(self, in_scales):
        return im.IntInput(self.obs.scale())


class QuantEmbedding(QuantModule):
    def __init__(self, emb: nn.Embedding, config):
        super().__init__(config)
        for opt in ("max_norm",):
            if getattr(emb, opt) is not None:
                raise NotImplementedError(f"nn.Embedding({opt}=...) is not supported")
        self.emb = emb

    def forward_observe(self, ids):
        return self.emb(ids)

    def forward_fake(self, ids):
        return nn.functional.embedding(ids, fake_quant_weight_per_tensor(self.emb.weight))

    def out_scale(self):
        m = float(self.emb.weight.detach().abs().max())
        return (m if m > 0 else 1.0) / 127

    def to_int(self, in_scales):
        s = self.out_scale()
        table = torch.clamp(torch.round(self.emb.weight.detach().double() / s), -127, 127).to(torch.int8)
        return im.IntEmbedding(table, s)


class QuantLinear(QuantModule):
    """Hidden linear (int8 output, per-row weights) or final linear (int32 logits, per-tensor weights)."""

    def __init__(self, lin: nn.Linear, config, final: bool):
        super().__init__(config)
        self.lin = lin
        self.final = final
        self.obs = RangeObserver()

    def forward_observe(self, x):
        y = self.lin(x)
        if not self.final:
            self.obs.update(y)
        return y

    def forward_fake(self, x):
        w = self.lin.weight
        wq = (fake_quant_weight_per_tensor(w, self.wmax) if self.final
              else fake_quant_weight_per_row(w, self.wmax))
        y = nn.functional.linear(x, wq, self.lin.bias)
        if self.final:
            return y
        return fake_quant(y, self.obs.scale(), -128, 127)

    def to_int(self, in_scales):
        (s_x,) = in_scales
        w = self.lin.weight.detach()
        out_f = w.shape[0]
        if self.final:
            sw = float(w.abs().max()) / self.wmax or 1.0
            sws = torch.full((out_f,), sw, dtype=torch.float64)
        else:
            sws = _weight_scales_per_row(w, self.wmax)
        wq = _quant_weight(w, sws, self.wmax)
        b = self.lin.bias if self.lin.bias is not None else torch.zeros(out_f)
        bq = _quant_bias(b, s_x * sws)
        if self.final:
            return im.IntLinear(wq, bq, out_scale=s_x * float(sws[0]))
        s_y = self.obs.scale()
        M, S = fp.quantize_multiplier_array((s_x * sws / s_y).numpy())
        return im.IntLinear(wq, bq, torch.from_numpy(M), torch.from_numpy(S), out_scale=s_y)


class QuantLSTM(QuantModule):
    """nn.LSTM (stacked, bidirectional, batch_first, with or without bias) under quantization."""

    def __init__(self, lstm: nn.LSTM, config):
        super().__init__(config)
        if getattr(lstm, "proj_size", 0):
            raise NotImplementedError("nn.LSTM(proj_size>0) is not supported: use proj_size=0 and an nn.Linear")
        self.lstm = lstm
        L = lstm.num_layers
        self.h_obs = nn.ModuleList(RangeObserver() for _ in range(L))
        self.c_obs = nn.ModuleList(RangeObserver() for _ in range(L))

    # helpers ---------------------------------------------------------------------------
    @property
    def ndir(self):
        return 2 if self.lstm.bidirectional else 1

    def _w(self, li, d):
        sfx = f"_l{li}" + ("_reverse" if d == 1 else "")
        m = self.lstm
        w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
        if m.bias:
            b = getattr(m, "bias_ih" + sfx) + getattr(m, "bias_hh" + sfx)
        else:
            b = torch.zeros(w_ih.shape[0], dtype=w_ih.dtype)
        return w_ih, w_hh, b

    def cell_frac(self, li: int) -> int:
        if self.config.cell_frac is not None:
            return self.config.cell_frac
        o = self.c_obs[li]
        if int(o.seen) == 0:
            raise RuntimeError("cell-state range was never observed: calibrate first")
        return fp.power_of_two_frac(float(o.max_abs), 16, 0, 15)

    def tables(self, li: int):
        n, meth = self.config.pwl_pieces, self.config.pwl_method
        return (fit_pwl("sigmoid", n, GATE_FRAC, meth), fit_pwl("tanh", n, GATE_FRAC, meth),
                fit_pwl("tanh", n, self.cell_frac(li), meth))

    def _check_args(self, x, hx):
        if hx is not None:
            from ..quant.state_format import observe_states
            observe_states(self, hx)  # shapes as nn.LSTM wants them (docs/stateful.md)
        if x.dim() != 3:
            raise ValueError(f"nn.LSTM input must be 3-D (batched), got shape {tuple(x.shape)}")
        T = x.shape[1] if self.lstm.batch_first else x.shape[0]
        if T == 0 or x.numel() == 0:
            raise ValueError(f"nn.LSTM input of shape {tuple(x.shape)} is empty (sequence length {T}): "
                             "calibration and training batches need at least one time step and one "
                             "sequence")

    # observe: exact float LSTM, unrolled to record the cell state of every step ------------------
    def forward_observe(self, x, hx=None):
        self._check_args(x, hx)
        m = self.lstm
        h_in = x.transpose(0, 1) if m.batch_first else x
        hs, cs = [], []
        for li in range(m.num_layers):
            outs = []
            for d in range(self.ndir):
                w_ih, w_hh, b = self._w(li, d)
                T, B, _ = h_in.shape
                H = w_hh.shape[1]
                gx = h_in @ w_ih.t() + b
                h = h_in.new_zeros(B, H)
                c = h_in.new_zeros(B, H)
                if hx is not None:  # given states: the start of the recurrence, observed like its steps
                    h, c = hx[0][li * self.ndir + d], hx[1][li * self.ndir + d]
                    self.h_obs[li].update(h)
                    self.c_obs[li].update(c)
                ys = [None] * T
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    z = gx[t] + h @ w_hh.t()
                    i, f, g, o = z.chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    self.c_obs[li].update(c)
                    ys[t] = h
                y = torch.stack(ys, 0)
                self.h_obs[li].update(y)
                outs.append(y)
                hs.append(h)
                cs.append(c)
            h_in = torch.cat(outs, -1)
            if m.dropout and self.training and li < m.num_layers - 1:
                h_in = nn.functional.dropout(h_in, m.dropout, True)
        out = h_in.transpose(0, 1) if m.batch_first else h_in
        return out, (torch.stack(hs), torch.stack(cs))

    # qat: fake-quantized arithmetic of spec section 8 ---------------------------------------
    def _use_fused(self, h_in) -> bool:
        """config.qat_lstm == "fused" and the extension builds (else the loop, with a warning)."""
        if self.config.qat_lstm != "fused" or h_in.dtype != torch.float32 or h_in.device.type != "cpu":
            return False
        if h_in.shape[0] == 0 or h_in.shape[1] == 0:
            return False
        return qat_fast.available()

    def forward_fake(self, x, hx=None):
        self._check_args(x, hx)
        m = self.lstm
        h_in = x.transpose(0, 1) if m.batch_first else x
        g_s = 2.0**-GATE_FRAC
        q15 = 2.0**-15
        hs, cs = [], []
        for li in range(m.num_layers):
            s_h = self.h_obs[li].scale()
            cf = self.cell_frac(li)
            c_s = 2.0**-cf
            s_h32 = torch.tensor(s_h, dtype=torch.float32)
            sig_t, tanh_t, tanhc_t = (FloatPWL(t) for t in self.tables(li))
            fused = self._use_fused(h_in)
            if fused:
                packed = [qat_fast.pack_float_table(t) for t in (sig_t, tanh_t, tanhc_t)]
                consts = qat_fast.step_constants(g_s, c_s, s_h)
            outs = []
            for d in range(self.ndir):
                w_ih, w_hh, b = self._w(li, d)
                wx = fake_quant_weight_per_row(w_ih, self.wmax)
                s_w = weight_row_scales(w_hh, self.wmax)
                wh = fake_quant(w_hh, s_w, -self.wmax, self.wmax)
                q = int_weight_per_row(w_hh, s_w, self.wmax)
                m_h = s_h32 * s_w[:, 0]  # the recurrent product's scale per gate row
                T, B, _ = h_in.shape
                H = w_hh.shape[1]
                if fused:  # the same step arithmetic as the loop below, in one C++ call (qat_fast.py)
                    state = {} if hx is None else self._fake_state(hx, li, d, s_h, s_h32, c_s)
                    y, c = qat_fast.lstm_direction(qat_fast.InputProjection.apply(h_in, wx, b), wh, q, m_h,
                                                   packed, consts, reverse=bool(d), **state)
                    outs.append(y)
                    hs.append(y[0] if d else y[-1])
                    cs.append(c)
                    continue
                gx = fake_quant(h_in @ wx.t() + b, g_s, -32768, 32767)
                h = h_in.new_zeros(B, H)
                c = h_in.new_zeros(B, H)
                if hx is not None:  # given float states on the integer model's grids (h: s_h, c: 2^-F_c)
                    st = self._fake_state(hx, li, d, s_h, s_h32, c_s)
                    h, c = st["h0"], st["c0"]
                ys = [None] * T
                for t in (range(T - 1, -1, -1) if d else range(T)):
                    k = torch.round(h.detach() / s_h32)  # h's integers (h = k s_h)
                    gh = fake_quant(RecurrentProduct.apply(h, wh, k, q, m_h), g_s, -32768, 32767)
                    z = torch.clamp(gx[t] + gh, -8.0, 8.0 - g_s)
                    zi, zf, zg, zo = z.chunk(4, dim=1)
                    i = fake_quant(sig_t(zi), q15, -32768, 32767)
                    f = fake_quant(sig_t(zf), q15, -32768, 32767)
                    g = fake_quant(tanh_t(zg), q15, -32768, 32767)
                    o = fake_quant(sig_t(zo), q15, -32768, 32767)
                    # spec 8 rounds f*c and i*g to the cell grid separately, then saturates the sum
                    big = 2.0**31
                    c = torch.clamp(fake_quant(f * c, c_s, -big, big) + fake_quant(i * g, c_s, -big, big),
                                    -32768 * c_s, 32767 * c_s)
                    h = fake_quant(o * fake_quant(tanhc_t(c), q15, -32768, 32767), s_h, -128, 127)
                    ys[t] = h
                outs.append(torch.stack(ys, 0))
                hs.append(h)
                cs.append(c)
            h_in = torch.cat(outs, -1)
            if m.dropout and self.training and li < m.num_layers - 1:
                # dropout keeps values on the int8 grid only up to the 1/(1-p) factor: requantize
                h_in = fake_quant(nn.functional.dropout(h_in, m.dropout, True), s_h, -128, 127)
        out = h_in.transpose(0, 1) if m.batch_first else h_in
        return out, (torch.stack(hs), torch.stack(cs))

    def _fake_state(self, hx, li, d, s_h, s_h32, c_s) -> dict:
        """Row (li, d) of given float states on the integer model's grids (h: s_h, c: 2^-F_c), and
        h's integers (the first recurrent product's operand), for the loop and the fused path."""
        h0 = fake_quant(hx[0][li * self.ndir + d], s_h, -128, 127)
        c0 = fake_quant(hx[1][li * self.ndir + d], c_s, -32768, 32767)
        return {"h0": h0, "h0q": torch.round(h0.detach() / s_h32).to(torch.int8), "c0": c0}

    def layer_scales(self):
        return [self.h_obs[li].scale() for li in range(self.lstm.num_layers)]

    def to_int(self, in_scales):
        (s_x,) = in_scales
        m = self.lstm
        layers = []
        for li in range(m.num_layers):
            s_h = self.h_obs[li].scale()
            cf = self.cell_frac(li)
            sig, tanh, tanh_c = self.tables(li)
            dirs = []
            for d in range(self.ndir):
                w_ih, w_hh, b = self._w(li, d)
                swx = _weight_scales_per_row(w_ih, self.wmax)
                swh = _weight_scales_per_row(w_hh, self.wmax)
                mx, sx = fp.quantize_multiplier_array((s_x * swx / 2.0**-GATE_FRAC).numpy())
                mh, sh = fp.quantize_multiplier_array((s_h * swh / 2.0**-GATE_FRAC).numpy())
                mo, so = fp.quantize_multiplier(2.0**-30 / s_h)
                dirs.append(dict(
                    w_x=_quant_weight(w_ih, swx, self.wmax), w_h=_quant_weight(w_hh, swh, self.wmax),
                    bias=_quant_bias(b, s_x * swx),
                    mx=torch.from_numpy(mx), sx=torch.from_numpy(sx),
                    mh=torch.from_numpy(mh), sh=torch.from_numpy(sh),
                    sig=pack_table(sig), tanh=pack_table(tanh), tanh_c=pack_table(tanh_c),
                    mo=mo, so=so, cell_frac=cf, scale=s_h))
            layers.append(dirs)
            s_x = s_h
        return im.IntLSTM(layers, m.batch_first, m.bidirectional)


class QuantLayerNorm(QuantModule):
    def __init__(self, ln: nn.LayerNorm, config):
        super().__init__(config)
        if len(ln.normalized_shape) != 1:
            raise NotImplementedError("nn.LayerNorm is supported over the last dimension only")
        if ln.normalized_shape[0] > 4096:
            raise NotImplementedError("integer layer norm supports at most 4096 features")
        self.ln = ln
        self.obs = RangeObserver()

    def forward_observe(self, x):
        y = self.ln(x)
        self.obs.update(y)
        return y

    def forward_fake(self, x):
        return fake_quant(self.ln(x), self.obs.scale(), -128, 127)

    def to_int(self, in_scales):
        D = self.ln.normalized_shape[0]
        g = self.ln.weight.detach().double() if self.ln.weight is not None else torch.ones(D, dtype=torch.float64)
        bta = (self.ln.bias.detach().double() if getattr(self.ln, "bias", None) is not None
               else torch.zeros(D, dtype=torch.float64))
        s_g = float(g.abs().max()) / 32767 or 1.0
        gq = torch.clamp(torch.round(g / s_g), -32767, 32767).to(torch.int16)
        acc_scale = s_g * 2.0**-12
        bq = torch.round(bta / acc_scale).to(torch.int64)
        s_y = self.obs.scale()
        ml, sl = fp.quantize_multiplier15(acc_scale / s_y)
        return im.IntLayerNorm(gq, bq, ml, sl, s_y)


class QuantAdd(QuantModule):
    """Residual add of two int8 activations (spec 9)."""

    def __init__(self, config):
        super().__init__(config)
        self.obs = RangeObserver()

    def forward_observe(self, a, b):
        y = a + b
        self.obs.update(y)
        return y

    def forward_fake(self, a, b):
        return fake_quant(a + b, self.obs.scale(), -128, 127)

    def to_int(self, in_scales):
        s_a, s_b = in_scales
        s_y = self.obs.scale()
        ma, mb, s = fp.quantize_multiplier_pair(s_a / s_y, s_b / s_y)
        return im.IntAdd(ma, mb, s, s_y)


class QuantCat(QuantModule):
    """Concatenation; inputs sharing one scale concatenate exactly, others are rescaled."""

    def __init__(self, dim: int, config):
        super().__init__(config)
        self.dim = dim
        self.obs = RangeObserver()

    def forward_observe(self, *xs):
        y = torch.cat(xs, self.dim)
        self.obs.update(y)
        return y

    def forward_fake(self, *xs):
        return fake_quant(torch.cat(xs, self.dim), self.obs.scale(), -128, 127)

    def to_int(self, in_scales):
        if all(s == in_scales[0] for s in in_scales):
            return im.IntCat(self.dim, [None] * len(in_scales), in_scales[0])
        s_y = self.obs.scale()
        return im.IntCat(self.dim, [fp.quantize_multiplier(s / s_y) for s in in_scales], s_y)


# ---------------------------------------------------------------------------------------------
# attention (issue 18 item 3; docs/integer_spec.md section 11)

from ..spec import PROB_FRAC, SOFTMAX_IN_FRAC  # noqa: E402
from .attention import (_as_queries, _check_keys, batch_mask, check_mha, masked_softmax,  # noqa: E402
                        merge_heads, source_mask, split_heads)


def _fake_masked_softmax(scores, mask, exp_pwl: FloatPWL):
    """The integer masked softmax (spec 11.2) in float: shifted scores on the Q5.10 grid, the PWL
    exp on the Q0.15 grid, probabilities on the Q0.15 grid; padded positions and empty rows 0."""
    valid = (torch.ones_like(scores, dtype=torch.bool) if mask is None
             else batch_mask(mask, scores).expand_as(scores))
    neg = torch.finfo(scores.dtype).min
    m = scores.masked_fill(~valid, neg).amax(dim=-1, keepdim=True).detach()
    m = torch.where(valid.any(dim=-1, keepdim=True), m, torch.zeros_like(m))
    d = fake_quant((scores - m).masked_fill(~valid, 0.0), 2.0**-SOFTMAX_IN_FRAC, -32768, 0)
    e = fake_quant(exp_pwl(d), 2.0**-15, -32768, 32767) * valid
    p = e / e.sum(dim=-1, keepdim=True).clamp_min(2.0**-15)
    return fake_quant(p, 2.0**-PROB_FRAC, 0, 32767)


class _QuantAttention(QuantModule):
    """Common part of the attention layers: the context's observer, the exp table, the softmax and
    the context. Inputs (query, keys, lengths): query and keys int8 activations, lengths a model
    input of kind "lengths" (quant/layers.py), never quantized."""

    takes_lengths = True   # quant/graph.py convert: its lengths operand is a "lengths" model input

    def __init__(self, att, config):
        super().__init__(config)
        self.att = att
        self.ctx_obs = RangeObserver()

    def exp_table(self):
        return fit_pwl("exp", self.config.pwl_pieces, SOFTMAX_IN_FRAC, self.config.pwl_method)

    def _inputs(self, query, keys, lengths):
        q, squeeze = _as_queries(query, self.att.query_size)
        _check_keys(keys, self.att.key_size, q.shape[0])
        return q, squeeze, source_mask(lengths, q.shape[0], keys.shape[1], keys.device)

    def forward_observe(self, query, keys, lengths=None):
        q, squeeze, mask = self._inputs(query, keys, lengths)
        w = masked_softmax(self.observe_scores(q, keys), mask)
        ctx = torch.matmul(w, keys)
        self.ctx_obs.update(ctx)
        return (ctx.squeeze(1), w.squeeze(1)) if squeeze else (ctx, w)

    def forward_fake(self, query, keys, lengths=None):
        q, squeeze, mask = self._inputs(query, keys, lengths)
        w = _fake_masked_softmax(self.fake_scores(q, keys), mask, FloatPWL(self.exp_table()))
        ctx = fake_quant(torch.matmul(w, keys), self.ctx_obs.scale(), -128, 127)
        return (ctx.squeeze(1), w.squeeze(1)) if squeeze else (ctx, w)

    def common_int(self, s_z: float, s_k: float) -> dict:
        """The softmax and context constants of the integer module (spec 11.2, 11.3)."""
        mz, sz = fp.quantize_multiplier(s_z / 2.0**-SOFTMAX_IN_FRAC)
        s_c = self.ctx_obs.scale()
        mc, sc = fp.quantize_multiplier(2.0**-PROB_FRAC * s_k / s_c)
        return dict(mz=mz, sz=sz, exp_table=pack_table(self.exp_table()), mc=mc, sc=sc, out_scale=s_c)

    @staticmethod
    def _scales(in_scales):
        if len(in_scales) < 2 or in_scales[0] is None or in_scales[1] is None:
            raise ValueError("an attention layer takes (query, keys[, lengths]) with int8 query and keys")
        return float(in_scales[0]), float(in_scales[1])


class QuantLuongAttention(_QuantAttention):
    """tvm_intlstm.nn.LuongAttention under quantization: "general" observes q' = W q (its int8 scale)."""

    def __init__(self, att, config):
        super().__init__(att, config)
        self.q_obs = RangeObserver()

    def observe_scores(self, q, keys):
        if self.att.query_proj is not None:
            q = self.att.query_proj(q)
            self.q_obs.update(q)
        return torch.matmul(q, keys.transpose(1, 2))

    def fake_scores(self, q, keys):
        if self.att.query_proj is not None:
            w = fake_quant_weight_per_row(self.att.query_proj.weight, self.wmax)
            q = fake_quant(nn.functional.linear(q, w), self.q_obs.scale(), -128, 127)
        return torch.matmul(q, keys.transpose(1, 2))

    def to_int(self, in_scales):
        s_q, s_k = self._scales(in_scales)
        a = self.att
        w = m = s = None
        if a.query_proj is not None:   # q' = requantize_8(W q): a hidden linear layer without bias
            W = a.query_proj.weight.detach()
            sws = _weight_scales_per_row(W, self.wmax)
            w = _quant_weight(W, sws, self.wmax)
            s_q2 = self.q_obs.scale()
            M, S = fp.quantize_multiplier_array((s_q * sws / s_q2).numpy())
            m, s = torch.from_numpy(M), torch.from_numpy(S)
            s_q = s_q2
        return im.IntLuongAttention(a.query_size, a.key_size, w, m, s, **self.common_int(s_q * s_k, s_k))


class QuantBahdanauAttention(_QuantAttention):
    """tvm_intlstm.nn.BahdanauAttention under quantization: the projections in the fixed Q3.12 domain,
    the PWL tanh, tanh in Q0.7, v per tensor (spec 11.1)."""

    def tanh_table(self):
        return fit_pwl("tanh", self.config.pwl_pieces, GATE_FRAC, self.config.pwl_method)

    def observe_scores(self, q, keys):
        return self.att.scores(q, keys)

    def fake_scores(self, q, keys):
        a = self.att
        g_s = 2.0**-GATE_FRAC
        qx = fake_quant(nn.functional.linear(q, fake_quant_weight_per_row(a.query_proj.weight, self.wmax)),
                        g_s, -32768, 32767)
        kx = fake_quant(nn.functional.linear(keys, fake_quant_weight_per_row(a.key_proj.weight, self.wmax),
                                             a.key_proj.bias), g_s, -32768, 32767)
        u = torch.clamp(qx[:, :, None, :] + kx[:, None, :, :], -8.0, 8.0 - g_s)
        t = fake_quant(FloatPWL(self.tanh_table())(u), 2.0**-15, -32768, 32767)
        t8 = fake_quant(t, 2.0**-7, -128, 127)
        return nn.functional.linear(t8, fake_quant_weight_per_tensor(a.v.weight)).squeeze(-1)

    def to_int(self, in_scales):
        s_q, s_k = self._scales(in_scales)
        a = self.att
        g = 2.0**-GATE_FRAC
        Wq, Wk = a.query_proj.weight.detach(), a.key_proj.weight.detach()
        swq, swk = _weight_scales_per_row(Wq, self.wmax), _weight_scales_per_row(Wk, self.wmax)
        mq, sq = fp.quantize_multiplier_array((s_q * swq / g).numpy())
        mk, sk = fp.quantize_multiplier_array((s_k * swk / g).numpy())
        bk = a.key_proj.bias if a.key_proj.bias is not None else torch.zeros(Wk.shape[0])
        v = a.v.weight.detach()[0]
        s_v = float(v.abs().max()) / 127 or 1.0       # per tensor: all scores share one scale
        vq = torch.clamp(torch.round(v.double() / s_v), -127, 127).to(torch.int8)
        return im.IntBahdanauAttention(
            a.query_size, a.key_size, _quant_weight(Wq, swq, self.wmax), torch.from_numpy(mq), torch.from_numpy(sq),
            _quant_weight(Wk, swk, self.wmax), _quant_bias(bk, s_k * swk), torch.from_numpy(mk), torch.from_numpy(sk),
            vq, pack_table(self.tanh_table()), **self.common_int(2.0**-7 * s_v, s_k))


class QuantMultiheadAttention(_QuantAttention):
    """tvm_intlstm.nn.MultiheadAttention under quantization (spec 11.4): the q, k, v and output
    projections are hidden linear layers (int8 per-row weights, calibrated int8 outputs), 1/sqrt(dh)
    goes into the softmax's input multiplier, one context scale for all heads. QAT: no dropout."""

    def __init__(self, att, config):
        check_mha(att)
        super().__init__(att, config)
        self.proj_obs = nn.ModuleDict({p: RangeObserver() for p in "qkv"})
        self.out_obs = RangeObserver()

    def _float_weights(self):
        (wq, bq), (wk, bk), (wv, bv) = self.att.projections()
        return {"q": (wq, bq), "k": (wk, bk), "v": (wv, bv), "o": (self.att.out_proj.weight, self.att.out_proj.bias)}

    def _attend(self, q, keys, mask, project, softmax, context, output):
        """The layer's dataflow with the arithmetic of one mode: project(x, p) for p in q, k, v;
        softmax(scores [B, H, Q, S], mask); context(ctx [B, Q, E]); output(y)."""
        H = self.att.num_heads
        qh, kh, vh = (split_heads(project(x, p), H) for x, p in ((q, "q"), (keys, "k"), (keys, "v")))
        scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(self.att.head_dim)
        w = softmax(scores, mask)
        y = output(context(merge_heads(torch.matmul(w, vh))))
        return y, w

    def forward_observe(self, query, keys, lengths=None):
        q, squeeze, mask = self._inputs(query, keys, lengths)
        W = self._float_weights()

        def project(x, p):
            y = nn.functional.linear(x, *W[p])
            self.proj_obs[p].update(y)
            return y

        def observe(obs):
            def f(x):
                obs.update(x)
                return x
            return f

        y, w = self._attend(q, keys, mask, project, masked_softmax, observe(self.ctx_obs),
                            lambda c: observe(self.out_obs)(nn.functional.linear(c, *W["o"])))
        return (y.squeeze(1), w.squeeze(2)) if squeeze else (y, w)

    def forward_fake(self, query, keys, lengths=None):
        q, squeeze, mask = self._inputs(query, keys, lengths)
        W = self._float_weights()
        exp_pwl = FloatPWL(self.exp_table())

        def linear(x, p, scale):
            w, b = W[p]
            return fake_quant(nn.functional.linear(x, fake_quant_weight_per_row(w, self.wmax), b), scale, -128, 127)

        y, w = self._attend(q, keys, mask, lambda x, p: linear(x, p, self.proj_obs[p].scale()),
                            lambda z, m: _fake_masked_softmax(z, m, exp_pwl),
                            lambda c: fake_quant(c, self.ctx_obs.scale(), -128, 127),
                            lambda c: linear(c, "o", self.out_obs.scale()))
        return (y.squeeze(1), w.squeeze(2)) if squeeze else (y, w)

    def to_int(self, in_scales):
        s_x, s_k = self._scales(in_scales)
        a = self.att
        W = self._float_weights()
        s_ctx = self.ctx_obs.scale()
        scales = {"q": (s_x, self.proj_obs["q"].scale()), "k": (s_k, self.proj_obs["k"].scale()),
                  "v": (s_k, self.proj_obs["v"].scale()), "o": (s_ctx, self.out_obs.scale())}
        proj = {}
        for p, (s_in, s_out) in scales.items():   # each a hidden linear layer (spec 5)
            w, b = W[p]
            w = w.detach()
            sws = _weight_scales_per_row(w, self.wmax)
            b = b if b is not None else torch.zeros(w.shape[0])
            M, S = fp.quantize_multiplier_array((s_in * sws / s_out).numpy())
            proj[p] = (_quant_weight(w, sws, self.wmax), _quant_bias(b, s_in * sws), torch.from_numpy(M),
                       torch.from_numpy(S))
        # scores: s_z = s_q' s_k' / sqrt(dh) (the scaling folded into the softmax's multiplier)
        common = self.common_int(scales["q"][1] * scales["k"][1] / math.sqrt(a.head_dim), scales["v"][1])
        common.pop("out_scale")   # (the context scale s_ctx; the layer's output is the projection's)
        return im.IntMultiheadAttention(a.embed_dim, a.kdim, a.num_heads, proj, ctx_scale=s_ctx,
                                        out_scale=scales["o"][1], **common)
