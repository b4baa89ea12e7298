"""The character-level LSTM language model and its bits-per-character protocol.

``CharLM`` = ``nn.Embedding(V, 64) -> nn.LSTM(64, 512, num_layers=2, batch_first=True)
-> nn.Linear(512, V)``. ``forward(x)`` maps int64 ids ``[B, T]`` to logits ``[B, T, V]``
starting from a zero LSTM state; it is kept trivially ``torch.fx``-traceable for the
tvm_intlstm frontend.

Bits per character (:func:`bpc`), the fixed evaluation protocol
-----------------------------------------------------------------
For an id array ``ids`` of length N, window ``k`` (``k = 0 .. W-1``,
``W = (N - 1) // seq_len``) feeds ``x = ids[k*T : k*T + T]`` (``T = seq_len``) from a
fresh zero LSTM state and scores the targets ``y = ids[k*T + 1 : k*T + T + 1]``.
Windows do not overlap; the ``(N - 1) % seq_len`` trailing targets are not scored.
BPC = mean over all ``W * T`` scored characters of the natural-log cross-entropy
(log-softmax computed in float64), divided by ``ln 2``. Windows are evaluated in
batches of exactly ``[batch, seq_len]`` (the last batch is padded by repeating its
last window, whose padded rows are ignored), so fixed-shape compiled functions
can be evaluated with the same protocol. The reference figures use
``seq_len=128`` on the valid/test split of :mod:`examples.char_lm.data`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

EMBED_DIM = 64
HIDDEN = 512
NUM_LAYERS = 2


class CharLM(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear; ``forward(x [B,T] int64) -> logits [B,T,V]``."""

    def __init__(self, vocab_size: int, embed_dim: int = EMBED_DIM, hidden: int = HIDDEN, num_layers: int = NUM_LAYERS):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        out, _ = self.lstm(e)
        return self.head(out)

    def forward_with_state(self, x: torch.Tensor, state=None):
        """Like ``forward`` but from/to an explicit ``(h, c)`` state (for carried-state TBPTT
        and text generation); not used by the traced graph."""
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state

    def config(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed.embedding_dim,
            "hidden": self.lstm.hidden_size,
            "num_layers": self.lstm.num_layers,
        }


def bpc(
    model_or_fn: nn.Module | Callable,
    ids,
    seq_len: int = 128,
    batch: int = 32,
    max_windows: int | None = None,
) -> float:
    """Bits per character of ``model_or_fn`` on ``ids`` (see the module docstring).

    ``model_or_fn`` is either an ``nn.Module`` (called in eval mode under
    ``torch.no_grad`` with an int64 tensor ``[batch, seq_len]``) or any callable
    taking an int64 numpy array ``[batch, seq_len]`` and returning logits
    ``[batch, seq_len, V]`` (numpy array or tensor), e.g. a compiled TVM module
    wrapper. ``max_windows`` (a cheaper estimate for monitoring, not the reference
    protocol) scores only that many windows, evenly spaced over the split
    (``None`` = every window, the reference figure).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n_all = (ids.size - 1) // seq_len
    if n_all <= 0:
        raise ValueError("ids too short for one window")
    win = np.arange(n_all)
    if max_windows is not None and max_windows < n_all:
        win = np.unique(np.linspace(0, n_all - 1, int(max_windows)).round().astype(np.int64))
    n_win = win.size
    is_module = isinstance(model_or_fn, nn.Module)
    was_training = model_or_fn.training if is_module else False
    if is_module:
        model_or_fn.eval()
    total_nll = 0.0
    starts_all = win * seq_len
    ar = np.arange(seq_len)
    try:
        with torch.no_grad():
            for b0 in range(0, n_win, batch):
                starts = starts_all[b0 : b0 + batch]
                n_real = starts.size
                if n_real < batch:  # pad to a full, fixed-shape batch
                    starts = np.concatenate([starts, np.full(batch - n_real, starts[-1])])
                idx = starts[:, None] + ar[None, :]
                x, y = ids[idx], ids[idx + 1]
                if is_module:
                    logits = model_or_fn(torch.from_numpy(x))
                else:
                    logits = model_or_fn(x)
                logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits)
                logits = logits[:n_real].to(torch.float64)
                logp = torch.log_softmax(logits, dim=-1)
                tgt = torch.from_numpy(y[:n_real]).unsqueeze(-1)
                total_nll -= float(logp.gather(-1, tgt).sum())
    finally:
        if is_module and was_training:
            model_or_fn.train()
    return total_nll / (n_win * seq_len) / math.log(2)


# --------------------------------------------------------------------------- checkpoints


def vocab_path_for(checkpoint: Path | str) -> Path:
    """Where the vocab JSON of a checkpoint lives: ``fp.pt`` -> ``fp.vocab.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".vocab.json")


def load_checkpoint(path: Path | str, map_location: str = "cpu"):
    """Load a checkpoint written by ``train_fp``: returns ``(model, vocab, ckpt_dict)``
    with the model in eval mode."""
    from .data import Vocab

    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    cfg = ckpt["model_config"]
    model = CharLM(cfg["vocab_size"], cfg["embed_dim"], cfg["hidden"], cfg["num_layers"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    vocab = Vocab.from_json(ckpt["vocab"])
    return model, vocab, ckpt


@torch.no_grad()
def generate(model: CharLM, vocab, prompt: str, n: int = 200, temperature: float = 0.8, seed: int = 0) -> str:
    """Sample ``n`` characters after ``prompt`` (for eyeballing a trained model)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    ids = torch.from_numpy(vocab.encode(prompt or "\n")).unsqueeze(0)
    logits, state = model.forward_with_state(ids)
    out = []
    for _ in range(n):
        p = torch.softmax(logits[0, -1].double() / temperature, -1)
        nxt = torch.multinomial(p, 1, generator=g)
        out.append(int(nxt))
        logits, state = model.forward_with_state(nxt.view(1, 1), state)
    return prompt + vocab.decode(out)


if __name__ == "__main__":  # quick smoke: python -m examples.char_lm.model
    m = CharLM(100)
    print(json.dumps(m.config()), sum(p.numel() for p in m.parameters()), "params")
    print("uniform-ish init bpc:", bpc(m, np.random.default_rng(0).integers(0, 100, 4097), 128, 8))
