"""Attention (issue 18 item 3, docs/integer_spec.md section 11): the float modules, and the integer
score and masked-softmax ops, torch against the numpy reference bit for bit, on random and extreme
inputs (all-equal scores, one huge score, a source of length 1, lengths 0 and S, extreme int8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tvm_intlstm.nn as tnn
from tvm_intlstm.nn import intops
from tvm_intlstm.opdefs import reference_ops as R
from tvm_intlstm.quant import fixed_point as fp
from tvm_intlstm.quant.pwl import fit_pwl
from tvm_intlstm.reference import ops

rng = np.random.default_rng(18)
EXP = intops.pack_table(fit_pwl("exp", 16, 10))
TANH = intops.pack_table(fit_pwl("tanh", 16, 12))


def _i(lo, hi, shape, dtype):
    return rng.integers(lo, hi, size=shape).astype(dtype)


def _same(torch_op, ref_op, *args):
    got = torch_op(*(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args))
    want = ref_op(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))
    assert got.dtype == getattr(torch, want.dtype.name)
    np.testing.assert_array_equal(got.numpy(), want)
    return want


# ---------------------------------------------------------------------------------------------
# float modules


@pytest.mark.parametrize("make", [lambda: tnn.LuongAttention(6, 6), lambda: tnn.LuongAttention(4, 6, "general"),
                                  lambda: tnn.BahdanauAttention(4, 6, 5)])
def test_float_modules_mask_and_shapes(make):
    torch.manual_seed(0)
    att = make()
    B, S = 3, 7
    keys = torch.randn(B, S, 6)
    q = torch.randn(B, att.query_size)
    lengths = torch.tensor([0, 1, S])
    ctx, w = att(q, keys, lengths)
    assert ctx.shape == (B, 6) and w.shape == (B, S)
    assert torch.all(w[0] == 0) and torch.all(ctx[0] == 0)            # empty source
    assert torch.allclose(w[1], torch.eye(S)[0]) and torch.allclose(ctx[1], keys[1, 0])   # length 1
    full_ctx, full_w = att(q, keys)                                      # None = every position
    assert torch.allclose(full_w[2], w[2]) and torch.allclose(full_ctx[2], ctx[2], atol=1e-6)
    # padded positions do not matter
    keys2 = keys.clone()
    keys2[1, 1:] = 100.0
    assert torch.allclose(att(q, keys2, lengths)[0][1], ctx[1])
    ctx3, w3 = att(q[:, None].repeat(1, 2, 1), keys, lengths)             # Q queries
    assert ctx3.shape == (B, 2, 6) and torch.allclose(w3[:, 1], w)


def test_float_module_errors():
    with pytest.raises(ValueError, match="query_size == key_size"):
        tnn.LuongAttention(3, 4)
    with pytest.raises(ValueError, match="'dot' or 'general'"):
        tnn.LuongAttention(3, 3, "concat")
    att = tnn.LuongAttention(3, 3)
    with pytest.raises(ValueError, match=">= 0"):
        att(torch.randn(2, 3), torch.randn(2, 4, 3), torch.tensor([1, -1]))
    with pytest.raises(TypeError, match="int32/int64"):
        att(torch.randn(2, 3), torch.randn(2, 4, 3), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"keys must be \[B=2, S, 3\]"):
        att(torch.randn(2, 3), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------
# integer ops: torch == reference


@pytest.mark.parametrize("B,Q,S,D", [(1, 1, 1, 1), (3, 2, 7, 13), (2, 1, 33, 64)])
def test_attention_dot(B, Q, S, D):
    q, k = _i(-128, 128, (B, Q, D), np.int8), _i(-128, 128, (B, S, D), np.int8)
    z = _same(intops.attention_dot, R.attention_dot, q, k)
    np.testing.assert_array_equal(z, np.einsum("bid,bsd->bis", q.astype(np.int64), k.astype(np.int64)))
    # extremes: -128 everywhere gives D * 2^14
    z = _same(intops.attention_dot, R.attention_dot, np.full((B, Q, D), -128, np.int8), np.full((B, S, D), -128, np.int8))
    assert np.all(z == D * 2**14)


@pytest.mark.parametrize("B,Q,S,A", [(1, 1, 1, 1), (3, 2, 7, 13), (2, 1, 9, 40)])
def test_additive_scores(B, Q, S, A):
    qx, kx = _i(-2**15, 2**15, (B, Q, A), np.int16), _i(-2**15, 2**15, (B, S, A), np.int16)
    v = _i(-127, 128, (A,), np.int8)
    z = _same(intops.additive_scores, R.additive_scores, qx, kx, v, TANH)
    # extremes: saturated sums give tanh ~ +-1 -> t8 = +-127 / -128
    big = np.full((B, Q, A), 32767, np.int16)
    z = _same(intops.additive_scores, R.additive_scores, big, big[:, :1].repeat(S, 1)[:, :S], v, TANH)
    t8 = ops.sat(ops.rshift_round(ops.pwl(np.int16(32767), fit_pwl("tanh", 16, 12)), 8), 8)
    assert t8 == 127 and np.all(z == 127 * v.astype(np.int64).sum())


def _smax_consts(s_z=0.003):
    return fp.quantize_multiplier(s_z / 2**-10)


@pytest.mark.parametrize("shape", [(3, 7), (3, 2, 9), (2, 4, 1)])
@pytest.mark.parametrize("len_dtype", [np.int64, np.int32])
def test_masked_softmax_random(shape, len_dtype):
    mz, sz = _smax_consts()
    S = shape[-1]
    z = _i(-5000, 5000, shape, np.int32)
    lengths = np.array([0, S, 1][:shape[0]] + [0] * max(0, shape[0] - 3), len_dtype)
    p = _same(intops.masked_softmax, R.masked_softmax, z, lengths, mz, sz, EXP)
    for b in range(shape[0]):
        n = int(lengths[b])
        assert np.all(p[b, ..., n:] == 0)
        if n:   # the valid part is the unmasked softmax of the valid scores
            np.testing.assert_array_equal(p[b, ..., :n], ops.softmax_op(z[b, ..., :n], mz, sz, EXP.numpy()))
    # lengths S everywhere = the unmasked op, bit for bit
    full = np.full(shape[0], S, len_dtype)
    np.testing.assert_array_equal(_same(intops.masked_softmax, R.masked_softmax, z, full, mz, sz, EXP),
                                  intops.softmax(torch.from_numpy(z), mz, sz, EXP).numpy())


def test_masked_softmax_extremes():
    mz, sz = _smax_consts()
    B, S = 4, 6
    lengths = np.array([S, 3, 1, 0], np.int64)
    cases = {
        "all equal": np.full((B, 2, S), 77, np.int32),
        "one huge": np.where(np.arange(S) == 1, 2**31 - 1, -2**31).astype(np.int32)[None, None].repeat(B, 0).repeat(2, 1),
        "int32 range": _i(-2**31, 2**31, (B, 2, S), np.int32),
        "huge in padding": np.where(np.arange(S) >= 3, 2**31 - 1, 0).astype(np.int32)[None, None].repeat(B, 0).repeat(2, 1),
    }
    for name, z in cases.items():
        p = _same(intops.masked_softmax, R.masked_softmax, z, lengths, mz, sz, EXP).astype(np.int64)
        assert np.all(p[3] == 0), name
        assert np.all(p[2, :, 0] == 32767) and np.all(p[2, :, 1:] == 0), name   # length 1: all weight on s = 0
        sums = p[:3].sum(-1)
        assert np.all(np.abs(sums - 2**15) <= S), (name, sums)
    p = R.masked_softmax(cases["all equal"], lengths, mz, sz, EXP.numpy()).astype(np.int64)
    assert np.all(p[0] == p[0, 0, 0]) and abs(int(p[0, 0, 0]) - 2**15 // S) <= 1
    p = R.masked_softmax(cases["one huge"], lengths, mz, sz, EXP.numpy())
    assert np.all(p[:2, :, 1] == 32767) and np.all(p[:2, :, 0] == 0)   # (row 2 has length 1)
    # padding holding the largest scores changes nothing in the rows where it is padding
    p = R.masked_softmax(cases["huge in padding"], lengths, mz, sz, EXP.numpy()).astype(np.int64)
    assert np.all(p[1, :, :3] == p[1, 0, 0]) and abs(int(p[1, 0, 0]) - 2**15 // 3) <= 1
    # out-of-range lengths are clamped inside the op (spec 11.2)
    np.testing.assert_array_equal(R.masked_softmax(cases["int32 range"], np.array([-5, 99, 0, S]), mz, sz, EXP.numpy()),
                                  R.masked_softmax(cases["int32 range"], np.array([0, S, 0, S]), mz, sz, EXP.numpy()))


def test_reference_rejects_bad_operands():
    with pytest.raises(TypeError, match="int8"):
        R.attention_dot(np.zeros((1, 1, 2), np.int16), np.zeros((1, 1, 2), np.int8))
    with pytest.raises(ValueError, match=r"lengths \[B\]"):
        R.masked_softmax(np.zeros((2, 3), np.int32), np.zeros(3, np.int64), 1 << 30, 20, EXP.numpy())
    with pytest.raises(TypeError, match="int32/int64"):
        R.masked_softmax(np.zeros((2, 3), np.int32), np.zeros(2, np.float32), 1 << 30, 20, EXP.numpy())
