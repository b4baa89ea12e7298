"""The float G2P model: BiLSTM encoder, attention LSTM decoder step, and float decoding.

Shapes are those the tvm_intlstm compiler takes (issue 18 item 4): an ``Encoder`` module and a
``DecoderStep`` module made only of ``nn.Embedding``, ``nn.LSTM`` (bidirectional in the encoder;
the decoder's states as model inputs, docs/stateful.md), ``tvm_intlstm.nn.LuongAttention`` with
source ``lengths``, ``torch.cat`` and ``nn.Linear``.

* ``Encoder.forward(src [B, S] int64, lengths [B] int64) -> enc [B, S, 2*He]``: Embedding ->
  bidirectional LSTM. The forward is plain (no packing): ``lengths`` is not used here, and on a
  batch of words of different lengths the reverse direction starts in the padding, so the states
  of a padded word differ a little from those of the same word alone. The attention masks padded
  positions by ``lengths``; training batches mix nearby lengths (a little padding), and evaluation
  (:mod:`examples.g2p.evaluate_fp`) batches words of one length only, so its figures are those of
  each word run alone.
* ``DecoderStep.forward(prev [B, 1], h0 [1, B, Hd], c0 [1, B, Hd], enc, lengths)
  -> (logits [B, 1, V], h, c)``: Embedding(prev) -> LSTM from (h0, c0) -> LuongAttention(query =
  LSTM output, keys = enc, lengths) -> cat([lstm_out, context]) -> Linear. Decoding starts from
  the zero state with ``prev = BOS``: there is no bridge from the encoder's final state (the
  attention carries the source), so the decoder's state inputs are only its own states.
* ``G2P(src, lengths, tgt_in) -> logits [B, T, V]``: teacher forcing with the **same** modules:
  the decoder has no input feeding (the context does not go back into the LSTM), so one LSTM call
  over the whole target input equals T DecoderStep calls, and the attention takes the T queries
  at once (tests/test_g2p_data.py checks the equality).

Decoding takes the argmax over all V logits (PAD and BOS are never targets, so they are never
likely; :meth:`examples.g2p.data.Vocab.decode` skips them should they appear), the same rule an
integer decoder applies to int32 logits.
"""
from __future__ import annotations

import torch
from torch import nn

from tvm_intlstm.nn import LuongAttention

from .data import BOS, EOS, GRAPHEME_VOCAB, PHONEME_VOCAB

EMBED_DIM = 64
ENC_HIDDEN = 256
ENC_LAYERS = 2
DEC_HIDDEN = 256
ATTENTION_SCORE = "general"
#: on the embeddings and on the Linear's input, training only (nn.Dropout is the identity in eval
#: mode, and a layer the quantizer takes)
DROPOUT = 0.2


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, num_layers: int, dropout: float = DROPOUT):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, batch_first=True, bidirectional=True)

    def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        enc, _ = self.lstm(self.drop(self.embed(src)))
        return enc


class DecoderStep(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, enc_size: int, score: str = ATTENTION_SCORE,
                 dropout: float = DROPOUT):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.attention = LuongAttention(hidden, enc_size, score=score)
        self.out = nn.Linear(hidden + enc_size, vocab_size)

    def forward(self, prev, h0, c0, enc, lengths):
        y, (h, c) = self.lstm(self.drop(self.embed(prev)), (h0, c0))
        context, _ = self.attention(y, enc, lengths)
        logits = self.out(self.drop(torch.cat([y, context], -1)))
        return logits, h, c

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.zeros(1, batch, self.lstm.hidden_size)
        return z, z.clone()


class G2P(nn.Module):
    """Encoder + DecoderStep; ``forward`` is the teacher-forced training path."""

    def __init__(self, embed_dim: int = EMBED_DIM, enc_hidden: int = ENC_HIDDEN, enc_layers: int = ENC_LAYERS,
                 dec_hidden: int = DEC_HIDDEN, score: str = ATTENTION_SCORE, dropout: float = DROPOUT,
                 src_vocab: int = len(GRAPHEME_VOCAB), tgt_vocab: int = len(PHONEME_VOCAB)):
        super().__init__()
        self.encoder = Encoder(src_vocab, embed_dim, enc_hidden, enc_layers, dropout)
        self.decoder = DecoderStep(tgt_vocab, embed_dim, dec_hidden, 2 * enc_hidden, score, dropout)
        self._config = dict(embed_dim=embed_dim, enc_hidden=enc_hidden, enc_layers=enc_layers,
                            dec_hidden=dec_hidden, score=score, dropout=dropout,
                            src_vocab=src_vocab, tgt_vocab=tgt_vocab)

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, src, lengths, tgt_in):
        enc = self.encoder(src, lengths)
        dec = self.decoder
        h0, c0 = dec.zero_state(src.shape[0])
        y, _ = dec.lstm(dec.drop(dec.embed(tgt_in)), (h0, c0))
        context, _ = dec.attention(y, enc, lengths)
        return dec.out(dec.drop(torch.cat([y, context], -1)))


def max_decode_len(src_len: int) -> int:
    # the longest pronunciation in CMUdict is 28 phonemes for a 28-letter word (17 for 14 letters);
    # a word's phonemes never outnumber its letters by more than a few
    return src_len + 8


@torch.no_grad()
def greedy_decode(model: G2P, src: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
    """Phoneme ids per word (EOS excluded), argmax at every step, batched."""
    model.eval()
    B, S = src.shape
    enc = model.encoder(src, lengths)
    h, c = model.decoder.zero_state(B)
    prev = torch.full((B, 1), BOS, dtype=torch.int64)
    out = torch.zeros(B, 0, dtype=torch.int64)
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_len or max_decode_len(S)):
        logits, h, c = model.decoder(prev, h, c, enc, lengths)
        prev = logits.argmax(-1)
        out = torch.cat([out, prev], 1)
        done |= prev[:, 0] == EOS
        if bool(done.all()):
            break
    return [_until_eos(row) for row in out.tolist()]


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS)] if EOS in ids else ids


@torch.no_grad()
def beam_decode(model: G2P, src: torch.Tensor, lengths: torch.Tensor, beam: int = 3,
                max_len: int | None = None) -> list[list[int]]:
    """Beam search per word (the beam's hypotheses batched), scores = summed log-probabilities
    (no length normalisation); stops when no live hypothesis can beat the best finished one."""
    model.eval()
    results = []
    for b in range(src.shape[0]):
        results.append(_beam_one(model, src[b : b + 1], lengths[b : b + 1], beam, max_len or max_decode_len(src.shape[1])))
    return results


def _beam_one(model: G2P, src, lengths, beam: int, max_len: int) -> list[int]:
    enc = model.encoder(src, lengths)
    h, c = model.decoder.zero_state(1)
    hyps: list[list[int]] = [[]]
    scores = torch.zeros(1, dtype=torch.float64)
    prev = torch.full((1, 1), BOS, dtype=torch.int64)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_len):
        n = len(hyps)
        logits, h, c = model.decoder(prev, h, c, enc.expand(n, -1, -1), lengths.expand(n))
        logp = torch.log_softmax(logits[:, 0].double(), -1)
        total = (scores[:, None] + logp).reshape(-1)
        top = torch.topk(total, min(beam, total.numel()))
        V = logp.shape[1]
        keep_rows, keep_tok, keep_scores = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            row, tok = divmod(flat, V)
            if tok == EOS:
                finished.append((score, hyps[row]))
            else:
                keep_rows.append(row)
                keep_tok.append(tok)
                keep_scores.append(score)
        best_finished = max((s for s, _ in finished), default=float("-inf"))
        # scores only fall with more steps: a live hypothesis below the best finished one is lost
        if not keep_rows or max(keep_scores) <= best_finished:
            break
        rows = torch.tensor(keep_rows)
        hyps = [hyps[r] + [t] for r, t in zip(keep_rows, keep_tok)]
        scores = torch.tensor(keep_scores, dtype=torch.float64)
        h, c = h[:, rows], c[:, rows]
        prev = torch.tensor(keep_tok, dtype=torch.int64)[:, None]
    if not finished:  # max_len reached with no EOS: the best live hypothesis
        return hyps[int(scores.argmax())]
    return max(finished, key=lambda sh: sh[0])[1]


def load_checkpoint(path, map_location: str = "cpu") -> tuple[G2P, dict]:
    """(model in eval mode, checkpoint dict) from a file written by train_fp."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = G2P(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
