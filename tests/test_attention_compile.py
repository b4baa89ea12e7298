"""Compiled attention (issue 18 item 3) on the host target: the compiled module equals the numpy
reference bit for bit for Luong dot / general and Bahdanau models (batch 1 and 3, random shapes and
masks, lengths 0, 1 and S, one build for every shape), and the attention kernels equal the
reference on extreme inputs (all-equal scores, one huge score, the int32 range, extreme int8)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import tvm_intlstm as til
from tvm_intlstm import kernels as K
from tvm_intlstm.kernels import attention as KA
from tvm_intlstm.nn import BahdanauAttention, LuongAttention
from tvm_intlstm.quant import fixed_point as fp
from tvm_intlstm.quant.pwl import fit_pwl
from tvm_intlstm.reference import ops

V, E, H, DQ = 17, 8, 12, 6
rng = np.random.default_rng(181)


class DecoderStep(nn.Module):
    """Encoder (embedding -> LSTM) over source ids [B, S]; one decoder query from a token [B]
    (embedding -> linear, a [B, Dq] query); attention over the encoder states; output linear."""

    def __init__(self, kind):
        super().__init__()
        self.src_emb = nn.Embedding(V, E)
        self.enc = nn.LSTM(E, H, batch_first=True)
        self.tgt_emb = nn.Embedding(V, E)
        self.attn = {"dot": lambda: LuongAttention(H, H), "general": lambda: LuongAttention(DQ, H, "general"),
                     "additive": lambda: BahdanauAttention(DQ, H, 10)}[kind]()
        self.query = nn.Linear(E, self.attn.query_size)
        self.head = nn.Linear(H, 7)

    def forward(self, src, tgt, lengths):
        keys, _ = self.enc(self.src_emb(src))
        ctx, w = self.attn(self.query(self.tgt_emb(tgt)), keys, lengths)
        return self.head(ctx), w


def _inputs(B, S, lengths=None):
    src = torch.from_numpy(rng.integers(0, V, (B, S)))
    tgt = torch.from_numpy(rng.integers(0, V, (B,)))
    ln = rng.integers(1, S + 1, B) if lengths is None else np.asarray(lengths)
    return src, tgt, torch.from_numpy(ln.astype(np.int64))


@pytest.mark.parametrize("kind", ["dot", "general", "additive"])
def test_compiled_equals_reference(kind):
    torch.manual_seed(1)
    model = DecoderStep(kind).eval()
    qm = til.quantize(model, [_inputs(4, 9) for _ in range(6)])
    cm = til.compile(qm, "host", example_inputs=_inputs(3, 9), verbose=False)
    ref = til.reference(qm)
    for B, S, lengths in ((1, 1, [1]), (1, 6, [0]), (3, 9, [0, 1, 9]), (3, 13, None), (1, 33, [33]),
                          (3, 5, [5, 5, 5])):
        args = _inputs(B, S, lengths)
        got = cm(*args)
        want = ref(*(a.numpy() for a in args))
        assert len(got) == 2
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        cm(*_inputs(2, 4, [2, -1]))
    with pytest.raises(TypeError, match="attention source lengths"):
        src, tgt, ln = _inputs(2, 4)
        cm(src, tgt, ln.float())


def test_compiled_query_steps_without_lengths():
    """Q queries per batch row [B, Q, Dq] and no lengths: the unmasked softmax with a symbolic
    source length and the context of Q > 1 queries."""
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = LuongAttention(DQ, DQ)

        def forward(self, q, keys):
            return self.attn(q, keys)

    torch.manual_seed(2)
    qm = til.quantize(Multi().eval(), [(torch.randn(2, 3, DQ), torch.randn(2, 5, DQ)) for _ in range(4)])
    cm = til.compile(qm, "host", example_inputs=(torch.randn(2, 3, DQ), torch.randn(2, 5, DQ)), verbose=False)
    for B, Q, S in ((1, 1, 1), (3, 2, 7), (2, 4, 33)):
        q, k = torch.randn(B, Q, DQ) * 2, torch.randn(B, S, DQ) * 2
        got, want = cm(q, k), til.reference(qm)(q.numpy(), k.numpy())
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------
# kernels on extreme inputs


def _run(func, ins, outs):
    kern = _build(func)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in ins] + \
        [tvm.runtime.tensor(np.zeros(s, d)) for s, d in outs]
    kern(*args)
    return [a.numpy() for a in args[len(ins):]]


_BUILT = {}


def _build(func):
    key = str(func.script())
    if key not in _BUILT:
        _BUILT[key] = K.build_kernel(func, K.host_target())
    return _BUILT[key]


def test_score_kernels_extremes():
    tanh = fit_pwl("tanh", 16, 12)
    for B, Q, S, D in ((1, 1, 1, 1), (3, 2, 9, 13)):
        for lo, hi in ((-128, -127), (127, 128), (-128, 128)):
            q = rng.integers(lo, hi, (B, Q, D)).astype(np.int8)
            k = rng.integers(lo, hi, (B, S, D)).astype(np.int8)
            (z,) = _run(KA.attention_dot(D), [q, k], [((B, Q, S), "int32")])
            np.testing.assert_array_equal(z, ops.attention_dot(q, k))
        for lo, hi in ((-2**15, -2**15 + 1), (2**15 - 1, 2**15), (-2**15, 2**15), (-9000, 9000)):
            qx = rng.integers(lo, hi, (B, Q, D)).astype(np.int16)
            kx = rng.integers(lo, hi, (B, S, D)).astype(np.int16)
            for v in (np.full(D, -127, np.int8), np.full(D, 127, np.int8), rng.integers(-127, 128, D).astype(np.int8)):
                (z,) = _run(KA.additive_scores(D, tanh.pieces), [qx, kx, v, K.pack_pwl(tanh)], [((B, Q, S), "int32")])
                np.testing.assert_array_equal(z, ops.additive_scores(qx, kx, v, K.pack_pwl(tanh)))


@pytest.mark.parametrize("len_dtype", ["int64", "int32"])
def test_masked_softmax_kernel_extremes(len_dtype):
    exp = fit_pwl("exp", 16, 10)
    mz, sz = fp.quantize_multiplier(0.003 / 2**-10)
    func = KA.masked_softmax(exp.pieces, mz, sz, len_dtype)
    for B, R, S in ((1, 1, 1), (3, 2, 6), (3, 1, 33)):
        lengths = np.array([S, 0, 1][:B], len_dtype)
        cases = [np.full((B, R, S), 77, np.int32),
                 np.where(np.arange(S) == S // 2, 2**31 - 1, -2**31).astype(np.int32) * np.ones((B, R, 1), np.int32),
                 rng.integers(-2**31, 2**31, (B, R, S)).astype(np.int32),
                 rng.integers(-3000, 3000, (B, R, S)).astype(np.int32)]
        for z in cases:
            for ln in (lengths, np.full(B, S, len_dtype), rng.integers(-2, S + 3, B).astype(len_dtype)):
                (p,) = _run(func, [z, ln, K.pack_pwl(exp)], [((B, R, S), "int16")])
                np.testing.assert_array_equal(p, ops.masked_softmax(z, ln, mz, sz, exp))


@pytest.fixture(scope="module")
def dot_model():
    torch.manual_seed(3)
    model = DecoderStep("general").eval()
    return til.quantize(model, [_inputs(4, 9) for _ in range(6)])


def test_cli_compiles_a_model_with_lengths(dot_model, tmp_path):
    """`tvm-intlstm compile` builds int64 example inputs for ids and lengths (not float32)."""
    from tvm_intlstm import cli
    qpt = tmp_path / "attn.qpt"
    til.save_quantized(dot_model, qpt)
    so = tmp_path / "attn.so"
    cli.main(["compile", str(qpt), "--example-shape", "2,5", "--example-shape", "2",
              "--example-shape", "2", "-o", str(so)])
    args = _inputs(3, 7, [7, 1, 4])
    got = til.load(so)(*args)
    for g, w in zip(got, til.reference(dot_model)(*(a.numpy() for a in args))):
        np.testing.assert_array_equal(g, w)


@pytest.mark.skipif(not all(__import__("shutil").which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")),
                    reason="needs the aarch64 toolchain and qemu (.ci/install_apt.sh installs them)")
def test_rpi5_build_under_qemu(dot_model, tmp_path):
    """The attention kernels cross-compiled for aarch64 (rpi5) give the reference's bits under qemu."""
    from tvm_intlstm.runtime.emulate import run_emulated
    lib = til.compile(dot_model, "rpi5", example_inputs=_inputs(3, 9), verbose=False).export_library(
        tmp_path / "attn_rpi5.so")
    for B, S, lengths in ((3, 9, [0, 1, 9]), (1, 1, [1])):
        args = [a.numpy() for a in _inputs(B, S, lengths)]
        got = run_emulated(lib, args, cpu="cortex-a76", verbose=False)
        for g, w in zip(got, til.reference(dot_model)(*args)):
            np.testing.assert_array_equal(g, w)


class _FloatQueryKeys(nn.Module):
    """Attention over float keys given as a model input (dot scores): extreme keys reach the
    scores directly."""

    def __init__(self):
        super().__init__()
        self.attn = LuongAttention(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, q, keys, lengths):
        ctx, w = self.attn(q, keys, lengths)
        return self.head(ctx), w


def _extreme_attention_cases():
    """(q [B, 2, 8], keys [B, S, 8], lengths) float inputs: all keys equal (all-equal scores), one
    huge key (one huge score, saturated int8), a source of length 1, lengths 0 / 1 / S."""
    g = torch.Generator().manual_seed(5)
    B, S = 3, 9
    q = torch.randn(B, 2, 8, generator=g)
    equal = torch.randn(1, 1, 8, generator=g).repeat(B, S, 1)
    huge = torch.randn(B, S, 8, generator=g) * 0.1
    huge[:, S // 2] = 1e4
    return [(q, equal, [S, 1, 5]), (q, huge, [S, 0, 7]), (q[:1], torch.randn(1, 1, 8, generator=g), [1])]


@pytest.mark.skipif(not all(__import__("shutil").which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")),
                    reason="needs the aarch64 toolchain and qemu (.ci/install_apt.sh installs them)")
def test_rpi5_extreme_scores_under_qemu(tmp_path):
    """All-equal scores, one huge score, a source of length 1 and masked rows: the compiled module
    equals the reference on the host and, cross-compiled for aarch64 (rpi5), under qemu."""
    from tvm_intlstm.runtime.emulate import run_emulated
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    calib = [(torch.randn(4, 2, 8, generator=g), torch.randn(4, 9, 8, generator=g),
              torch.tensor([9, 3, 1, 6])) for _ in range(4)]
    q = til.quantize(_FloatQueryKeys().eval(), calib)
    host = til.compile(q, "host", example_inputs=calib[0], verbose=False)
    lib = til.compile(q, "rpi5", example_inputs=calib[0], verbose=False).export_library(
        tmp_path / "attn_extremes_rpi5.so")
    ref = til.reference(q)
    weights = []
    for qq, keys, lengths in _extreme_attention_cases():
        args = [qq.numpy(), keys.numpy(), np.asarray(lengths, np.int64)]
        want = ref(*args)
        for got in (host(*args), run_emulated(lib, args, cpu="cortex-a76", verbose=False)):
            for g_, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g_), w)
        weights.append(np.asarray(want[1]))
    # the cases are what they say: equal weights over row 0's 9 positions and all weight on the one
    # position of row 1 (length 1); a huge key takes over 90 % of the weight somewhere; length 0 -> 0
    w_equal, w_huge, w_one = weights
    assert (w_equal[0] == w_equal[0, 0, 0]).all() and (w_equal[1, :, 0] == 32767).all()
    assert w_huge[:, :, 4].max() >= 0.9 * 32767 and (w_huge[1] == 0).all()
    assert (w_one == 32767).all()
