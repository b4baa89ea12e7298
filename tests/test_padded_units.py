"""LSTMs whose hidden size is not a multiple of 8 on AVX2: the lowering runs the recurrent kernel on
`kernels.recurrent_units(H)` units (zero weights for the extra ones, outputs sliced back to H), so
they get the fast cell and the threaded form. Bit for bit against the numpy reference."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import tvm_intlstm as til
from tvm_intlstm import kernels as K
from tvm_intlstm.compiler import compile as til_compile

from test_kernels import HOST_ISA, TARGET

avx2_only = pytest.mark.skipif(K.isa.family(HOST_ISA).unit_block == 1, reason="units are padded for the x86 kernels")


def test_recurrent_units():
    assert [K.recurrent_units(h, "avx2") for h in (1, 8, 9, 13, 16, 650)] == [8, 8, 16, 16, 16, 656]
    assert [K.recurrent_units(h, i) for h in (13, 650) for i in ("generic", "neon_dotprod")] == [13, 13, 650, 650]


def test_pad_units_layout():
    H, U = 3, 8
    a = np.arange(4 * H * 2).reshape(4 * H, 2)
    z = K.pad_units(a, H, U, axis=0)
    assert z.shape == (4 * U, 2)
    for g in range(4):
        np.testing.assert_array_equal(z[g * U:g * U + H], a[g * H:(g + 1) * H])
        assert not z[g * U + H:(g + 1) * U].any()
    e = K.pad_units(np.arange(4 * H), H, U, fill="edge")
    np.testing.assert_array_equal(e.reshape(4, U)[:, H:], np.repeat([[2], [5], [8], [11]], U - H, 1))
    # the gate axis may be any axis
    np.testing.assert_array_equal(K.pad_units(a.T, H, U, axis=1), z.T)
    with pytest.raises(ValueError, match="gate channels"):
        K.pad_units(np.zeros(10), 3, 8)


class TwoLayer(nn.Module):
    """2-layer LSTM with 13 units, the sequence and the last layer's final state both used."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 13, num_layers=2)
        self.head = nn.Linear(13, 5)
        self.state = nn.Linear(13, 4)

    def forward(self, x):
        h, (h_n, _) = self.lstm(x)
        return self.head(h), self.state(h_n[-1])


@avx2_only
@pytest.mark.parametrize("bits", [7])   # (8-bit padded layers: test_compile's random models, H = 9, 12, 20)
def test_padded_lstm_bitexact(bits):
    torch.manual_seed(11 + bits)
    m = TwoLayer().eval()
    q = til.quantize(m, [torch.randn(9, 3, 6) * 1.5 for _ in range(2)], til.QuantConfig(weight_bits=bits))
    cm = til_compile(q, TARGET, (torch.randn(5, 1, 6),), verbose=False)
    ref = til.reference(q)
    for T, B in ((1, 1), (6, 2), (7, 5)):
        x = (torch.randn(T, B, 6) * 1.5).numpy()
        got, want = cm(x), ref(x)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@avx2_only
def test_lowering_pads_and_slices():
    from tvm_intlstm.frontend.importer import import_quantized
    from tvm_intlstm.passes import LowerBoundary, LowerLinear, LowerLSTM
    from tvm_intlstm.target import parse_target
    torch.manual_seed(5)
    q = til.quantize(TwoLayer().eval(), [torch.randn(5, 2, 6)])
    mod = import_quantized(q, (torch.randn(5, 2, 6),))
    tgt = parse_target(TARGET)
    low = LowerLSTM(tgt, None, True)(LowerLinear(tgt)(LowerBoundary(tgt)(mod)))   # threads=True
    rec = [f for gv, f in low.functions_items() if gv.name_hint.startswith("lstm_recurrent")]
    assert len(rec) == 2 and all(K.gate_interleaved(f) for f in rec)   # the threaded form ...
    assert all(int(f.attrs["intlstm.pwl_fold"]) for f in rec)           # (and the folded PWL form)
    main = low["main"].script(show_meta=False)
    calls = [ln for ln in main.splitlines() if "R.call_tir(lstm_recurrent" in ln]
    assert len(calls) == 2
    assert all(re.search(r'R.Tensor\(\(\w+, \w+, 16\), dtype="int8"\)', ln) for ln in calls)  # of 16 units
    assert len(re.findall(r"R.strided_slice\(\w+, \(2,\), \(0,\), \(13,\)", main)) == 2  # y back to 13
