"""PWL activation tables (spec section 7): accuracy, adaptive vs uniform, and bit-exactness of the
torch op and the float (QAT) evaluation against the reference."""
import numpy as np
import pytest
import torch

from tvm_intlstm.nn import intops
from tvm_intlstm.nn.fake_quant import FloatPWL
from tvm_intlstm.quant.pwl import fit_pwl, table_error
from tvm_intlstm.reference import ops

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)

# measured maxima for the adaptive tables (docs/pwl.md); the test keeps a 1.5x margin
ADAPTIVE_MAX_ERR = {("sigmoid", 8): 0.0066, ("sigmoid", 16): 0.0015, ("sigmoid", 32): 0.00036,
                    ("tanh", 8): 0.0148, ("tanh", 16): 0.0033, ("tanh", 32): 0.00077}


@pytest.mark.parametrize("func", ["sigmoid", "tanh"])
@pytest.mark.parametrize("pieces", [4, 8, 16, 32, 64])
def test_adaptive_beats_uniform(func, pieces):
    ta = fit_pwl(func, pieces, 12, "adaptive")
    tu = fit_pwl(func, pieces, 12, "uniform")
    assert ta.pieces <= pieces and tu.pieces <= pieces
    ea, eu = table_error(ta, func), table_error(tu, func)
    assert ea < eu, (ea, eu)
    if (func, pieces) in ADAPTIVE_MAX_ERR:
        assert ea <= 1.5 * ADAPTIVE_MAX_ERR[(func, pieces)]


def test_error_decreases_with_pieces():
    for func in ("sigmoid", "tanh", "exp"):
        frac = 10 if func == "exp" else 12
        errs = [table_error(fit_pwl(func, n, frac), func) for n in (4, 8, 16, 32, 64)]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        # roughly quadratic convergence: 4x more pieces -> well over 4x less error
        assert errs[0] / errs[2] > 8


@pytest.mark.parametrize("frac", [8, 11, 13, 15])
def test_cell_tanh_tables(frac):
    t = fit_pwl("tanh", 16, frac)
    ops.validate_table(t)
    assert table_error(t, "tanh") < 0.01


@pytest.mark.parametrize("pieces", [2, 4, 16, 64])
@pytest.mark.parametrize("func", ["sigmoid", "tanh"])
def test_torch_pwl_equals_reference_on_all_inputs(func, pieces):
    t = fit_pwl(func, pieces, 12)
    ref = ops.pwl(ALL_INT16, t)
    got = intops.pwl(torch.from_numpy(ALL_INT16), intops.pack_table(t)).numpy()
    np.testing.assert_array_equal(ref, got)
    # output range: Q0.15 of the function's range
    if func == "sigmoid":
        assert ref.min() >= 0
    assert ref.max() <= 32767


def test_float_pwl_tracks_integer_table():
    """QAT evaluates the same table in float: within one output LSB of the integer result."""
    t = fit_pwl("tanh", 16, 12)
    ref = ops.pwl(ALL_INT16, t).astype(np.float64) / 2**15
    x = torch.from_numpy(ALL_INT16.astype(np.float32) / 2**12)
    got = FloatPWL(t)(x).double().numpy()
    assert np.max(np.abs(got - ref)) <= 1.5 / 2**15


def test_invalid_tables_are_rejected():
    t = fit_pwl("sigmoid", 8, 12)
    bad = ops.PWLTable(t.knots[::-1].copy(), t.base, t.slope, 12)
    with pytest.raises(ValueError):
        ops.validate_table(bad)
    big = ops.PWLTable(t.knots, t.base, (t.slope.astype(np.int64) * 0 + 2**30).astype(np.int32), 12)
    with pytest.raises(ValueError):
        ops.validate_table(big)
    with pytest.raises(ValueError):
        fit_pwl("sigmoid", 100, 12)
    with pytest.raises(ValueError):
        fit_pwl("relu", 8, 12)
