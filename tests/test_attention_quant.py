"""Quantized attention layers (issue 18 item 3): PTQ of a small encoder + attention model, the integer
model equal to the numpy reference bit for bit, within a stated tolerance of the float model, the
"lengths" input kind, QAT, the model file, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.nn import BahdanauAttention, LuongAttention
from tvm_intlstm.quant.graph import UnsupportedModelError

V, E, H, DQ = 20, 8, 12, 6


def make_attention(kind):
    if kind == "dot":
        return LuongAttention(H, H)
    if kind == "general":
        return LuongAttention(DQ, H, "general")
    return BahdanauAttention(DQ, H, 10)


class EncoderAttention(nn.Module):
    """embedding -> LSTM encoder -> attention with a query from another input -> linear."""

    def __init__(self, kind):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.enc = nn.LSTM(E, H, batch_first=True)
        self.attn = make_attention(kind)
        self.query = nn.Linear(DQ, self.attn.query_size)
        self.head = nn.Linear(H, 5)

    def forward(self, ids, query, lengths):
        enc, _ = self.enc(self.emb(ids))
        ctx, w = self.attn(self.query(query), enc, lengths)
        return self.head(ctx), w


def batch(B, S, gen, lengths=None):
    ids = torch.randint(0, V, (B, S), generator=gen)
    q = torch.randn(B, DQ, generator=gen)
    if lengths is None:
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
    return ids, q, torch.as_tensor(lengths, dtype=torch.int64)


def quantized(kind, seed=0):
    torch.manual_seed(seed)
    model = EncoderAttention(kind).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    calib = [batch(4, 9, gen) for _ in range(8)]
    return model, til.quantize(model, calib)


# PTQ against float: logits within 5 % of the float logits' max |value| (measured: at most 2.2 %,
# 0.0064 of 0.29), attention weights within 0.01 absolute (measured: at most 0.0011)
LOGIT_TOLERANCE = 0.05
WEIGHT_TOLERANCE = 0.01


@pytest.mark.parametrize("kind", ["dot", "general", "additive"])
def test_ptq_matches_reference_and_float(kind):
    model, qm = quantized(kind)
    assert qm.input_kinds == ["ids", "float", "lengths"]
    gen = torch.Generator().manual_seed(7)
    for B, S, lengths in ((3, 9, [0, 1, 9]), (1, 5, [5]), (4, 7, None)):
        ids, q, ln = batch(B, S, gen, lengths)
        logits, w = qm(ids, q, ln)
        assert logits.dtype == torch.int32 and w.dtype == torch.int16 and w.shape == (B, S)
        ref = til.reference(qm)(ids.numpy(), q.numpy(), ln.numpy())
        np.testing.assert_array_equal(ref[0], logits.numpy())
        np.testing.assert_array_equal(ref[1], w.numpy())
        f_logits, f_w = model(ids, q, ln)
        d_logits, d_w = qm.dequantize((logits, w))
        err = float((d_logits - f_logits.detach()).abs().max() / f_logits.detach().abs().max())
        werr = float((d_w - f_w.detach()).abs().max())
        print(f"{kind} B={B} S={S}: max |logit error| / max |logit| {err:.4f}, max |weight error| {werr:.4f}")
        assert err < LOGIT_TOLERANCE and werr < WEIGHT_TOLERANCE
        assert torch.all(w[ln == 0] == 0)


def test_query_steps_and_no_lengths():
    """A [B, Q, Dq] query and an attention call without lengths (the unmasked softmax op)."""
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = LuongAttention(DQ, DQ)

        def forward(self, q, keys):
            return self.attn(q, keys)

    torch.manual_seed(3)
    model = Multi().eval()
    calib = [(torch.randn(2, 3, DQ), torch.randn(2, 5, DQ)) for _ in range(4)]
    qm = til.quantize(model, calib)
    q, k = torch.randn(2, 3, DQ), torch.randn(2, 6, DQ)
    ctx, w = qm(q, k)
    assert ctx.shape == (2, 3, DQ) and w.shape == (2, 3, 6)
    ref = til.reference(qm)(q.numpy(), k.numpy())
    np.testing.assert_array_equal(ref[0], ctx.numpy())
    np.testing.assert_array_equal(ref[1], w.numpy())


@pytest.mark.parametrize("kind", ["general", "additive"])
def test_qat_trains_and_converts(kind):
    torch.manual_seed(0)
    model = EncoderAttention(kind)
    gen = torch.Generator().manual_seed(1)
    data = [batch(4, 9, gen) for _ in range(4)]
    qat = til.prepare_qat(model, calib_data=data)
    qat.train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    logits, w = qat(*data[0])
    loss = logits.pow(2).mean() + w.sum()
    loss.backward()
    grads = [p.grad for n, p in qat.named_parameters() if "attn" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    qm = qat.convert()
    ids, q, ln = data[1]
    out = qm(ids, q, ln)
    ref = til.reference(qm)(ids.numpy(), q.numpy(), ln.numpy())
    np.testing.assert_array_equal(ref[0], out[0].numpy())


def test_model_file_round_trip(tmp_path):
    _, qm = quantized("additive")
    path = til.save_quantized(qm, tmp_path / "att.qpt")
    qm2 = til.load_quantized(path)
    ids, q, ln = batch(2, 6, torch.Generator().manual_seed(2), [3, 0])
    for a, b in zip(qm(ids, q, ln), qm2(ids, q, ln)):
        assert torch.equal(a, b)


def test_errors():
    _, qm = quantized("dot")
    ids, q, ln = batch(2, 6, torch.Generator().manual_seed(2), [3, 1])
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        qm(ids, q, torch.tensor([3, -1]))
    with pytest.raises(TypeError, match="int32/int64"):
        qm(ids, q, ln.float())

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = LuongAttention(DQ, DQ)

        def forward(self, q, keys, lengths):
            return self.attn(q, keys, lengths.view(-1))[0]

    with pytest.raises(UnsupportedModelError, match="lengths must be a model input"):
        til.quantize(Computed(), [(torch.randn(2, DQ), torch.randn(2, 4, DQ), torch.tensor([3, 4]))])
