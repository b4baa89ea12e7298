"""The fast GEMM forms against the numpy reference: pre-packed weights and the u8 x s8 route.

On AVX2 the compiler packs constant weights (`_gemm.pack_outer`, zero padded) and, when every
weight lies in [-64, 64] (QuantConfig(weight_bits=7)), uses vpmaddubsw on u = x + 128 with the
correction -128 rowsum(W) folded into the bias (linear) or passed as `corr` (recurrent). Every
combination is checked bit for bit, on random data and on the extremes the u8 route must survive:
x = -128 / 127 everywhere, weights at +-64 (the pair sum 2 * 255 * 64 = 32640 is the closest
vpmaddubsw gets to saturation), k and row tails, accumulators at INT32 limits.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import tvm

import tvm_intlstm as til
from tvm_intlstm import kernels as K
from tvm_intlstm.quant.fixed_point import quantize_multiplier_array
from tvm_intlstm.reference import ops

from test_kernels import (TARGET, HOST_ISA, assert_lstm_equal, build, make_lstm,
                          ref_recurrence, run, run_recurrent)

# The run tests use the host target (the u8 route and packing are AVX2-only: elsewhere the same
# calls give the natural forms, still checked); the instruction checks compile for Zen3.
AVX2 = "llvm -mcpu=znver3"

# (K, O): k tails (K % 4, K % 2), channel tails (O % 16, O % 64), one exact 16-channel tile
SHAPES = [(256, 40), (33, 13), (100, 16), (7, 9), (650, 20), (5, 70)]
# (w7, packed); (False, False) is test_kernels; (True, False): the promise alone changes nothing
FORMS = [(False, True), (True, False), (True, True)]


def _weights(rng, O, Kd, w7):
    hi = 64 if w7 else 127
    W = rng.integers(-hi, hi + 1, (O, Kd)).astype(np.int8)
    if not w7:
        W[0, 0] = -128   # the spec allows it; the quantizer never produces it
    return W


def _call_linear(func, kern, x, W, b, *rest, out):
    wk, bk, _ = K.prepare_weights(func, W, b)
    return run(kern, [x, wk, bk, *rest], out)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(777)


@pytest.fixture(scope="module")
def lin_kernels():
    out = {}
    for (Kd, O) in SHAPES:
        for w7, packed in FORMS:
            for dt in ("i32", "int8", "int16"):
                f = (K.linear_i32(Kd, O, target=TARGET, w7=w7, packed=packed) if dt == "i32" else
                     K.linear_requant(Kd, O, dt, target=TARGET, w7=w7, packed=packed))
                out[(Kd, O, w7, packed, dt)] = (f, build(f))
    return out


@pytest.mark.parametrize("w7,packed", FORMS)
@pytest.mark.parametrize("Kd,O", SHAPES)
def test_linear_forms_random(lin_kernels, rng, Kd, O, w7, packed):
    W = _weights(rng, O, Kd, w7)
    b = rng.integers(-2**20, 2**20, O).astype(np.int32)
    M, s = quantize_multiplier_array(np.exp(rng.uniform(np.log(2**-20), np.log(0.5), O)))
    for n in (1, 3, 17, 40):
        x = rng.integers(-128, 128, (n, Kd)).astype(np.int8)
        f, k = lin_kernels[(Kd, O, w7, packed, "i32")]
        np.testing.assert_array_equal(_call_linear(f, k, x, W, b, out=[((n, O), "int32")]),
                                      ops.linear(x, W, b))
        for dt, bits in (("int8", 8), ("int16", 16)):
            f, k = lin_kernels[(Kd, O, w7, packed, dt)]
            got = _call_linear(f, k, x, W, b, M, s, out=[((n, O), dt)])
            np.testing.assert_array_equal(got, ops.requantize(ops.linear_acc(x, W, b), M, s, bits))


def int32_limit_case(Kd, O, hi, lo):
    """(x, W, b): x rows of 127 / -128 / 0 / alternating against weights hi / lo (mixed signs
    within row 3), and a bias placing results [0, 0] on INT32_MAX and [1, 2] on INT32_MIN."""
    W = np.full((O, Kd), hi, np.int8)
    W[1::2] = lo
    W[3, ::2] = lo
    x = np.stack([np.full(Kd, 127), np.full(Kd, -128), np.zeros(Kd),
                  np.tile([127, -128], Kd)[:Kd]]).astype(np.int8)
    acc0 = ops.linear(x, W)
    b = np.zeros(O, np.int64)
    b[0] = 2**31 - 1 - acc0[0, 0]
    b[2] = -(2**31) - acc0[1, 2]
    return x, W, b.astype(np.int32)


@pytest.mark.parametrize("w7,packed", FORMS)
def test_linear_forms_extremes(lin_kernels, w7, packed):
    """x = 127 / -128 against all-extreme weights (+-64 on the u8 route: vpmaddubsw's pair sums
    reach 2 * 255 * 64 and -2 * 255 * 64), and biases placing results on INT32_MAX / INT32_MIN."""
    Kd, O = SHAPES[4]
    hi = 64 if w7 else 127
    x, W, b = int32_limit_case(Kd, O, hi, -hi)
    ref = ops.linear(x, W, b)
    assert ref[0, 0] == 2**31 - 1 and ref[1, 2] == -(2**31)
    f, k = lin_kernels[(Kd, O, w7, packed, "i32")]
    np.testing.assert_array_equal(_call_linear(f, k, x, W, b, out=[((4, O), "int32")]), ref)


def test_u8_route_refuses_wide_weights_and_missing_bias():
    # (AVX2's u8 route; the x86_vnni family's is exact for every int8 weight: test_kernel_families)
    f = K.linear_requant(32, 8, "int8", target=AVX2, w7=True, packed=True)
    W = np.zeros((8, 32), np.int8)
    W[3, 5] = 65
    with pytest.raises(ValueError, match=r"\[-64, 64\]"):
        K.prepare_weights(f, W, np.zeros(8, np.int32))
    with pytest.raises(ValueError, match="needs a bias"):
        K.linear_i32(32, 8, bias=False, target=AVX2, w7=True, packed=True)
    with pytest.raises(ValueError, match="int8"):
        K.prepare_weights(f, W.astype(np.int16), None)


def _asm(func):
    ex = tvm.compile(tvm.IRModule({"main": func}), target=K.as_target(AVX2))
    return ex.mod.inspect_source("asm")


def test_u8_route_uses_vpmaddubsw_and_exact_route_does_not():
    f8 = K.linear_requant(64, 16, "int16", target=AVX2, packed=True)
    f7 = K.linear_requant(64, 16, "int16", target=AVX2, w7=True, packed=True)
    a8, a7 = _asm(f8), _asm(f7)
    assert "vpmaddubsw" in a7 and "vpmaddwd" in a7
    assert "vpmaddubsw" not in a8 and "vpmaddwd" in a8 and "vpmovsxbw" in a8
    assert "prefetcht0" in a7 and "prefetcht0" in a8       # packed weights stream with prefetch
    assert "vphaddd" not in a7 and "vphaddd" not in a8     # outer-product form: no horizontal sums
    assert K.kernel_convention(f7) == (True, 2) and K.kernel_convention(f8) == (False, 2)


def test_epilogue_requantize_is_a_32x32_multiply():
    """A GEMM epilogue requantizes acc + bias (or + the u8 correction) with one vpmuldq per 4
    lanes: written as a plain int32 add, LLVM widened the sum to 64 bits and emulated a 64 x 64
    multiply (vpmuludq), 2x the epilogue's instructions (`_tir.add_i32`). Baked shift, per-channel
    multipliers: the compiler's case for LSTM input projections and recurrent gates."""
    for w7 in (False, True):
        a = _asm(K.linear_requant(64, 32, "int16", target=AVX2, w7=w7, packed=True, scale=(None, 36)))
        assert "vpmuldq" in a and "vpmuludq" not in a, f"w7={w7}"
    rec = K.lstm_recurrent(16, mo=2**30, so=40, cell_frac=11, target=AVX2, w7=True, packed=True,
                           gate_scale=(None, 36))
    a = _asm(rec)
    assert "vpmuldq" in a and "vpmuludq" not in a


# --------------------------------------------------------------------------- recurrent kernel

@pytest.mark.parametrize("w7,packed", FORMS)
@pytest.mark.parametrize("H", [8, 21, 64])
def test_recurrent_forms(rng, H, w7, packed):
    hi = 64 if w7 else 127
    p = make_lstm(rng, H, 12, w_h=rng.integers(-hi, hi + 1, (4 * H, H)).astype(np.int8))
    f = K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
                         tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces, target=TARGET,
                         w7=w7, packed=packed)
    kern = build(f)
    _, _, corr = K.prepare_weights(f, p.w_h)
    assert corr.any() == K.isa.family(HOST_ISA).u8_route(w7, packed)
    for T_, B in ((5, 1), (3, 4), (2, 17)):
        gx = rng.integers(-2**15, 2**15, (T_, B, 4 * H)).astype(np.int16)
        assert_lstm_equal(run_recurrent(f, kern, p, gx), ref_recurrence(gx, p))


def test_recurrent_u8_extreme_state(rng):
    """Weights at +-64 and gates saturating so that h sits at -128 / 127 (u = 0 / 255)."""
    H = 32
    w_h = np.full((4 * H, H), 64, np.int8)
    w_h[::3] = -64
    p = make_lstm(rng, H, 8, w_h=w_h)
    f = K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
                         tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces, target=TARGET,
                         w7=True, packed=True)
    gx = np.where(rng.random((6, 3, 4 * H)) < 0.5, 32767, -32768).astype(np.int16)
    got = run_recurrent(f, build(f), p, gx)
    ref = ref_recurrence(gx, p)
    assert_lstm_equal(got, ref)
    assert ref[0].min() < -100 and ref[0].max() > 100   # the state really reaches the extremes


@pytest.mark.parametrize("pieces,mo_so", [((16, 16, 16), None), ((2, 5, 9), None),
                                          ((8, 16, 3), None), ((13, 2, 16), (2**30, 20)),
                                          ((8, 3, 8), None)])
@pytest.mark.parametrize("H,fold", [(8, False), (32, True)])
def test_recurrent_cell_pwl_all_inputs(pieces, mo_so, H, fold):
    """The cell's PWL evaluation on every int16 input of every gate (W_h = 0, so z = gx), for
    table sizes that fill the binary-search tables of the AVX2 cell partly (padding knots must
    never be counted) or exactly (16), all of at most 8 pieces (one-register tables, the search
    one level shorter), H = 8 (one block per iteration) and 32 (two interleaved
    blocks), and an output shift below 32 (the 64-bit requantize of h) as well as above; fold: the
    folded PWL form ((a x + c) >> 14, `kernels.pwl_foldable`)."""
    rng = np.random.default_rng(sum(pieces) + H)
    p0 = make_lstm(rng, H, 4, pieces=pieces, mo_so=mo_so)
    p = dataclasses.replace(p0, w_h=np.zeros_like(p0.w_h))
    if fold:
        assert all(K.pwl_foldable(t) for t in (p.sig, p.tanh, p.tanh_c))
    f = K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
                         tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces, target=TARGET,
                         w7=True, packed=True, pwl_fold=fold)
    assert int(f.attrs["intlstm.pwl_fold"]) == int(fold and K.isa.family(HOST_ISA).x86_cell)
    B = 65536 // H
    vals = np.arange(-32768, 32768).astype(np.int16).reshape(B, H)
    gx = np.stack([np.concatenate([np.roll(vals, g * 7, axis=0) for g in range(4)], axis=1),
                   np.concatenate([np.roll(vals, -g * 5, axis=1) for g in range(4)], axis=1)])
    assert_lstm_equal(run_recurrent(f, build(f), p, gx), ref_recurrence(gx, p))


# --------------------------------------------------------------------------- whole models

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        # one bidirectional layer (two recurrent kernels): stacked layers are covered by
        # test_compile's random models; each more layer adds ~15 s of kernel builds
        self.lstm = nn.LSTM(24, 40, bidirectional=True)
        self.fc = nn.Linear(80, 11)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


@pytest.mark.parametrize("weight_bits", [7, 8])
def test_compiled_model_weight_bits(weight_bits):
    """QuantConfig(weight_bits=7) keeps every GEMM weight in [-63, 63]; the compiler then takes
    the u8 route (vpmaddubsw in the library), weight_bits=8 the exact vpmaddwd route; both are
    bit-exact with the reference."""
    torch.manual_seed(3)
    net = _Net().eval()
    g = torch.Generator().manual_seed(4)
    calib = [torch.randn(12, 4, 24, generator=g) for _ in range(2)]
    q = til.quantize(net, calib, config=til.QuantConfig(weight_bits=weight_bits))
    wmax = max(int(v.abs().max()) for k, v in q.state_dict().items()
               if v.dtype == torch.int8 and v.dim() == 2)
    assert wmax <= (63 if weight_bits == 7 else 127)
    if weight_bits == 8:
        assert wmax > 64
    cm = til.compile(q, target=TARGET, example_inputs=(calib[0],), verbose=False)
    for T_, B in ((9, 1), (4, 3)):
        x = torch.randn(T_, B, 24, generator=g)
        np.testing.assert_array_equal(cm(x.numpy()), q(x).numpy())
    asm = _library_asm(cm.executable)
    if HOST_ISA == "avx2":
        assert "vpmaddwd" in asm
        assert ("vpmaddubsw" in asm) == (weight_bits == 7)
    elif HOST_ISA == "x86_vnni":   # the u8 route for any int8 weight: vpdpbusd, never vpmaddubsw
        assert "vpdpbusd" in asm and "vpmaddubsw" not in asm


def _library_asm(ex):
    mods, out = [ex.mod], []
    while mods:
        m = mods.pop()
        try:
            out.append(m.inspect_source("asm"))
        except Exception:  # noqa: BLE001 (modules without assembly: the VM bytecode)
            pass
        mods.extend(m.imports)
    return "".join(out)


def test_quant_config_weight_bits_validated():
    with pytest.raises(ValueError, match="weight_bits"):
        til.QuantConfig(weight_bits=6)


# --------------------------------------------------------------------------- requantize_hi

@pytest.mark.parametrize("w7", [False, True])
def test_requantize_hi_shifts(rng, w7):
    """shift_hi=True (every shift in [32, 62], what the compiler checks before choosing it):
    bit-exact with spec 2 on random data, on accumulators at the INT32 limits, at s = 32 and 62,
    with saturation both ways (accumulators at the INT32 limits: test_linear_forms_extremes)."""
    Kd, O = 40, 24
    f = K.linear_requant(Kd, O, "int8", target=TARGET, w7=w7, packed=True, shift_hi=True)
    f16 = K.linear_requant(Kd, O, "int16", target=TARGET, w7=w7, packed=True, shift_hi=True)
    k8, k16 = build(f), build(f16)
    hi = 64 if w7 else 127
    W = rng.integers(-hi, hi + 1, (O, Kd)).astype(np.int8)
    x = rng.integers(-128, 128, (33, Kd)).astype(np.int8)
    M = rng.integers(0, 2**31, O).astype(np.int32)
    M[:3] = [2**31 - 1, 2**30, 0]
    s = rng.integers(32, 63, O).astype(np.int32)
    s[:6] = [32, 62, 32, 62, 33, 40]
    b = rng.integers(-2**24, 2**24, O).astype(np.int32)
    for kern, func, dt, bits in ((k8, f, "int8", 8), (k16, f16, "int16", 16)):
        got = _call_linear(func, kern, x, W, b, M, s, out=[((33, O), dt)])
        ref = ops.requantize(ops.linear_acc(x, W, b), M, s, bits)
        np.testing.assert_array_equal(got, ref)
        assert got.max() == 2 ** (bits - 1) - 1 and got.min() == -(2 ** (bits - 1))


def test_recurrent_requantize_hi(rng):
    H = 24
    p = make_lstm(rng, H, 8)
    assert p.sh.min() >= 32      # realistic gate scales: shifts in the 30s-40s
    for w7 in (False, True):
        q = dataclasses.replace(p, w_h=np.clip(p.w_h, -64, 64).astype(np.int8)) if w7 else p
        f = K.lstm_recurrent(H, mo=q.mo, so=q.so, cell_frac=q.cell_frac, sig_pieces=q.sig.pieces,
                             tanh_pieces=q.tanh.pieces, tanh_c_pieces=q.tanh_c.pieces,
                             target=TARGET, w7=w7, packed=True, shift_hi=True)
        gx = rng.integers(-2**15, 2**15, (7, 3, 4 * H)).astype(np.int16)
        assert_lstm_equal(run_recurrent(f, build(f), q, gx), ref_recurrence(gx, q))


# --------------------------------------------------------------------------- baked per-tensor scales

@pytest.mark.parametrize("M,s", [(2**31 - 1, 62), (2**31 - 1, 32), (1518500250, 37), (2**30, 20),
                                 (1, 1), (0, 40), (None, 37), (None, 20), (None, 62)])
def test_linear_baked_scale(rng, M, s):
    """scale=(M, s) (per-tensor quantization: the lowering bakes it in) gives spec 2 bit for bit,
    for shifts below 32 (64-bit requantize) and in [32, 62] (requantize_hi), the largest
    multiplier, saturation both ways, 8- and 16-bit outputs; the M / s buffers are not read.
    scale=(None, s) (per-channel multipliers, one shift: the quantizer's case) reads M only."""
    Kd, O = 40, 24
    W = rng.integers(-64, 65, (O, Kd)).astype(np.int8)
    x = rng.integers(-128, 128, (33, Kd)).astype(np.int8)
    x[0], x[1] = 127, -128
    b = rng.integers(-2**24, 2**24, O).astype(np.int32)
    if M is None:   # per-channel multipliers, incl. the extremes
        Ms = rng.integers(0, 2**31, O).astype(np.int32)
        Ms[:3] = [2**31 - 1, 0, 1]
    else:
        Ms = np.full(O, M, np.int32)
    ss = np.full(O, s, np.int32)
    junk_M = Ms if M is None else np.zeros(O, np.int32)   # a baked M must not be read
    junk_s = np.full(O, 7, np.int32)                       # a baked s must not be read
    for dt, bits in (("int8", 8), ("int16", 16)):
        f = K.linear_requant(Kd, O, dt, target=TARGET, w7=True, packed=True, scale=(M, s))
        got = _call_linear(f, build(f), x, W, b, junk_M, junk_s, out=[((33, O), dt)])
        np.testing.assert_array_equal(got, ops.requantize(ops.linear_acc(x, W, b), Ms, ss, bits))


def test_recurrent_baked_gate_scale(rng):
    H = 24
    p = make_lstm(rng, H, 8)
    for M, s in ((int(p.mh[0]), int(p.sh[0])), (2**31 - 1, 25), (None, 38), (None, 25)):
        mh = p.mh if M is None else np.full(4 * H, M, np.int32)
        q = dataclasses.replace(p, mh=mh, sh=np.full(4 * H, s, np.int32),
                                w_h=np.clip(p.w_h, -64, 64).astype(np.int8))
        f = K.lstm_recurrent(H, mo=q.mo, so=q.so, cell_frac=q.cell_frac, sig_pieces=q.sig.pieces,
                             tanh_pieces=q.tanh.pieces, tanh_c_pieces=q.tanh_c.pieces,
                             target=TARGET, w7=True, packed=True, gate_scale=(M, s))
        gx = rng.integers(-2**15, 2**15, (7, 3, 4 * H)).astype(np.int16)
        got = run_recurrent(f, build(f), q, gx,      # baked M / s: these buffers are ignored
                            mh=q.mh if M is None else np.zeros(4 * H, np.int32),
                            sh=np.full(4 * H, 3, np.int32))
        assert_lstm_equal(got, ref_recurrence(gx, q))


def test_lowering_bakes_per_tensor_scales():
    """What is one value per tensor becomes an immediate (the lowering's uniform_scale): both, or
    only the shift (the quantizer's per-channel multipliers); per-channel shifts, invalid shifts and
    non-constant arrays keep the buffers."""
    from tvm import relax
    from tvm_intlstm.passes._lowering import uniform_scale
    c = lambda v: relax.const(np.asarray(v, np.int32), "int32")  # noqa: E731
    assert uniform_scale(c([5, 5, 5]), c([40, 40, 40])) == (5, 40)
    assert uniform_scale(c([5, 6, 5]), c([40, 40, 40])) == (None, 40)
    assert uniform_scale(c([5, 5]), c([40, 41])) is None
    assert uniform_scale(c([5]), c([0])) is None          # not a valid shift: keep the buffers
    assert uniform_scale(relax.Var("m", relax.TensorType([3], "int32")), c([40] * 3)) == (None, 40)
    assert uniform_scale(c([5] * 3), relax.Var("s", relax.TensorType([3], "int32"))) is None


# --------------------------------------------------------------------------- aarch64 i8mm (smmla)

def _smmla_model(xi, wp, N, O):
    """numpy model of the smmla GEMM on the packed operands: every 2x2 block of a row pair and a
    channel pair is sum_c (x rows [2, 8]) @ (w rows [2, 8])^T."""
    NP, KCN = xi.shape[0], xi.shape[1]
    out = np.zeros((NP * 2, wp.shape[0] * 2), np.int64)
    for p in range(NP):
        for q in range(wp.shape[0]):
            blk = sum(xi[p, c].astype(np.int64) @ wp[q, c].astype(np.int64).T for c in range(KCN))
            out[2 * p:2 * p + 2, 2 * q:2 * q + 2] = blk
    return out[:N, :O]


def test_i8mm_packing_and_build_checks(rng):
    """The smmla form's layouts (weights packed in channel pairs, x interleaved in row pairs, both
    zero padded) give x W^T under smmla's 2x2-block semantics for odd N, O and K; the kernel takes
    `pack_mmla` weights and only builds for targets with i8mm (bit-exactness on a core:
    tests/test_arm_models.py, under qemu)."""
    from tvm_intlstm.kernels._gemm import mmla_kp, pack_mmla
    N, O, Kd = 5, 7, 13
    W = rng.integers(-128, 128, (O, Kd)).astype(np.int8)
    x = rng.integers(-128, 128, (N, Kd)).astype(np.int8)
    wp = pack_mmla(W)
    KP = mmla_kp(Kd)
    assert wp.shape == ((O + 1) // 2, KP // 8, 2, 8)
    xs = np.zeros(((N + 1) // 2 * 2, KP), np.int8)
    xs[:N, :Kd] = x
    xi = xs.reshape(-1, 2, KP // 8, 8).transpose(0, 2, 1, 3)      # what mmla_source_macro writes
    np.testing.assert_array_equal(_smmla_model(xi, wp, N, O), ops.linear_acc(x, W))
    from tvm_intlstm.target import parse_target
    i8mm, rpi5 = parse_target("aarch64-i8mm"), parse_target("rpi5")
    f = K.linear_i32(Kd, O, True, target=i8mm, packed=True)
    assert K.kernel_convention(f) == (False, -1)
    np.testing.assert_array_equal(K.prepare_weights(f, W)[0], wp)
    assert "smmla" in _library_asm(K.build_kernel(f, i8mm).executable)
    with pytest.raises(ValueError, match="i8mm"):
        K.build_kernel(f, rpi5)
    # without i8mm, or without packing, the sdot form on natural weights
    assert K.kernel_convention(K.linear_i32(Kd, O, True, target=rpi5, packed=True)) == (False, 0)
    assert K.kernel_convention(K.linear_i32(Kd, O, True, target=i8mm)) == (False, 0)


def test_pwl_foldable():
    """The folded PWL form needs a (x - k) + 2^13 + 2^14 v inside int32 over every piece."""
    from tvm_intlstm.quant.pwl import fit_pwl
    for f, frac in (("sigmoid", 12), ("tanh", 12), ("tanh", 8), ("tanh", 15)):
        for n in (2, 8, 16, 64):
            assert K.pwl_foldable(fit_pwl(f, n, frac))
    t = K.pack_pwl(fit_pwl("tanh", 4, 12))
    assert K.pwl_foldable(t)
    big = t.copy()
    big[1, 0] = 2**20            # a base spec 7 allows, 2^14 v leaves int32
    assert not K.pwl_foldable(big)
    edge = t.copy()
    edge[1, :] = 0
    edge[2, 0] = (2**31 - 1 - 2**13) // int(edge[0, 1] - edge[0, 0])   # the largest slope that fits
    assert K.pwl_foldable(edge)
    edge[2, 0] += 1
    assert not K.pwl_foldable(edge)


def test_pwl_bin_shift():
    """The one-round piece index of the 16-lane cells (`kernels.pwl_bin_shift`): where a shift is
    given, G[b] + [x >= k of bin b] is spec 7's count for every clamped int16 x; None where a bin
    would hold two counted knots."""
    from tvm_intlstm.kernels.lstm import PWL_BINS, pwl_bin_tables
    from tvm_intlstm.quant.pwl import fit_pwl
    for f, frac, n, ok in (("sigmoid", 12, 16, True), ("tanh", 12, 16, True), ("tanh", 14, 16, True),
                           ("sigmoid", 12, 8, True), ("tanh", 15, 4, True), ("tanh", 10, 16, False),
                           ("sigmoid", 10, 16, False), ("tanh", 12, 64, False)):
        t = K.pack_pwl(fit_pwl(f, n, frac))
        s = K.pwl_bin_shift(t)
        assert (s is not None) == ok, (f, frac, n, s)
        if s is None:
            continue
        k = t[0].astype(np.int64)
        x = np.arange(k[0], k[-1] + 1)
        b = (x >> s) - (k[0] >> s)
        assert b.max() < PWL_BINS
        G, Kb, most = pwl_bin_tables(t, s)
        assert most <= 1
        np.testing.assert_array_equal(G[b] + (x > Kb[b]), (x[:, None] >= k[None, 1:-1]).sum(1))
    # a narrow table: a small shift; two knots in one bin: refused
    t = K.pack_pwl(fit_pwl("tanh", 4, 12))
    t[0] = [-100, -40, -39, 40, 100]    # bin [-40, -37]: k_1 at its first value, k_2 inside
    assert K.pwl_bin_shift(t) == 2
    t[0] = [-100, -39, -38, 40, 100]    # two knots inside one bin
    assert K.pwl_bin_shift(t) is None
