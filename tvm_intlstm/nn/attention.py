"""Float attention layers over encoder states, with masking of padded source positions.

Both return (context, weights) for a query [B, Dq] (one decoder step) or [B, Q, Dq] (Q queries),
keys [B, S, Dk] (the encoder states; they are also the values) and optional source lengths [B]
(int32/int64; None: every position is valid). Positions s >= lengths[b] get weight 0 and do not
enter the softmax; a row with length 0 gets all-zero weights and a zero context (the integer
definition, docs/integer_spec.md section 11, does the same). `tvm_intlstm.quantize` turns them into
integer layers (nn/modules.py, nn/intmodules.py).
"""
from __future__ import annotations

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


def masked_softmax(scores: torch.Tensor, mask) -> torch.Tensor:
    """softmax over the last axis of scores [B, Q, S] restricted to mask [B, S] (None: unmasked);
    masked positions and rows with no valid position get 0."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    valid = mask[:, None, :]
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
