"""PyTorch integer simulation of docs/integer_spec.md, registered as `torch.ops.intlstm.*` custom ops.

Each op is declared in tvm_intlstm/opdefs.py (its schema and its fake, shape-only, implementation
come from there); this file holds the implementation of each, a function of the op's name. These ops
are what an eval-mode quantized model runs, and what `torch.export` keeps as single nodes
for the compiler's importer (tvm_intlstm/frontend maps each op name to TIR kernels). They must agree
bit for bit with tvm_intlstm/reference/ops.py; tests/test_reference_ops.py and test_op_registry.py check it.

Tensors are int8/int16/int32 at the op boundary; inside, arithmetic is int64. The int8 matrix
products go through float64 BLAS: every product is an integer below 2^14 in magnitude and every
partial sum below K * 2^14 <= 2^30, all exactly representable in float64 (53-bit mantissa), so the
result is the exact integer sum, just faster than torch's int64 matmul.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..opdefs import OP_NAMESPACE, OPS, OpDef
from ..spec import LN_FRAC, PROB_FRAC, PWL_FRAC

_MAX_K = 2**16


def int_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int64 result of x[..., K] @ w[O, K]^T for int8-range operands (see module docstring)."""
    if x.shape[-1] > _MAX_K:
        raise ValueError(f"inner dimension {x.shape[-1]} exceeds 2^16 (spec 5 bound)")
    return torch.matmul(x.to(torch.float64), w.to(torch.float64).t()).to(torch.int64)


def sat(v: torch.Tensor, bits: int) -> torch.Tensor:
    return v.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def rshift_round(v: torch.Tensor, n) -> torch.Tensor:
    """(v + 2^(n-1)) >> n with ties toward +inf; n an int or an int tensor (per channel)."""
    v = v.to(torch.int64)
    if isinstance(n, int):
        return v if n == 0 else (v + (1 << (n - 1))) >> n
    n = n.to(torch.int64)
    half = torch.where(n > 0, torch.ones_like(n) << (n - 1).clamp(min=0), torch.zeros_like(n))
    return (v + half) >> n


_DT = {8: torch.int8, 16: torch.int16, 32: torch.int32}


def requantize(acc: torch.Tensor, M, s, bits: int) -> torch.Tensor:
    """requantize_N (spec 2)."""
    M = M.to(torch.int64) if isinstance(M, torch.Tensor) else int(M)
    return sat(rshift_round(acc.to(torch.int64) * M, s), bits).to(_DT[bits])


def pwl(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """PWL activation (spec 7); table packed int32 [3, n+1] (knots; bases; slopes)."""
    t = table.to(torch.int64)
    n = t.shape[1] - 1
    k, v, a = t[0], t[1, :n], t[2, :n]
    xc = torch.maximum(torch.minimum(x.to(torch.int64), k[n]), k[0])
    idx = torch.searchsorted(k[1:n].contiguous(), xc, right=True)  # #{j>=1 : xc >= k_j}
    return sat(v[idx] + rshift_round(a[idx] * (xc - k[idx]), PWL_FRAC), 16).to(torch.int16)


# ---------------------------------------------------------------------------------------------
# the implementations of the operators declared in tvm_intlstm/opdefs.py (one function per op, of
# the op's name and signature); `register_op` below makes each a custom op, one node through
# torch.export


def quantize_input(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Boundary quantization (spec 1): sat_8(floor(float32(x / s) + 0.5f))."""
    if x.dtype != torch.float32:
        raise TypeError(f"float inputs must be float32, got {x.dtype}")
    q = torch.floor(x / torch.tensor(scale, dtype=torch.float32) + torch.tensor(0.5, dtype=torch.float32))
    return q.clamp(-128, 127).to(torch.int8)



def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    V = table.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise IndexError(f"token id out of range [0, {V}): min {int(ids.min())}, max {int(ids.max())}")
    return table[ids.to(torch.int64)].clone()



def linear_i32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Final linear layer (spec 5): int32 logits, not requantized."""
    return (int_matmul(x, w) + b.to(torch.int64)).to(torch.int32)



def linear_requant(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
                   out_bits: int) -> torch.Tensor:
    """Hidden linear layer (spec 5): requantize_N(W x + b) with per-row multipliers."""
    return requantize(int_matmul(x, w) + b.to(torch.int64), m, s, out_bits)



def _gates_and_cell(z: torch.Tensor, c: torch.Tensor, sig, tanh, cell_frac: int):
    """i, f, g, o of z [B, 4H] by PWL and the new cell (spec 8; shared by 8b): (o int64, c int16)."""
    H = z.shape[1] // 4
    i = pwl(z[:, 0:H], sig).to(torch.int64)
    f = pwl(z[:, H:2 * H], sig).to(torch.int64)
    g = pwl(z[:, 2 * H:3 * H], tanh).to(torch.int64)
    o = pwl(z[:, 3 * H:4 * H], sig).to(torch.int64)
    c = sat(rshift_round(f * c.to(torch.int64), 15) + rshift_round(i * g, 30 - cell_frac), 16).to(torch.int16)
    return o, c


def _run_direction(gx: torch.Tensor, B: int, H: int, step, reverse: bool, h0, c0):
    """The time loop of an (LN-)LSTM direction: (h, c) = step(gx[t], h, c) from (h0, c0) (zeros by
    default), forward or reversed. Returns (y int8 [T, B, H], h_T, c_T)."""
    h = torch.zeros((B, H), dtype=torch.int8) if h0 is None else h0.to(torch.int8)
    c = torch.zeros((B, H), dtype=torch.int16) if c0 is None else c0.to(torch.int16)
    y = torch.empty((gx.shape[0], B, H), dtype=torch.int8)
    for t in (range(gx.shape[0] - 1, -1, -1) if reverse else range(gx.shape[0])):
        h, c = step(gx[t], h, c)
        y[t] = h
    return y, h.clone(), c.clone()


def lstm_direction(x: torch.Tensor, w_x: torch.Tensor, w_h: torch.Tensor, bias: torch.Tensor,
                   mx: torch.Tensor, sx: torch.Tensor, mh: torch.Tensor, sh: torch.Tensor,
                   sig: torch.Tensor, tanh: torch.Tensor, tanh_c: torch.Tensor,
                   mo: int, so: int, cell_frac: int, reverse: bool,
                   h0: Optional[torch.Tensor] = None, c0: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM direction (spec 8). x int8 [T, B, I] time-major -> (y int8 [T,B,H], h_T int8, c_T int16)."""
    _, B, _ = x.shape
    H = w_h.shape[1]
    gx = requantize(int_matmul(x, w_x) + bias.to(torch.int64), mx, sx, 16)  # all steps at once
    def step(gx_t, h, c):
        z = sat(gx_t.to(torch.int64) + requantize(int_matmul(h, w_h), mh, sh, 16).to(torch.int64), 16)
        o, c = _gates_and_cell(z, c, sig, tanh, cell_frac)
        return requantize(o * pwl(c, tanh_c).to(torch.int64), mo, so, 8), c

    return _run_direction(gx, B, H, step, reverse, h0, c0)



def residual_add(a: torch.Tensor, b: torch.Tensor, ma: int, mb: int, s: int) -> torch.Tensor:
    """8-bit residual add (spec 9)."""
    v = a.to(torch.int64) * ma + b.to(torch.int64) * mb
    return sat(rshift_round(v, s), 8).to(torch.int8)



def rescale(x: torch.Tensor, m: int, s: int) -> torch.Tensor:
    """int8 -> int8 at another scale (spec 2, rescale_8)."""
    return requantize(x.to(torch.int64), m, s, 8)



def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) for 0 <= v < 2^62: the 31-round binary digit-by-digit method (spec 10)."""
    v = v.to(torch.int64).clone()
    res = torch.zeros_like(v)
    for k in range(30, -1, -1):
        bit = 1 << (2 * k)
        take = v >= res + bit
        v = torch.where(take, v - (res + bit), v)
        res = torch.where(take, (res >> 1) + bit, res >> 1)
    return res


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, ml: int, sl: int) -> torch.Tensor:
    """Integer layer norm over the last axis (spec 10)."""
    xi = x.to(torch.int64)
    D = xi.shape[-1]
    S = xi.sum(dim=-1, keepdim=True)
    d = D * xi - S
    V = (d * d).sum(dim=-1, keepdim=True)
    r = torch.clamp(isqrt(torch.div(V, D, rounding_mode="floor")), min=1)
    n = torch.div(2 * d * (1 << LN_FRAC) + r, 2 * r, rounding_mode="floor")
    acc = n * gamma.to(torch.int64) + beta.to(torch.int64)
    return sat(rshift_round(acc * ml, sl), 8).to(torch.int8)



def softmax(z: torch.Tensor, mz: int, sz: int, exp_table: torch.Tensor) -> torch.Tensor:
    """Integer softmax over the last axis (spec 11): int32 scores -> int16 Q0.15."""
    zi = z.to(torch.int64)
    m = zi.amax(dim=-1, keepdim=True)
    d = torch.clamp(zi - m, min=-(2**31))
    d16 = requantize(d, mz, sz, 16)
    e = pwl(d16, exp_table).to(torch.int64)
    E = e.sum(dim=-1, keepdim=True)
    p = torch.clamp(torch.div(e * (1 << PROB_FRAC) + torch.div(E, 2, rounding_mode="floor"), E,
                              rounding_mode="floor"), max=32767)
    return p.to(torch.int16)



def attention_context(p: torch.Tensor, v: torch.Tensor, mc: int, sc: int) -> torch.Tensor:
    """ctx = requantize_8(sum_k p_k v_kd) (spec 11). p int16 [..., K], v int8 [..., K, D]."""
    acc = torch.matmul(p.to(torch.float64).unsqueeze(-2), v.to(torch.float64)).squeeze(-2).to(torch.int64)  # exact: < 2^38
    return requantize(acc, mc, sc, 8)


def layer_norm16(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, ml: int, sl: int,
                 eps: int) -> torch.Tensor:
    """Layer norm of int16 values over the last axis to int16 Q3.12 (spec 10b)."""
    xi = x.to(torch.int64)
    D = xi.shape[-1]
    S = xi.sum(dim=-1, keepdim=True)
    mu = torch.div(2 * S + D, 2 * D, rounding_mode="floor")
    d = xi - mu
    V = (d * d).sum(dim=-1, keepdim=True)
    r = torch.clamp(isqrt(torch.div(V, D, rounding_mode="floor") + eps), min=1)
    n = torch.div(2 * d * (1 << LN_FRAC) + r, 2 * r, rounding_mode="floor")
    acc = n * gamma.to(torch.int64) + beta.to(torch.int64)
    return sat(rshift_round(acc * ml, sl), 16).to(torch.int16)


def _ln_gates(a: torch.Tensor, gamma, beta, ml, sl, eps) -> torch.Tensor:
    H = a.shape[-1] // 4
    blocks = a.unflatten(-1, (4, H))
    return layer_norm16(blocks, gamma.view(4, H), beta.view(4, H), ml, sl, eps).flatten(-2)


def ln_lstm_direction(x: torch.Tensor, w_x: torch.Tensor, w_h: torch.Tensor,
                      mx: torch.Tensor, sx: torch.Tensor, mh: torch.Tensor, sh: torch.Tensor,
                      gamma_x: torch.Tensor, beta_x: torch.Tensor, gamma_h: torch.Tensor,
                      beta_h: torch.Tensor, gamma_c: torch.Tensor, beta_c: torch.Tensor,
                      sig: torch.Tensor, tanh: torch.Tensor, tanh_c: torch.Tensor,
                      mo: int, so: int, cell_frac: int, reverse: bool,
                      ml_x: int, sl_x: int, eps_x: int, ml_h: int, sl_h: int, eps_h: int,
                      ml_c: int, sl_c: int, eps_c: int,
                      h0: Optional[torch.Tensor] = None, c0: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer-norm LSTM direction (spec 8b). x int8 [T, B, I] time-major -> (y, h_T, c_T)."""
    _, B, _ = x.shape
    H = w_h.shape[1]
    ax = requantize(int_matmul(x, w_x), mx, sx, 16)          # all steps at once
    gx = _ln_gates(ax, gamma_x, beta_x, ml_x, sl_x, eps_x)
    def step(gx_t, h, c):
        gh = _ln_gates(requantize(int_matmul(h, w_h), mh, sh, 16), gamma_h, beta_h, ml_h, sl_h, eps_h)
        o, c = _gates_and_cell(sat(gx_t.to(torch.int64) + gh.to(torch.int64), 16), c, sig, tanh, cell_frac)
        cn = layer_norm16(c, gamma_c, beta_c, ml_c, sl_c, eps_c)
        return requantize(o * pwl(cn, tanh_c).to(torch.int64), mo, so, 8), c

    return _run_direction(gx, B, H, step, reverse, h0, c0)


def pack_table(t) -> torch.Tensor:
    """PWLTable -> int32 [3, n+1] (knots; bases padded; slopes padded): the form kernels take
    (tvm_intlstm.reference.ops.unpack_table is the inverse)."""
    n = t.pieces
    out = torch.zeros((3, n + 1), dtype=torch.int32)
    out[0] = torch.as_tensor(t.knots.astype("int32"))
    out[1, :n] = torch.as_tensor(t.base.astype("int32"))
    out[2, :n] = torch.as_tensor(t.slope.astype("int32"))
    return out


# ---------------------------------------------------------------------------------------------
# attention (issue 18 item 3; spec 11): scores and the masked softmax. (Placed before the
# registration below, which needs every declared op's function to exist.)


def attention_dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Luong dot scores (spec 11.1): q int8 [B, Q, D], k int8 [B, S, D] -> int32 [B, Q, S]."""
    if q.shape[-1] > _MAX_K:
        raise ValueError(f"attention feature size {q.shape[-1]} exceeds 2^16 (spec 11 bound)")
    # exact in float64: products below 2^14, sums below 2^30 (see the module docstring)
    return torch.matmul(q.to(torch.float64), k.to(torch.float64).transpose(1, 2)).to(torch.int32)


def additive_scores(qx: torch.Tensor, kx: torch.Tensor, v: torch.Tensor, tanh_table: torch.Tensor) -> torch.Tensor:
    """Bahdanau scores (spec 11.1): v . sat_8(rshift_round(pwl(tanh, add_sat_16(qx, kx)), 8))."""
    if v.shape[-1] > _MAX_K:
        raise ValueError(f"attention size {v.shape[-1]} exceeds 2^16 (spec 11 bound)")
    u = sat(qx.to(torch.int64)[:, :, None, :] + kx.to(torch.int64)[:, None, :, :], 16)
    t8 = sat(rshift_round(pwl(u, tanh_table).to(torch.int64), 8), 8)
    return torch.matmul(t8.to(torch.float64), v.to(torch.float64)).to(torch.int32)   # exact: < 2^30


def masked_softmax(z: torch.Tensor, lengths: torch.Tensor, mz: int, sz: int, exp_table: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of z int32 [B, ..., S] restricted to s < clamp(lengths[b], 0, S)
    (spec 11.2); 0 at padded positions and in rows of length 0."""
    S = z.shape[-1]
    n = lengths.to(torch.int64).clamp(0, S).reshape((-1,) + (1,) * (z.dim() - 1))
    valid = torch.arange(S, device=z.device) < n
    zi = z.to(torch.int64)
    m = torch.where(valid, zi, torch.full_like(zi, -(2**31))).amax(dim=-1, keepdim=True)
    d = torch.where(valid, torch.clamp(zi - m, min=-(2**31)), torch.zeros_like(zi))
    e = torch.where(valid, pwl(requantize(d, mz, sz, 16), exp_table).to(torch.int64), torch.zeros_like(zi))
    E = e.sum(dim=-1, keepdim=True).clamp(min=1)   # > 0 wherever a position is valid
    p = torch.clamp(torch.div(e * (1 << PROB_FRAC) + torch.div(E, 2, rounding_mode="floor"), E,
                              rounding_mode="floor"), max=32767)
    return torch.where(valid, p, torch.zeros_like(p)).to(torch.int16)


def mha_scores(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head dot scores (spec 11.4): q int8 [B, Q, E], k int8 [B, S, E] -> int32 [B, H, Q, S],
    head h over features h*dh .. (h+1)*dh - 1 (dh = E / H)."""
    H, E = int(num_heads), q.shape[-1]
    if H < 1 or E % H or k.shape[-1] != E:
        raise ValueError(f"mha_scores: q [B, Q, E] and k [B, S, E] with E a multiple of num_heads, got "
                         f"{list(q.shape)}, {list(k.shape)} and num_heads {H}")
    if E // H > _MAX_K:
        raise ValueError(f"attention head size {E // H} exceeds 2^16 (spec 11 bound)")
    qh = q.to(torch.float64).unflatten(-1, (H, E // H)).transpose(1, 2)     # [B, H, Q, dh]
    kh = k.to(torch.float64).unflatten(-1, (H, E // H)).transpose(1, 2)     # [B, H, S, dh]
    return torch.matmul(qh, kh.transpose(-1, -2)).to(torch.int32)            # exact: < 2^30


# ---------------------------------------------------------------------------------------------
# registration: torch.ops.intlstm.<name> from each declaration


def _torch_dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def fake_impl(op: OpDef):
    """The op's fake (shape-only) implementation for torch.export, from its output rule; operands of
    an undeclared dtype are refused here, naming the operand."""

    def fake(*args, **kwargs):
        bound = op.bind(args, kwargs)
        device = next(v.device for v in bound.values() if isinstance(v, torch.Tensor))
        shapes = {}
        for t in op.operands:
            v = bound[t.name]
            if v is not None:
                op.check_dtype(t, _torch_dtype_name(v))
            shapes[t.name] = None if v is None else tuple(v.shape)
        attrs = {a.name: a.cast(bound[a.name]) for a in op.attrs}
        outs = [torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                for shape, dtype in op.output_types(shapes, attrs)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    fake.__name__ = f"{op.name}_fake"
    return fake


def register_op(op: OpDef, impl):
    """torch.ops.intlstm.<op.name>: `impl` (the exact integer implementation) under the schema of
    the declaration, with the fake implementation of its output rule. Returns the custom op."""
    custom = torch.library.custom_op(f"{OP_NAMESPACE}::{op.name}", impl, mutates_args=(), schema=op.schema)
    custom.register_fake(fake_impl(op))
    return custom


def _register_declared():
    for name, op in OPS.items():
        impl = globals().get(name)
        if not callable(impl):
            raise RuntimeError(f"operator {name} is declared in tvm_intlstm/opdefs.py but nn/intops.py "
                               f"has no function {name}")
        globals()[name] = register_op(op, impl)   # intops.<name> is the custom op, as torch.ops.intlstm.<name>


_register_declared()
