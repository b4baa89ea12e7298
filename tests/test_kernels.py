"""TIR kernels (tvm_intlstm.kernels) against the numpy reference (tvm_intlstm.reference.ops).

Every comparison is bit-exact. Each kernel is built once per module (fixtures) and then run on
random inputs of several shapes (symbolic leading dims: one build, many shapes) and on extremes:
INT32_MIN/MAX accumulators, rounding ties, saturation, int8 -128, all-max weights, every int16
PWL input. Kernels with an AVX2 micro-kernel are tested in both forms on an AVX2 host.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_intlstm import kernels as K
from tvm_intlstm.quant.fixed_point import (quantize_multiplier, quantize_multiplier15,
                                           quantize_multiplier_array, quantize_multiplier_pair)
from tvm_intlstm.quant.pwl import fit_pwl
from tvm_intlstm.reference import ops

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TARGET = K.host_target()
HOST_ISA = K.resolve_isa(TARGET)
ISAS = sorted({"generic", HOST_ISA})


def nd(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def run(kernel, inputs, outs):
    """Call a built kernel on numpy inputs; `outs` = [(shape, dtype)]; returns numpy outputs."""
    out_t = [nd(np.zeros(shape, dtype)) for shape, dtype in outs]
    kernel(*[nd(a) for a in inputs], *out_t)
    res = [o.numpy() for o in out_t]
    return res[0] if len(res) == 1 else res


def build(func):
    return K.build_kernel(func, TARGET)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(20240607)


# --------------------------------------------------------------------------- API / plumbing

def test_target_parsing_and_isa():
    t = K.as_target("llvm -mcpu=znver3")
    assert str(t.attrs["mcpu"]) == "znver3"
    t = K.as_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod")
    assert "aarch64" in str(t.attrs["mtriple"])
    assert K.resolve_isa(t) == "neon_dotprod"
    assert K.resolve_isa("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72") == "generic"
    assert K.resolve_isa({"kind": "llvm", "mcpu": "znver3"}) == "avx2"
    assert K.resolve_isa("llvm") == "generic"
    assert K.resolve_isa(None) == "generic"
    with pytest.raises(ValueError):
        K.resolve_isa(isa="sse9")


def test_build_refuses_avx2_kernel_without_avx2():
    f = K.linear_i32(16, 8, isa="avx2")
    with pytest.raises(ValueError, match="isa"):
        K.build_kernel(f, "llvm -mcpu=x86-64")


def test_generators_validate_constants():
    with pytest.raises(ValueError):
        K.rescale_8(8, 2**31, 3)
    with pytest.raises(ValueError):
        K.rescale_8(8, 2**30, 63)
    with pytest.raises(ValueError):
        K.layer_norm(16, 2**15, 20)
    with pytest.raises(ValueError):
        K.lstm_recurrent(8, mo=1, so=0, cell_frac=11)
    with pytest.raises(ValueError):
        K.lstm_recurrent(8, mo=1, so=20, cell_frac=16)
    with pytest.raises(ValueError):
        K.quantize_input(8, 0.0)


def _shape(func, i):
    """Shape of the i-th buffer parameter (TVM 0.27 tirx: params are buffers with a BufferType)."""
    return list(func.params[i].ty.shape)


def test_prim_funcs_have_symbolic_leading_dims():
    f = K.lstm_recurrent(8, mo=2**30, so=40, cell_frac=11)
    T_, B, G = _shape(f, 0)
    assert isinstance(T_, tvm.ir.expr.Var) and isinstance(B, tvm.ir.expr.Var)
    assert not T_.same_as(B)
    assert int(G) == 32
    assert [str(v) for v in _shape(f, len(f.params) - 3)[:2]] == [str(T_), str(B)]  # y [T, B, H]
    f = K.linear_requant(24, 40, "int16")
    N, Kd = _shape(f, 0)
    assert isinstance(N, tvm.ir.expr.Var) and int(Kd) == 24


# --------------------------------------------------------------------------- quantize_input

QSCALE = np.float32(0.0123)


@pytest.fixture(scope="module")
def quant_k():
    return build(K.quantize_input(37, QSCALE))


def test_quantize_input_random(quant_k, rng):
    for n in (1, 3, 64):
        x = (rng.standard_normal((n, 37)) * 1.5).astype(np.float32)
        got = run(quant_k, [x], [((n, 37), "int8")])
        np.testing.assert_array_equal(got, ops.quantize_input(x, QSCALE))


def test_quantize_input_ties_and_extremes(quant_k):
    s = QSCALE
    # exact float32 ties k + 0.5 (x = (k + 0.5) * s rounded to float32 may not be an exact tie:
    # either way the reference defines the result), values next to ties, saturation, specials
    ks = np.arange(-140, 141, dtype=np.float32)
    cand = np.concatenate([
        (ks + np.float32(0.5)) * s,
        np.nextafter((ks + np.float32(0.5)) * s, np.float32(np.inf)),
        np.nextafter((ks + np.float32(0.5)) * s, np.float32(-np.inf)),
        ks * s,
        np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, np.inf, -np.inf,
                  127.49 * s, 127.5 * s, -128.5 * s, -128.49 * s, -0.5 * s, 0.5 * s], np.float32),
    ]).astype(np.float32)
    cand = np.resize(cand, (len(cand) // 37 + 1) * 37).reshape(-1, 37)
    got = run(quant_k, [cand], [(cand.shape, "int8")])
    ref = ops.quantize_input(cand, s)
    np.testing.assert_array_equal(got, ref)
    # the tie rule itself: q/s landing exactly on k + 0.5 rounds toward +inf
    q = np.float32(8.0)  # power of two scale: x / s exact
    k8 = build(K.quantize_input(8, q))
    x = np.array([[-4.0, 4.0, -12.0, 12.0, -1020.0, 1020.0, -1028.0, 1016.0]], np.float32)
    got = run(k8, [x], [((1, 8), "int8")])
    np.testing.assert_array_equal(got, [[0, 1, -1, 2, -127, 127, -128, 127]])
    np.testing.assert_array_equal(got, ops.quantize_input(x, q))


def test_quantize_input_uses_ieee_division(quant_k):
    ll = quant_k.module.inspect_source("ll")
    assert "fdiv" in ll
    assert "fdiv fast" not in ll and "fdiv reassoc" not in ll and "fdiv arcp" not in ll


# --------------------------------------------------------------------------- embedding

@pytest.fixture(scope="module", params=["int32", "int64"])
def emb(request, rng):
    table = rng.integers(-128, 128, (50, 24)).astype(np.int8)
    table[0] = -128
    table[49] = 127
    return request.param, table, build(K.embedding(50, 24, request.param))


def test_embedding(emb, rng):
    id_dtype, table, k = emb
    for n in (1, 7, 33):
        ids = rng.integers(0, 50, n).astype(id_dtype)
        ids[0] = 0
        ids[-1] = 49
        got = run(k, [ids, table], [((n, 24), "int8")])
        np.testing.assert_array_equal(got, ops.embedding(ids, table))


def test_embedding_clamps_bad_ids_in_kernel(emb):
    """Out-of-range ids are an error (the runtime wrapper validates); the kernel's clamp is a
    memory-safety guard: it must read rows 0 / V-1, never outside the table."""
    id_dtype, table, k = emb
    big = np.iinfo(id_dtype).max
    ids = np.array([-1, 50, big, -big - 1, 3], dtype=id_dtype)
    got = run(k, [ids, table], [((5, 24), "int8")])
    np.testing.assert_array_equal(got, table[[0, 49, 49, 0, 3]])
    with pytest.raises(IndexError):
        ops.embedding(ids, table)


# --------------------------------------------------------------------------- linear layers

# (K, O): full 8-row tiles / tails in both k and o (K % 16 != 0: the masked vector k tail;
# K < 8: the scalar one)
LIN_SHAPES = [(256, 40), (23, 13), (650, 20), (7, 9)]


@pytest.fixture(scope="module", params=ISAS)
def lin_isa(request):
    isa = request.param
    kern = {}
    for (Kd, O) in LIN_SHAPES:
        kern[("i32", Kd, O)] = build(K.linear_i32(Kd, O, isa=isa))
        kern[("int8", Kd, O)] = build(K.linear_requant(Kd, O, "int8", isa=isa))
        kern[("int16", Kd, O)] = build(K.linear_requant(Kd, O, "int16", isa=isa))
    return isa, kern


def _rand_requant(rng, O, lo=2**-20, hi=0.5):
    return quantize_multiplier_array(np.exp(rng.uniform(np.log(lo), np.log(hi), O)))


@pytest.mark.parametrize("Kd,O", LIN_SHAPES)
def test_linear_random(lin_isa, rng, Kd, O):
    _, kern = lin_isa
    W = rng.integers(-127, 128, (O, Kd)).astype(np.int8)
    b = rng.integers(-2**20, 2**20, O).astype(np.int32)
    M, s = _rand_requant(rng, O)
    for n in (1, 5, 17, 40):   # one build, several row counts (crossing the 16-row blocks)
        x = rng.integers(-128, 128, (n, Kd)).astype(np.int8)
        acc = run(kern[("i32", Kd, O)], [x, W, b], [((n, O), "int32")])
        np.testing.assert_array_equal(acc, ops.linear(x, W, b))
        for dt, bits in (("int8", 8), ("int16", 16)):
            got = run(kern[(dt, Kd, O)], [x, W, b, M, s], [((n, O), dt)])
            np.testing.assert_array_equal(got, ops.requantize(ops.linear_acc(x, W, b), M, s, bits))


def test_linear_int32_extremes(lin_isa):
    """All-max weights with x = +-127 / -128 and biases chosen to land exactly on INT32_MAX and
    INT32_MIN; requantized with extreme multipliers and shifts (saturation both ways)."""
    _, kern = lin_isa
    Kd, O = LIN_SHAPES[0]
    W = np.full((O, Kd), 127, np.int8)
    W[1::2] = -127
    x = np.stack([np.full(Kd, 127), np.full(Kd, -128), np.full(Kd, -128), np.zeros(Kd)]).astype(np.int8)
    dot_max = Kd * 127 * 127
    dot_neg = -Kd * 128 * 127
    b = np.zeros(O, np.int32)
    b[0] = INT32_MAX - dot_max          # row 0 . x0 = INT32_MAX
    b[2] = INT32_MIN - dot_neg          # row 2 . x1 = INT32_MIN
    acc_ref = ops.linear(x, W, b)
    assert acc_ref[0, 0] == INT32_MAX and acc_ref[1, 2] == INT32_MIN
    acc = run(kern[("i32", Kd, O)], [x, W, b], [((4, O), "int32")])
    np.testing.assert_array_equal(acc, acc_ref)
    M = np.full(O, INT32_MAX, np.int32)
    s = np.array(([1, 31, 62, 16] * O)[:O], np.int32)
    M[3] = 0
    M[4] = 2**30
    for dt, bits in (("int8", 8), ("int16", 16)):
        got = run(kern[(dt, Kd, O)], [x, W, b, M, s], [((4, O), dt)])
        ref = ops.requantize(acc_ref, M, s, bits)
        np.testing.assert_array_equal(got, ref)
        assert got.max() == 2 ** (bits - 1) - 1 and got.min() == -(2 ** (bits - 1))


def test_linear_without_bias(rng):
    k32 = build(K.linear_i32(40, 16, bias=False, target=TARGET))
    kq = build(K.linear_requant(40, 16, "int8", bias=False, target=TARGET))
    x = rng.integers(-128, 128, (9, 40)).astype(np.int8)
    W = rng.integers(-127, 128, (16, 40)).astype(np.int8)
    M, s = _rand_requant(rng, 16)
    np.testing.assert_array_equal(run(k32, [x, W], [((9, 16), "int32")]), ops.linear(x, W))
    np.testing.assert_array_equal(run(kq, [x, W, M, s], [((9, 16), "int8")]),
                                  ops.linear(x, W, None, M, s))


@pytest.fixture(scope="module")
def requant_probe():
    """linear_requant with K = 1 and x = 0: the accumulator is the bias, so any int32 value
    (including INT32_MIN / INT32_MAX) goes through requantize with any (M, s)."""
    return {bits: build(K.linear_requant(1, 8, f"int{bits}", target=TARGET)) for bits in (8, 16)}


@settings(max_examples=150, deadline=None)
@given(acc=st.lists(st.one_of(st.integers(INT32_MIN, INT32_MAX),
                              st.sampled_from([INT32_MIN, INT32_MAX, 0, -1, 1, 3, -3])),
                    min_size=8, max_size=8),
       M=st.integers(0, INT32_MAX), s=st.integers(1, 62), bits=st.sampled_from([8, 16]))
def test_requantize_property(requant_probe, acc, M, s, bits):
    b = np.array(acc, np.int32)
    Mv = np.full(8, M, np.int32)
    sv = np.full(8, s, np.int32)
    got = run(requant_probe[bits], [np.zeros((1, 1), np.int8), np.ones((8, 1), np.int8), b, Mv, sv],
              [((1, 8), f"int{bits}")])
    np.testing.assert_array_equal(got[0], ops.requantize(b, Mv, sv, bits))


def test_requantize_ties_round_half_up(requant_probe):
    # M = 2^30, s = 31: acc / 2 exactly; odd accumulators are ties -> toward +infinity
    b = np.array([3, -3, 1, -1, 5, -5, INT32_MAX, INT32_MIN], np.int32)
    M = np.full(8, 2**30, np.int32)
    s = np.full(8, 31, np.int32)
    got = run(requant_probe[16], [np.zeros((1, 1), np.int8), np.ones((8, 1), np.int8), b, M, s],
              [((1, 8), "int16")])[0]
    np.testing.assert_array_equal(got, [2, -1, 1, 0, 3, -2, 32767, -32768])
    np.testing.assert_array_equal(got, ops.requantize(b, M, s, 16))


# --------------------------------------------------------------------------- residual / rescale

def test_rescale_8(rng):
    M, s = quantize_multiplier(0.37)
    k = build(K.rescale_8(24, M, s))
    for n in (1, 13):
        x = rng.integers(-128, 128, (n, 24)).astype(np.int8)
        x[0, :4] = [-128, 127, 0, -1]
        np.testing.assert_array_equal(run(k, [x], [((n, 24), "int8")]), ops.requantize(x, M, s, 8))
    # a large ratio saturates; ties at M = 2^30, s = 31 (x / 2)
    M2, s2 = quantize_multiplier(3.9)
    k2 = build(K.rescale_8(8, M2, s2))
    x = np.array([[-128, 127, 33, -33, 32, -32, 1, 0]], np.int8)
    np.testing.assert_array_equal(run(k2, [x], [((1, 8), "int8")]), ops.requantize(x, M2, s2, 8))
    k3 = build(K.rescale_8(8, 2**30, 31))
    x = np.array([[-128, 127, 3, -3, 1, -1, 5, -5]], np.int8)
    got = run(k3, [x], [((1, 8), "int8")])
    np.testing.assert_array_equal(got, [[-64, 64, 2, -1, 1, 0, 3, -2]])


def test_residual_add(rng):
    Ma, Mb, s = quantize_multiplier_pair(0.8, 0.45)
    k = build(K.residual_add(40, Ma, Mb, s))
    for n in (1, 6):
        a = rng.integers(-128, 128, (n, 40)).astype(np.int8)
        b = rng.integers(-128, 128, (n, 40)).astype(np.int8)
        a[0, :4], b[0, :4] = [-128, 127, -128, 127], [-128, 127, 127, -128]
        got = run(k, [a, b], [((n, 40), "int8")])
        np.testing.assert_array_equal(got, ops.residual_add(a, b, Ma, Mb, s))
    # saturation: y = a + b at unit scales
    Ma, Mb, s = 2**30, 2**30, 30
    k2 = build(K.residual_add(8, Ma, Mb, s))
    a = np.array([[127, -128, 100, -100, 1, -1, 0, 64]], np.int8)
    b = np.array([[127, -128, 100, -100, -1, 1, 0, 63]], np.int8)
    got = run(k2, [a, b], [((1, 8), "int8")])
    np.testing.assert_array_equal(got, [[127, -128, 127, -128, 0, 0, 0, 127]])
    np.testing.assert_array_equal(got, ops.residual_add(a, b, Ma, Mb, s))
    # ties: Ma = Mb = 2^29, s = 30 gives (a + b) / 2, rounded half up
    k3 = build(K.residual_add(8, 2**29, 2**29, 30))
    a = np.array([[1, -1, 3, -3, 127, -128, 0, -128]], np.int8)
    b = np.array([[0, 0, 0, 0, 0, -1, -1, -128]], np.int8)
    got = run(k3, [a, b], [((1, 8), "int8")])
    np.testing.assert_array_equal(got, [[1, 0, 2, -1, 64, -64, 0, -128]])
    np.testing.assert_array_equal(got, ops.residual_add(a, b, 2**29, 2**29, 30))


# --------------------------------------------------------------------------- PWL

ALL_INT16 = np.arange(-32768, 32768).astype(np.int16)


@pytest.mark.parametrize("pieces", [4, 16, 64])
def test_pwl_exhaustive(pieces):
    tables = [fit_pwl("sigmoid", pieces, 12), fit_pwl("tanh", pieces, 12),
              fit_pwl("exp", pieces, 10), fit_pwl("tanh", pieces, 12, "uniform")]
    kern = {}
    for t in tables:
        if t.pieces not in kern:
            kern[t.pieces] = build(K.pwl_activation(t.pieces))
        got = run(kern[t.pieces], [ALL_INT16, K.pack_pwl(t)], [((65536,), "int16")])
        np.testing.assert_array_equal(got, ops.pwl(ALL_INT16, t), err_msg=t.name)
    # a tail (N not a multiple of the vector width) and a hand-made table with a negative slope,
    # saturating bases and the widest legal slope
    t = ops.PWLTable(np.array([-30000, -2, 0, 5], np.int16), np.array([2**20, -2**20, 77], np.int32),
                     np.array([-((2**31 - 1 - 2**13) // 29998), 2**30 - 2**13, -3], np.int32), 12)
    ops.validate_table(t)
    k3 = build(K.pwl_activation(3))
    got = run(k3, [ALL_INT16[::997], K.pack_pwl(t)], [((len(ALL_INT16[::997]),), "int16")])
    np.testing.assert_array_equal(got, ops.pwl(ALL_INT16[::997], t))


# --------------------------------------------------------------------------- LSTM

def make_lstm(rng, H, I, cell_frac=11, pieces=(16, 16, 16), mo_so=None, w_h=None):
    G = 4 * H
    mx, sx = quantize_multiplier_array(rng.uniform(0.01, 0.1, G))
    mh, sh = quantize_multiplier_array(rng.uniform(0.01, 0.1, G))
    mo, so = mo_so if mo_so is not None else quantize_multiplier(127 / 2**30)
    return ops.LSTMDirectionParams(
        w_x=rng.integers(-127, 128, (G, I)).astype(np.int8),
        w_h=(rng.integers(-127, 128, (G, H)).astype(np.int8) if w_h is None else w_h),
        bias=rng.integers(-2**16, 2**16, G).astype(np.int32),
        mx=mx, sx=sx, mh=mh, sh=sh, mo=int(mo), so=int(so), cell_frac=cell_frac,
        sig=fit_pwl("sigmoid", pieces[0], 12), tanh=fit_pwl("tanh", pieces[1], 12),
        tanh_c=fit_pwl("tanh", pieces[2], cell_frac))


def lstm_kernel(p, reverse=False, init_state=False, isa=None):
    return build(K.lstm_recurrent(
        p.hidden, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
        tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces, reverse=reverse,
        init_state=init_state, target=TARGET, isa=isa))


def run_lstm(kern, p, gx, h0=None, c0=None):
    T_, B, _ = gx.shape
    H = p.hidden
    corr = np.zeros(4 * H, np.int32)   # the u8 correction input, not read by these kernels
    ins = [gx, p.w_h, p.mh, p.sh, corr, K.pack_pwl(p.sig), K.pack_pwl(p.tanh), K.pack_pwl(p.tanh_c)]
    if h0 is not None:
        ins += [h0, c0]
    return run(kern, ins, [((T_, B, H), "int8"), ((B, H), "int8"), ((B, H), "int16")])


def run_recurrent(func, kern, p, gx, h0=None, c0=None, mh=None, sh=None):
    """Run a recurrent kernel built from `func` on natural-order gx / p (any form: its weights
    prepared by `kernels.prepare_weights`, gx, mh, sh put in its `gate_order`); mh / sh override
    p's (e.g. buffers a baked scale must not read)."""
    T_, B, _ = gx.shape
    H = p.hidden
    wk, _, corr = K.prepare_weights(func, p.w_h)
    mh, sh = (p.mh if mh is None else mh), (p.sh if sh is None else sh)
    ins = [K.gate_order(func, gx), wk, K.gate_order(func, mh), K.gate_order(func, sh), corr]
    ins += [K.pack_pwl(t) for t in (p.sig, p.tanh, p.tanh_c)]
    if h0 is not None:
        ins += [h0, c0]
    return run(kern, ins, [((T_, B, H), "int8"), ((B, H), "int8"), ((B, H), "int16")])


def ref_recurrence(gx, p, reverse=False, h0=None, c0=None):
    """spec 8 from given input gates (which may hold any int16, e.g. extremes)."""
    T_, B, _ = gx.shape
    H = p.hidden
    h = np.zeros((B, H), np.int8) if h0 is None else h0
    c = np.zeros((B, H), np.int16) if c0 is None else c0
    y = np.zeros((T_, B, H), np.int8)
    for t in (range(T_ - 1, -1, -1) if reverse else range(T_)):
        h, c = ops.lstm_cell(gx[t], h, c, p)
        y[t] = h
    return y, h, c


def assert_lstm_equal(got, ref):
    for g, r, name in zip(got, ref, ("y", "h_T", "c_T")):
        np.testing.assert_array_equal(g, r, err_msg=name)


@pytest.fixture(scope="module")
def lstm_fwd(rng):
    p = make_lstm(rng, 32, 24)
    gx_k = build(K.linear_requant(24, 128, "int16", target=TARGET))
    return p, gx_k, lstm_kernel(p)


def test_lstm_end_to_end_several_shapes_one_build(lstm_fwd, rng):
    """gx = linear_requant over all T*B rows, then the recurrent kernel; several (T, B)."""
    p, gx_k, rk = lstm_fwd
    for T_, B in [(1, 1), (7, 1), (3, 5), (2, 17), (0, 3)]:
        x = rng.integers(-128, 128, (T_, B, 24)).astype(np.int8)
        gx = run(gx_k, [x.reshape(T_ * B, 24), p.w_x, p.bias, p.mx, p.sx],
                 [((T_ * B, 128), "int16")]).reshape(T_, B, 128)
        np.testing.assert_array_equal(gx, ops.lstm_gates_x(x, p))
        got = run_lstm(rk, p, gx)
        assert_lstm_equal(got, ops.lstm_direction(x, p))


def test_lstm_extremes(lstm_fwd, rng):
    """Input gates over the whole int16 range (add_sat_16 saturation both ways), all-max
    recurrent weights driving |W_h h| to its maximum, huge Mh saturating gh."""
    p0, _, rk = lstm_fwd
    H = p0.hidden
    w_h = np.full((4 * H, H), 127, np.int8)
    w_h[::3] = -127
    mh = np.full(4 * H, INT32_MAX, np.int32)
    sh = rng.integers(1, 40, 4 * H).astype(np.int32)
    p = ops.LSTMDirectionParams(**{**p0.__dict__, "w_h": w_h, "mh": mh, "sh": sh})
    for T_, B in [(6, 2), (3, 9)]:
        gx = rng.integers(-32768, 32768, (T_, B, 4 * H)).astype(np.int16)
        gx[0, 0, :8] = [-32768, 32767, -32768, 32767, 0, -1, 1, 0]
        assert_lstm_equal(run_lstm(rk, p, gx), ref_recurrence(gx, p))


def test_lstm_every_gate_input(lstm_fwd):
    """Every int16 value reaches every gate's PWL (W_h = 0, so z = gx)."""
    p0, _, rk = lstm_fwd
    p = ops.LSTMDirectionParams(**{**p0.__dict__, "w_h": np.zeros_like(p0.w_h)})
    H = p.hidden
    B = 65536 // H
    vals = ALL_INT16.reshape(B, H)
    gx = np.stack([np.concatenate([np.roll(vals, g * 7, axis=0) for g in range(4)], axis=1),
                   np.concatenate([np.roll(vals, -g * 5, axis=1) for g in range(4)], axis=1)])
    assert_lstm_equal(run_lstm(rk, p, gx), ref_recurrence(gx, p))


@pytest.fixture(scope="module")
def bilstm(rng):
    """Forward and reverse directions sharing s_h and F_c (spec 8, bidirectional), initial state."""
    fwd = make_lstm(rng, 16, 20)
    bwd = make_lstm(rng, 16, 20, mo_so=(fwd.mo, fwd.so))
    gx_f = build(K.linear_requant(20, 64, "int16", target=TARGET))
    return (fwd, bwd, gx_f, lstm_kernel(fwd, init_state=True),
            lstm_kernel(bwd, reverse=True, init_state=True))


def test_bilstm_reverse_several_shapes(bilstm, rng):
    fwd, bwd, gx_k, kf, kb = bilstm
    for T_, B in [(5, 1), (4, 3), (1, 2)]:
        x = rng.integers(-128, 128, (T_, B, 20)).astype(np.int8)
        h0 = rng.integers(-128, 128, (2, B, 16)).astype(np.int8)
        c0 = rng.integers(-32768, 32768, (2, B, 16)).astype(np.int16)
        h0[0, 0, 0], c0[0, 0, :2] = -128, [-32768, 32767]
        outs = []
        for p, kern, d in ((fwd, kf, 0), (bwd, kb, 1)):
            gx = run(gx_k, [x.reshape(T_ * B, 20), p.w_x, p.bias, p.mx, p.sx],
                     [((T_ * B, 64), "int16")]).reshape(T_, B, 64)
            got = run_lstm(kern, p, gx, h0[d], c0[d])
            assert_lstm_equal(got, ops.lstm_direction(x, p, reverse=bool(d), h0=h0[d], c0=c0[d]))
            outs.append(got[0])
        # the reverse direction really runs backwards: y[T-1] of bwd depends on x[T-1] only
        y = np.concatenate(outs, axis=-1)
        ref = np.concatenate([ops.lstm_direction(x, fwd, h0=h0[0], c0=c0[0])[0],
                              ops.lstm_direction(x, bwd, True, h0[1], c0[1])[0]], axis=-1)
        np.testing.assert_array_equal(y, ref)
    x = rng.integers(-128, 128, (3, 1, 20)).astype(np.int8)
    a = ops.lstm_direction(x, bwd, reverse=True)[0]
    b = ops.lstm_direction(x, bwd, reverse=False)[0]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("cell_frac,pieces", [(15, (4, 64, 16)), (8, (64, 4, 64))])
def test_lstm_cell_frac_and_piece_counts(rng, cell_frac, pieces):
    p = make_lstm(rng, 24, 8, cell_frac=cell_frac, pieces=pieces)
    assert (p.sig.pieces, p.tanh.pieces) == pieces[:2]
    rk = lstm_kernel(p, init_state=True)
    for T_, B in [(9, 1), (2, 4)]:
        gx = rng.integers(-20000, 20000, (T_, B, 96)).astype(np.int16)
        h0 = rng.integers(-128, 128, (B, 24)).astype(np.int8)
        c0 = rng.integers(-32768, 32768, (B, 24)).astype(np.int16)
        got = run_lstm(rk, p, gx, h0, c0)
        assert_lstm_equal(got, ref_recurrence(gx, p, h0=h0, c0=c0))
        assert np.abs(got[2]).max() > 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("H", [13, 23, 650])
def test_lstm_odd_hidden(rng, isa, H):
    """4H = 52, 92 (tail rows), H not a multiple of the vpmaddwd chunk (k tail: scalar for
    H < 16, one masked vector chunk otherwise)."""
    p = make_lstm(rng, H, 5, cell_frac=12)
    rk = lstm_kernel(p, reverse=True, isa=isa)
    for T_, B in [(4, 3), (1, 1)]:
        gx = rng.integers(-32768, 32768, (T_, B, 4 * H)).astype(np.int16)
        assert_lstm_equal(run_lstm(rk, p, gx), ref_recurrence(gx, p, reverse=True))


# --------------------------------------------------------------------------- layer norm

@pytest.mark.parametrize("D", [1, 24, 512])
def test_layer_norm(rng, D):
    Ml, sl = quantize_multiplier15(0.004)
    k = build(K.layer_norm(D, Ml, sl))
    gamma = rng.integers(-32767, 32768, D).astype(np.int16)
    beta = rng.integers(-2**30, 2**30, D).astype(np.int64)
    for n in (1, 9):
        x = rng.integers(-128, 128, (n, D)).astype(np.int8)
        if n > 1:
            x[1] = 7                 # constant row: n = 0, y = beta requantized
            x[2, ::2] = -128         # extreme spread
            x[2, 1::2] = 127
            x[3] = -128
            x[4, 0] = 127            # one outlier
            x[4, 1:] = -128
        got = run(k, [x, gamma, beta], [((n, D), "int8")])
        np.testing.assert_array_equal(got, ops.layer_norm(x, gamma, beta, Ml, sl))
    # rounding ties: Ml = 2^14, sl = 15 gives y = (n gamma + beta) / 2; with gamma = 1 and
    # beta = -n + odd (n of this row, spec 10) every output is a tie and none saturates
    k_tie = build(K.layer_norm(D, 2**14, 15))
    x = rng.integers(-128, 128, (1, D)).astype(np.int8)
    xi = x.astype(np.int64)
    d = D * xi - xi.sum()
    r = max(1, int(ops.isqrt(np.array((d * d).sum() // D))))
    n_k = (2 * d * 4096 + r) // (2 * r)
    g1 = np.ones(D, np.int16)
    b1 = (-n_k[0] + 2 * rng.integers(-100, 100, D) + 1).astype(np.int64)
    got = run(k_tie, [x, g1, b1], [((1, D), "int8")])
    ref = ops.layer_norm(x, g1, b1, 2**14, 15)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(ref[0], (n_k[0] + b1 + 1) // 2)  # all ties, rounded up
    # gamma at its extremes with a strong multiplier: saturation
    Ml2, sl2 = quantize_multiplier15(0.3)
    k2 = build(K.layer_norm(D, Ml2, sl2))
    x = rng.integers(-128, 128, (4, D)).astype(np.int8)
    g2 = np.where(np.arange(D) % 2 == 0, 32767, -32767).astype(np.int16)
    got = run(k2, [x, g2, beta], [((4, D), "int8")])
    np.testing.assert_array_equal(got, ops.layer_norm(x, g2, beta, Ml2, sl2))


def test_isqrt_rounds_match_reference(rng):
    """Variance values around perfect squares exercise every isqrt round (spec 10)."""
    Ml, sl = quantize_multiplier15(0.01)
    k = build(K.layer_norm(2, Ml, sl))
    x = np.array([[a, b] for a in range(-128, 128, 5) for b in (-128, -1, 0, 1, 127)], np.int8)
    gamma = np.array([12345, -32767], np.int16)
    beta = np.array([0, 99], np.int64)
    got = run(k, [x, gamma, beta], [(x.shape, "int8")])
    np.testing.assert_array_equal(got, ops.layer_norm(x, gamma, beta, Ml, sl))
    v = rng.integers(0, 2**62, 64, dtype=np.int64)
    r = ops.isqrt(v)
    assert np.all(r * r <= v) and np.all((r + 1) * (r + 1) > v)


# --------------------------------------------------------------------------- softmax / attention

@pytest.fixture(scope="module")
def softmax_k():
    t = fit_pwl("exp", 16, 10)
    Mz, sz = quantize_multiplier(2**10 / 3000.0)
    return t, Mz, sz, build(K.softmax(t.pieces, Mz, sz)), build(K.softmax(t.pieces, Mz, sz, length=5))


def test_softmax(softmax_k, rng):
    t, Mz, sz, k, k5 = softmax_k
    tab = K.pack_pwl(t)
    for R, L in [(1, 1), (3, 5), (4, 37), (2, 300)]:   # one build, several lengths
        z = rng.integers(-30000, 30000, (R, L)).astype(np.int32)
        got = run(k, [z, tab], [((R, L), "int16")])
        np.testing.assert_array_equal(got, ops.softmax(z, Mz, sz, t))
    # INT32 extremes: z - m reaches -(2^32 - 1), clamped to -2^31; equal maxima; ties in p
    z = np.array([[INT32_MIN, INT32_MAX, 0, -1, INT32_MAX],
                  [INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN],
                  [5, 5, 5, 5, 5],
                  [0, -3000, -6000, -9000, 3000]], np.int32)
    for kern in (k, k5):
        got = run(kern, [z, tab], [(z.shape, "int16")])
        np.testing.assert_array_equal(got, ops.softmax(z, Mz, sz, t))
    assert run(k, [z[1:2], tab], [((1, 5), "int16")]).tolist() == [[6554] * 5]
    # Mz = 2^30, sz = 31: d = (z - m) / 2, odd differences are ties (toward +inf)
    k_tie = build(K.softmax(t.pieces, 2**30, 31))
    z = rng.integers(-4000, 4000, (6, 9)).astype(np.int32)
    z[:, 0] = 4001
    got = run(k_tie, [z, tab], [(z.shape, "int16")])
    np.testing.assert_array_equal(got, ops.softmax(z, 2**30, 31, t))


def test_attention_context(rng):
    Mc, sc = quantize_multiplier(0.8 / 2**15)
    k = build(K.attention_context(24, Mc, sc))
    t = fit_pwl("exp", 16, 10)
    Mz, sz = quantize_multiplier(2**10 / 3000.0)
    for B, Q, L in [(1, 1, 1), (2, 3, 7), (3, 1, 64)]:
        pr = ops.softmax(rng.integers(-20000, 20000, (B, Q, L)).astype(np.int32), Mz, sz, t)
        v = rng.integers(-128, 128, (B, L, 24)).astype(np.int8)
        got = run(k, [pr, v], [((B, Q, 24), "int8")])
        np.testing.assert_array_equal(got, ops.attention_context(pr, v[:, None], Mc, sc))
    # all probability on one key with v = -128 / 127, and arbitrary int16 p (still int32-exact)
    pr = np.zeros((1, 2, 4), np.int16)
    pr[0, 0, 2] = 32767
    pr[0, 1] = [-32768, 32767, -32768, 32767]
    v = np.full((1, 4, 24), -128, np.int8)
    v[0, 2, ::2] = 127
    got = run(k, [pr, v], [((1, 2, 24), "int8")])
    np.testing.assert_array_equal(got, ops.attention_context(pr, v[:, None], Mc, sc))


# --------------------------------------------------------------------------- aarch64 (qemu)

def _with_root_block(func):
    """Relax-side convention of passes._lowering: a root block around the loop nest."""
    from tvm import s_tir

    block = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, block)).without_attr("global_symbol")


def test_aarch64_dotprod_kernels_under_qemu(rng, tmp_path):
    """The sdot micro-kernel (aarch64 + dotprod): gx projection, recurrent LSTM and final linear
    in one Relax module with symbolic T and B, cross-compiled, run under qemu (cortex-a76),
    bit-exact against the reference for two (T, B) from one build."""
    from tvm import relax
    from tvm.script import relax as R

    from tvm_intlstm.runtime.emulate import run_emulated
    from tvm_intlstm.target import export_library

    tgt = K.as_target("llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod")
    assert K.resolve_isa(tgt) == "neon_dotprod"
    H, I, O = 24, 40, 13
    G = 4 * H
    p = make_lstm(rng, H, I)
    funcs = [K.linear_requant(I, G, "int16", target=tgt),
             K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, target=tgt),
             K.linear_i32(I, O, target=tgt)]
    assert all(str(f.attrs["intlstm.isa"]) == "neon_dotprod" for f in funcs)
    bb = relax.BlockBuilder()
    gvx, gvr, gv32 = (bb.add_func(_with_root_block(f), n) for f, n in zip(funcs, ("gx", "rec", "lin")))
    Tn, Bn = tvm.tirx.Var("T", "int64"), tvm.tirx.Var("B", "int64")
    x = relax.Var("x", R.Tensor((Tn, Bn, I), "int8"))
    consts = {"wx": p.w_x, "b": p.bias, "mx": p.mx, "sx": p.sx, "wh": p.w_h, "mh": p.mh,
              "sh": p.sh, "corr": np.zeros(G, np.int32), "sig": K.pack_pwl(p.sig), "tanh": K.pack_pwl(p.tanh),
              "tanhc": K.pack_pwl(p.tanh_c),
              "w13": rng.integers(-127, 128, (O, I)).astype(np.int8),
              "b13": rng.integers(-2**20, 2**20, O).astype(np.int32)}
    v = {n: relax.Var(n, R.Tensor(a.shape, str(a.dtype))) for n, a in consts.items()}
    with bb.function("main", [x] + list(v.values())):
        with bb.dataflow():
            x2 = bb.emit(relax.op.reshape(x, [Tn * Bn, I]))
            gx = bb.emit(relax.call_tir(gvx, [x2, v["wx"], v["b"], v["mx"], v["sx"]],
                                        relax.TensorType([Tn * Bn, G], "int16")))
            gx3 = bb.emit(relax.op.reshape(gx, [Tn, Bn, G]))
            out = bb.emit(relax.call_tir(
                gvr, [gx3, v["wh"], v["mh"], v["sh"], v["corr"], v["sig"], v["tanh"], v["tanhc"]],
                [relax.TensorType([Tn, Bn, H], "int8"), relax.TensorType([Bn, H], "int8"),
                 relax.TensorType([Bn, H], "int16")]))
            l32 = bb.emit(relax.call_tir(gv32, [x2, v["w13"], v["b13"]],
                                         relax.TensorType([Tn * Bn, O], "int32")))
            res = bb.emit_output(relax.Tuple([out[0], out[1], out[2], l32]))
        bb.emit_func_output(res)
    ex = tvm.compile(bb.get(), target=tgt)
    lib = export_library(ex, tmp_path / "kernels_a64.so", tgt)
    for T_, B in [(5, 2), (1, 17)]:
        xn = rng.integers(-128, 128, (T_, B, I)).astype(np.int8)
        xn[0, 0, :3] = [-128, 127, -128]
        out = run_emulated(lib, [xn] + list(consts.values()), cpu="cortex-a76", verbose=False)
        assert_lstm_equal(out[:3], ops.lstm_direction(xn, p))
        np.testing.assert_array_equal(out[3], ops.linear(xn.reshape(-1, I), consts["w13"],
                                                         consts["b13"]))


def test_bench_script_small():
    """benchmarks/bench_kernels.py runs end to end (bit-exact check included) on a small LSTM."""
    import importlib.util

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", script)
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)

    res = bench_kernels.bench(H=16, I=8, T=3, B=2, runs=2, inner=1, target=TARGET, verbose=False)
    assert res["exact"] is True
    assert res["isa"] == HOST_ISA
    assert res["total_us"] > 0 and res["torch_fp32_us"] > 0 and res["recurrent_us"] > 0
    # the command line: two workers, the serial form alongside (checked bit for bit too), 8 pieces
    out = subprocess.run([sys.executable, str(script), "--hidden", "16",
                          "--input", "8", "--steps", "3", "--runs", "2", "--threads", "2", "--w7",
                          "--pieces", "8", "--compare-serial"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "TVM_NUM_THREADS=2" in out.stdout and "bit-exact vs reference: True" in out.stdout
    assert ("default (threaded) / serial form" in out.stdout) == K.isa.family(HOST_ISA).threaded
