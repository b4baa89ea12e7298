"""Requantization and fixed-point constants against exact rational arithmetic (spec sections 2, 9)."""
from fractions import Fraction
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tvm_intlstm.nn import intops
from tvm_intlstm.quant import fixed_point as fp
from tvm_intlstm.reference import ops

I32 = st.integers(-(2**31), 2**31 - 1)
M_ST = st.integers(2**30, 2**31 - 1)
S_ST = st.integers(1, 62)


def exact_requant(acc, M, s, bits):
    v = Fraction(acc * M, 2**s)
    r = math.floor(v + Fraction(1, 2))  # round half up
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return min(max(r, lo), hi)


@settings(max_examples=400, deadline=None)
@given(acc=I32, M=M_ST, s=S_ST, bits=st.sampled_from([8, 16, 32]))
def test_requantize_matches_rational(acc, M, s, bits):
    want = exact_requant(acc, M, s, bits)
    got = int(ops.requantize(np.array([acc], np.int32), M, s, bits)[0])
    assert got == want
    got_t = int(intops.requantize(torch.tensor([acc], dtype=torch.int32), M, s, bits)[0])
    assert got_t == want


def test_requantize_extremes_and_ties():
    accs = np.array([-(2**31), 2**31 - 1, 0, 1, -1, 3, -3, 5, -5, 2**30, -(2**30)], np.int64)
    for M in (2**30, 2**31 - 1, 1518500250):
        for s in (1, 2, 31, 32, 45, 62):
            for bits in (8, 16, 32):
                got = ops.requantize(accs, M, s, bits)
                got_t = intops.requantize(torch.from_numpy(accs), M, s, bits).numpy()
                want = [exact_requant(int(a), M, s, bits) for a in accs]
                assert got.tolist() == want
                assert got_t.tolist() == want
    # ties: M = 2^30, s = 31 -> acc / 2, exact halves round toward +inf
    t = ops.requantize(np.array([1, -1, 3, -3], np.int32), 2**30, 31, 16)
    assert t.tolist() == [1, 0, 2, -1]
    # saturation
    assert ops.requantize(np.array([2**31 - 1], np.int32), 2**31 - 1, 1, 8).tolist() == [127]
    assert ops.requantize(np.array([-(2**31)], np.int32), 2**31 - 1, 1, 16).tolist() == [-32768]


def test_requantize_per_channel_broadcast():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**31), 2**31, size=(7, 5), dtype=np.int64)
    M = rng.integers(2**30, 2**31, size=5)
    s = rng.integers(1, 63, size=5)
    got = ops.requantize(acc, M, s, 16)
    got_t = intops.requantize(torch.from_numpy(acc), torch.from_numpy(M), torch.from_numpy(s), 16).numpy()
    for i in range(7):
        for j in range(5):
            assert got[i, j] == exact_requant(int(acc[i, j]), int(M[j]), int(s[j]), 16)
    np.testing.assert_array_equal(got, got_t)


@settings(max_examples=300, deadline=None)
@given(r=st.floats(min_value=1e-12, max_value=2.0**29, allow_nan=False))
def test_quantize_multiplier_accuracy(r):
    M, s = fp.quantize_multiplier(r)
    assert 1 <= s <= 62
    if s < 62:
        assert 2**30 <= M <= 2**31 - 1
    approx = M / 2**s
    # relative error of a 31-bit mantissa (or absolute 2^-63 for tiny ratios)
    assert abs(approx - r) <= max(r * 2**-30, 2**-63)


def test_quantize_multiplier_rejects_bad_scales():
    with pytest.raises(fp.ScaleError):
        fp.quantize_multiplier(2.0**31)
    with pytest.raises(fp.ScaleError):
        fp.quantize_multiplier(float("nan"))
    with pytest.raises(fp.ScaleError):
        fp.quantize_multiplier(-1.0)
    assert fp.quantize_multiplier(0.0) == (0, 31)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(-128, 127), b=st.integers(-128, 127),
       ra=st.floats(1e-3, 4.0), rb=st.floats(1e-3, 4.0))
def test_residual_add_close_to_rational(a, b, ra, rb):
    Ma, Mb, s = fp.quantize_multiplier_pair(ra, rb)
    assert max(Ma, Mb) <= 2**31 - 1
    got = int(ops.residual_add(np.array([a], np.int8), np.array([b], np.int8), Ma, Mb, s)[0])
    exact = exact_add = Fraction(a * Ma + b * Mb, 2**s)
    assert got == min(max(math.floor(exact + Fraction(1, 2)), -128), 127)
    # and the multipliers represent the real ratios closely
    want = a * ra + b * rb
    assert abs(float(exact_add) - want) <= 1e-6 * (abs(a) + abs(b)) + 1e-9
    got_t = int(intops.residual_add(torch.tensor([a], dtype=torch.int8), torch.tensor([b], dtype=torch.int8),
                                    Ma, Mb, s)[0])
    assert got_t == got


def test_multiplier15():
    for r in (1e-6, 0.001, 0.37, 1.0, 3.5, 1000.0):
        M, s = fp.quantize_multiplier15(r)
        assert 2**14 <= M < 2**15
        assert abs(M / 2**s - r) <= r * 2**-14


def test_power_of_two_frac():
    assert fp.power_of_two_frac(3.0) == 13
    assert fp.power_of_two_frac(4.0) == 12
    assert fp.power_of_two_frac(0.5) == 15
    assert fp.power_of_two_frac(1e9) == 0


def test_boundary_quantization_float32_exact():
    x = np.array([0.0, 0.5, -0.5, 1.49999, 1000.0, -1000.0, 0.25, -0.25, 127.4], np.float32)
    q = ops.quantize_input(x, 1.0)
    assert q.tolist() == [0, 1, 0, 1, 127, -128, 0, 0, 127]
    qt = torch.ops.intlstm.quantize_input(torch.from_numpy(x), 1.0).numpy()
    np.testing.assert_array_equal(q, qt)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10000).astype(np.float32) * 3
    np.testing.assert_array_equal(ops.quantize_input(x, 0.0213),
                                  torch.ops.intlstm.quantize_input(torch.from_numpy(x), 0.0213).numpy())
    with pytest.raises(TypeError):
        ops.quantize_input(x.astype(np.float64), 0.1)
