"""The fused QAT LSTM (QuantConfig(qat_lstm="fused"), tvm_intlstm/nn/qat_fast.py) against the Python
loop (qat_lstm="loop"): same forward values bit for bit, same losses and gradients to float
rounding over a few training steps, and the trained model still evaluates to the exact integer model."""
import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.nn import qat_fast
from tvm_intlstm.nn.modules import QuantLSTM

pytestmark = pytest.mark.skipif(not qat_fast.available(), reason="fused QAT LSTM extension could not be built")


class Tagger(nn.Module):
    def __init__(self, V=40, E=12, H=20, layers=2, bidir=True):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lstm = nn.LSTM(E, H, num_layers=layers, batch_first=True, bidirectional=bidir)
        self.head = nn.Linear(H * (2 if bidir else 1), V)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


def _train(mode, bidir, steps=4):
    torch.manual_seed(0)
    V = 40
    m = Tagger(V=V, bidir=bidir)
    seq = torch.randint(0, V, (6, 18))
    x, y = seq[:, :-1], seq[:, 1:]
    qat = til.prepare_qat(m, til.QuantConfig(qat_lstm=mode), calib_data=[x[:3]])
    qat.train()
    # SGD: Adam's per-element normalisation magnifies the float-rounding differences of tiny
    # gradients into weight differences, after which a weight fake quantization tie at a row's
    # largest weight (straight-through factor 1/2 instead of 1) can differ between the two runs
    opt = torch.optim.SGD(qat.parameters(), lr=0.5, momentum=0.9)
    losses, grads, outs = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        out = qat(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, V), y.reshape(-1))
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in qat.parameters()])
        outs.append(out.detach().clone())
        opt.step()
    return qat, x, losses, grads, outs


def _close_grads(ga, gb):
    for a, b in zip(ga, gb):
        scale = max(a.abs().max().item(), 1e-12)
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("bidir", [False, True])
def test_fused_training_matches_loop(bidir):
    _, _, la, ga, oa = _train("loop", bidir)
    qat, x, lb, gb, ob = _train("fused", bidir)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    assert lb[-1] < lb[0]
    for s in range(len(la)):
        torch.testing.assert_close(oa[s], ob[s], rtol=0, atol=0)  # forward values: bit for bit
        _close_grads(ga[s], gb[s])
    # what was trained is what is deployed: eval is the integer model, equal to the reference
    qat.eval()
    out = qat(x)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), til.reference(qat)(x.numpy()))


@pytest.mark.parametrize("H,layers,bias,batch_first", [(5, 3, False, False), (20, 2, True, True)])
def test_fused_lstm_module_values_and_grads(H, layers, bias, batch_first):
    """QuantLSTM alone: odd sizes (H < 8 takes the float64 product, H = 20 a partial vector chunk),
    no bias, 3 layers with dropout, and gradients through the final states h_n and c_n."""
    torch.manual_seed(H)
    lstm = nn.LSTM(7, H, num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=True,
                   dropout=0.25 if layers > 2 else 0.0)
    x = torch.randn(4, 9, 7) if batch_first else torch.randn(9, 4, 7)
    res = {}
    for mode in ("loop", "fused"):
        q = QuantLSTM(lstm, til.QuantConfig(qat_lstm=mode))
        q.mode = "observe"
        q.eval()
        with torch.no_grad():
            q(x * 1.5)
        q.mode = "qat"
        q.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # same dropout masks
        out, (h_n, c_n) = q(xi)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + (h_n ** 2).sum() + 3 * c_n.sum()
        lstm.zero_grad()
        loss.backward()
        res[mode] = ([out.detach(), h_n.detach(), c_n.detach()],
                     [xi.grad] + [p.grad.clone() for p in lstm.parameters()])
    for a, b in zip(res["loop"][0], res["fused"][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _close_grads(res["loop"][1], res["fused"][1])


def test_fused_threads_give_the_same_values():
    torch.manual_seed(3)
    lstm = nn.LSTM(6, 24, num_layers=2)
    q = QuantLSTM(lstm, til.QuantConfig())
    x = torch.randn(10, 8, 6)
    q.mode = "observe"
    with torch.no_grad():
        q(x)
    q.mode = "qat"
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                outs.append(q(x)[0])
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_qat_lstm_config_is_checked():
    with pytest.raises(ValueError, match="qat_lstm"):
        til.QuantConfig(qat_lstm="jit")
