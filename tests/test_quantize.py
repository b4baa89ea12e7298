"""Model-level quantization: PTQ accuracy against the float model, eval-mode forward equal to the
reference bit for bit, QAT, and clear errors for what is not supported."""
import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm.quant import UnsupportedModelError


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        a = a.numpy() if torch.is_tensor(a) else a
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b)


class LSTMOnly(nn.Module):
    def __init__(self, I, H, **kw):
        super().__init__()
        self.lstm = nn.LSTM(I, H, **kw)

    def forward(self, x):
        out, _ = self.lstm(x)
        return out


def test_bilstm_2layer_accuracy_and_bitexact():
    """Done-when of the quantization issue: 2-layer BiLSTM within the spec's tolerance, and the
    eval forward equals the reference bit for bit."""
    torch.manual_seed(0)
    m = LSTMOnly(32, 64, num_layers=2, bidirectional=True).eval()
    calib = [torch.randn(40, 8, 32) for _ in range(4)]
    q = til.quantize(m, calib)
    x = torch.randn(50, 5, 32)
    y = q(x)
    assert y.dtype == torch.int8 and y.shape == (50, 5, 128)
    _same(y, til.reference(q)(x.numpy()))
    with torch.no_grad():
        yf = m(x)
    err = (q.dequantize(y) - yf).abs().max().item()
    print(f"2-layer BiLSTM PTQ max abs error {err:.4f} (output range {yf.abs().max():.3f})")
    assert err < 0.06  # docs/integer_spec.md section 13


@pytest.mark.parametrize("layers,bidir,batch_first,bias", [
    (1, False, False, True), (1, True, True, True), (2, False, True, False), (3, True, False, True)])
def test_lstm_variants_bitexact(layers, bidir, batch_first, bias):
    torch.manual_seed(layers)
    m = LSTMOnly(6, 10, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias).eval()
    shape = (3, 7, 6) if batch_first else (7, 3, 6)
    q = til.quantize(m, [torch.randn(*shape) * 2 for _ in range(2)])
    for T, B in ((1, 1), (9, 2), (4, 5)):
        x = torch.randn(B, T, 6) if batch_first else torch.randn(T, B, 6)
        _same(q(x), til.reference(q)(x.numpy()))


class TokenModel(nn.Module):
    """Embedding -> LSTM -> residual LSTM -> LayerNorm -> final Linear (int32 logits)."""

    def __init__(self, V=50, E=16, H=16):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.l1 = nn.LSTM(E, H, batch_first=True)
        self.l2 = nn.LSTM(H, H, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, V)

    def forward(self, ids):
        h1, _ = self.l1(self.embed(ids))
        h2, _ = self.l2(self.drop(h1))
        return self.head(self.norm(h1 + h2))


def test_token_model_residual_layernorm_bitexact():
    torch.manual_seed(1)
    m = TokenModel().eval()
    calib = [torch.randint(0, 50, (4, 12)) for _ in range(3)]
    q = til.quantize(m, calib)
    ids = torch.randint(0, 50, (3, 20))
    y = q(ids)
    assert y.dtype == torch.int32 and y.shape == (3, 20, 50)
    _same(y, til.reference(q)(ids.numpy()))
    with torch.no_grad():
        yf = m(ids)
    yd = q.dequantize(y)
    rel = ((yd - yf).norm() / yf.norm()).item()
    assert rel < 0.1, rel
    # argmax agreement of the logits
    agree = (yd.argmax(-1) == yf.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


class CatModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(4, 8)
        self.b = nn.Linear(4, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h, (h_n, c_n) = self.a(x)
        z = torch.cat([h, self.b(x)], dim=-1)
        return self.head(z), self.head(torch.cat([h_n[-1], h_n[-1]], dim=-1))


def test_cat_hidden_linear_and_final_state_bitexact():
    torch.manual_seed(2)
    m = CatModel().eval()
    q = til.quantize(m, [torch.randn(5, 2, 4) for _ in range(2)])
    x = torch.randn(6, 3, 4)
    out = q(x)
    assert [o.dtype for o in out] == [torch.int32, torch.int32]
    _same(out, til.reference(q)(x.numpy()))


class GRUModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 4)

    def forward(self, x):
        return self.rnn(x)[0]


class ReluModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_unsupported_layers_have_clear_errors():
    with pytest.raises(UnsupportedModelError, match=r"rnn.*GRU.*Supported"):
        til.quantize(GRUModel(), [torch.randn(2, 1, 4)])
    with pytest.raises(NotImplementedError, match="proj_size"):
        til.quantize(LSTMOnly(4, 8, proj_size=2), [torch.randn(2, 1, 4)])
    with pytest.raises(UnsupportedModelError, match="relu"):
        til.quantize(ReluModel(), [torch.randn(2, 4)])
    with pytest.raises(TypeError, match="quantized model"):
        til.reference(LSTMOnly(4, 8))
    with pytest.raises(ValueError, match="empty"):
        til.quantize(LSTMOnly(4, 8), [])


def test_wrong_inputs_have_clear_errors():
    q = til.quantize(LSTMOnly(4, 8), [torch.randn(3, 2, 4)])
    with pytest.raises(TypeError, match="float32"):
        q(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="3-D"):
        q(torch.randn(3, 4))
    tq = til.quantize(TokenModel(), [torch.randint(0, 50, (2, 5))])
    with pytest.raises(IndexError, match="out of range"):
        tq(torch.tensor([[1, 2, 50]]))
    with pytest.raises(TypeError, match="token ids"):
        tq(torch.rand(1, 3))


def test_qat_lowers_loss_and_eval_is_integer_exact():
    torch.manual_seed(3)
    V = 12
    m = TokenModel(V=V, E=8, H=16)
    seq = torch.randint(0, V, (16, 13))
    x, y = seq[:, :-1], seq[:, 1:]
    qat = til.prepare_qat(m, calib_data=[x[:4]])
    opt = torch.optim.Adam(qat.parameters(), lr=0.02)
    qat.train()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(qat(x).reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    qat.eval()
    out = qat(x)
    assert out.dtype == torch.int32
    _same(out, til.reference(qat)(x.numpy()))
    _same(til.convert(qat)(x), out.numpy())


def test_qat_without_calibration_observes_first_batches():
    torch.manual_seed(4)
    m = LSTMOnly(4, 8)
    qat = til.prepare_qat(m, til.QuantConfig(qat_observe_batches=2))
    qat.train()
    x = torch.randn(5, 2, 4)
    for _ in range(3):
        qat(x).sum().backward()
    qat.eval()
    assert qat(x).dtype == torch.int8


def test_pwl_pieces_config_changes_the_model():
    torch.manual_seed(5)
    m = LSTMOnly(4, 8).eval()
    calib = [torch.randn(6, 2, 4)]
    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        yf = m(x)
    errs = {}
    for n in (4, 32):
        q = til.quantize(m, calib, til.QuantConfig(pwl_pieces=n))
        errs[n] = (q.dequantize(q(x)) - yf).abs().max().item()
        _same(q(x), til.reference(q)(x.numpy()))
    assert errs[32] < errs[4]
