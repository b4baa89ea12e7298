"""Float attention layers over encoder states, with masking of padded source positions.

LuongAttention, BahdanauAttention and MultiheadAttention (torch.nn.MultiheadAttention with this
interface) return (context, weights) for a query [B, Dq] (one decoder step) or [B, Q, Dq] (Q queries),
keys [B, S, Dk] (the encoder states; they are also the values) and optional source lengths [B]
(int32/int64; None: every position is valid). Positions s >= lengths[b] get weight 0 and do not
enter the softmax; a row with length 0 gets all-zero weights and a zero context (the integer
definition, docs/integer_spec.md section 11, does the same). `tvm_intlstm.quantize` turns them into
integer layers (nn/modules.py, nn/intmodules.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def source_mask(lengths, batch: int, source_len: int, device=None):
    """bool [B, S]: True where s < lengths[b] (None: all True). Negative lengths are an error."""
    if lengths is None:
        return None
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"attention lengths must be int32/int64 [B], got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"attention lengths must have shape [{batch}] (one per batch row), "
                         f"got {list(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"attention lengths must be >= 0, got {int(lengths.min())}")
    return torch.arange(source_len, device=device)[None, :] < lengths.to(torch.int64)[:, None]


def batch_mask(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """mask [B, S] viewed against scores [B, ..., S] (every row of batch b masked by mask[b])."""
    return mask.reshape(mask.shape[0], *([1] * (scores.dim() - 2)), mask.shape[-1])


def masked_softmax(scores: torch.Tensor, mask) -> torch.Tensor:
    """softmax over the last axis of scores [B, ..., S] restricted to mask [B, S] (None: unmasked);
    masked positions and rows with no valid position get 0."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    valid = batch_mask(mask, scores)
    neg = torch.finfo(scores.dtype).min
    m = scores.masked_fill(~valid, neg).amax(dim=-1, keepdim=True).detach()
    e = torch.exp((scores - m).masked_fill(~valid, neg)) * valid
    return e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def _as_queries(query: torch.Tensor, size: int):
    if query.dim() not in (2, 3) or query.shape[-1] != size:
        raise ValueError(f"attention query must be [B, {size}] or [B, Q, {size}], got {list(query.shape)}")
    return (query.unsqueeze(1), True) if query.dim() == 2 else (query, False)


def _check_keys(keys: torch.Tensor, size: int, batch: int):
    if keys.dim() != 3 or keys.shape[-1] != size or keys.shape[0] != batch:
        raise ValueError(f"attention keys must be [B={batch}, S, {size}] (the encoder states, batch "
                         f"first), got {list(keys.shape)}")


def attend(scores: torch.Tensor, keys: torch.Tensor, lengths, squeeze: bool):
    """(context, weights) from scores [B, Q, S]: the masked softmax, then the weighted sum of keys."""
    B, _, S = scores.shape
    w = masked_softmax(scores, source_mask(lengths, B, S, scores.device))
    ctx = torch.matmul(w, keys)
    return (ctx.squeeze(1), w.squeeze(1)) if squeeze else (ctx, w)


class LuongAttention(nn.Module):
    """Luong et al.'s multiplicative attention: score(q, k) = q . k ("dot", query_size ==
    key_size) or q . (W k) = (W^T q) . k ("general", W a learned [key_size, query_size] map)."""

    def __init__(self, query_size: int, key_size: int, score: str = "dot"):
        super().__init__()
        if score not in ("dot", "general"):
            raise ValueError(f"LuongAttention score must be 'dot' or 'general', got {score!r}")
        if score == "dot" and query_size != key_size:
            raise ValueError(f"the dot score needs query_size == key_size (got {query_size} and "
                             f"{key_size}); use score='general' for different sizes")
        self.query_size, self.key_size, self.score = int(query_size), int(key_size), score
        self.query_proj = nn.Linear(query_size, key_size, bias=False) if score == "general" else None

    def scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.query_proj is not None:
            q = self.query_proj(q)
        return torch.matmul(q, keys.transpose(1, 2))

    def forward(self, query, keys, lengths=None):
        q, squeeze = _as_queries(query, self.query_size)
        _check_keys(keys, self.key_size, q.shape[0])
        return attend(self.scores(q, keys), keys, lengths, squeeze)


class BahdanauAttention(nn.Module):
    """Bahdanau et al.'s additive attention: score(q, k_s) = v . tanh(W_q q + W_k k_s + b)."""

    def __init__(self, query_size: int, key_size: int, attn_size: int):
        super().__init__()
        self.query_size, self.key_size, self.attn_size = int(query_size), int(key_size), int(attn_size)
        self.query_proj = nn.Linear(query_size, attn_size, bias=False)
        self.key_proj = nn.Linear(key_size, attn_size, bias=True)
        self.v = nn.Linear(attn_size, 1, bias=False)

    def scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        u = self.query_proj(q)[:, :, None, :] + self.key_proj(keys)[:, None, :, :]   # [B, Q, S, A]
        return self.v(torch.tanh(u)).squeeze(-1)

    def forward(self, query, keys, lengths=None):
        q, squeeze = _as_queries(query, self.query_size)
        _check_keys(keys, self.key_size, q.shape[0])
        return attend(self.scores(q, keys), keys, lengths, squeeze)


# ---------------------------------------------------------------------------------------------
# multi-head attention (docs/integer_spec.md section 11.4)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, E] -> [B, heads, L, E / heads] (head h holds features h*dh .. (h+1)*dh - 1)."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, dh] -> [B, L, heads * dh] (the heads' contexts concatenated, as torch does)."""
    return x.transpose(1, 2).flatten(-2)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention called like the other attention layers: forward(query, keys,
    lengths=None) with query [B, E] (one decoder step) or [B, Q, E], keys = values [B, S, kdim]
    (the encoder states, batch first) and source lengths [B]. Returns (output [B, (Q,) E], weights
    [B, heads, (Q,) S]): the per-head weights (torch's `average_attn_weights=False`).

    A subclass of torch.nn.MultiheadAttention: the same parameters (in_proj_weight / q,k,v_proj_weight,
    in_proj_bias, out_proj) and state_dict, so a stock module's weights load as they are
    (`MultiheadAttention.from_torch(mha)`). It equals `mha(query, keys, keys, key_padding_mask=
    s >= lengths[b], need_weights=True, average_attn_weights=False)` on batch-first tensors, except
    that a row of length 0 gets zero weights and the output out_proj(0) = out_proj.bias (torch gives
    NaN there), as the integer definition does. Not supported: add_bias_kv, add_zero_attn,
    vdim != kdim (keys are the values). Dropout applies to the weights in training mode only."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim=None, vdim=None, device=None, dtype=None):
        kdim = embed_dim if kdim is None else kdim
        vdim = kdim if vdim is None else vdim
        if vdim != kdim:
            raise ValueError(f"tvm_intlstm.nn.MultiheadAttention attends over encoder states that are "
                             f"both keys and values: vdim must equal kdim, got kdim={kdim}, vdim={vdim}")
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=False,
                         add_zero_attn=False, kdim=kdim, vdim=vdim, batch_first=True, device=device,
                         dtype=dtype)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """This wrapper with the weights of a stock torch.nn.MultiheadAttention (any batch_first:
        the wrapper's interface is batch first)."""
        check_mha(mha)
        out = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  kdim=mha.kdim, vdim=mha.vdim, device=mha.out_proj.weight.device,
                  dtype=mha.out_proj.weight.dtype)
        out.load_state_dict(mha.state_dict())
        return out.train(mha.training)

    query_size = property(lambda self: self.embed_dim)
    key_size = property(lambda self: self.kdim)

    def projections(self):
        """((W_q, b_q), (W_k, b_k), (W_v, b_v)): the input projections (biases None without bias)."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            ws = (w[:E], w[E:2 * E], w[2 * E:])
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        b = self.in_proj_bias
        bs = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        return tuple(zip(ws, bs))

    def forward(self, query, keys, lengths=None):
        q, squeeze = _as_queries(query, self.embed_dim)
        _check_keys(keys, self.kdim, q.shape[0])
        mask = source_mask(lengths, q.shape[0], keys.shape[1], keys.device)
        (wq, bq), (wk, bk), (wv, bv) = self.projections()
        qh = split_heads(nn.functional.linear(q, wq, bq), self.num_heads)       # [B, H, Q, dh]
        kh = split_heads(nn.functional.linear(keys, wk, bk), self.num_heads)    # [B, H, S, dh]
        vh = split_heads(nn.functional.linear(keys, wv, bv), self.num_heads)
        scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(self.head_dim)
        w = nn.functional.dropout(masked_softmax(scores, mask), self.dropout, self.training)
        out = self.out_proj(merge_heads(torch.matmul(w, vh)))
        return (out.squeeze(1), w.squeeze(2)) if squeeze else (out, w)


def check_mha(mha: nn.MultiheadAttention) -> None:
    """The options tvm_intlstm.nn.MultiheadAttention supports (a ValueError naming the others)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError("nn.MultiheadAttention(add_bias_kv=True) is not supported")
    if mha.add_zero_attn:
        raise ValueError("nn.MultiheadAttention(add_zero_attn=True) is not supported")
    if mha.kdim != mha.vdim:
        raise ValueError(f"nn.MultiheadAttention with vdim ({mha.vdim}) != kdim ({mha.kdim}) is not "
                         "supported: the encoder states are both keys and values")
