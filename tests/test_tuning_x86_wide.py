"""AVX-512 / AVX-512 VNNI paths of the tuned GEMM (tvm_intlstm/tuning/x86_wide.py).

This machine (Zen3) executes AVX2 only, so:
- arithmetic: the u8 (x + 128) + [OP/16, KP/4, 16, 4] + corrected-bias block form is run on this
  host with a vectorized (not tensorized) schedule, and the exact two-vpmaddwd step of the
  AVX-512 intrinsic is run with its 8-lane (ymm) twin; both bit for bit against the reference;
- structure: sampled schedules of the design space are compiled for cascadelake (vpdpbusd) and
  skylake-avx512 (zmm vpmaddwd, no vpmaddubsw) and their assembly inspected;
- the AVX2 path (znver3) is unchanged.
On a host with AVX-512 the tensorized 16-lane kernels are run too."""
import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.target import codegen

from tvm_intlstm.reference import ops as R
from tvm_intlstm.tuning import gemm as G
from tvm_intlstm.tuning import x86_wide as XW

HOST = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
HOST_ISA = XW.x86_isa(HOST)
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
SKYLAKE = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
ZNVER3 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
KINDS = ("random", "min", "max", "mixed")


def _data(N, K, O, dtype, kind="random", seed=0, wmax=127):
    """Spec-valid inputs and the reference output: random, x all -128 ("min"), x all 127 ("max"),
    or rows alternating -128/127 ("mixed"); the extreme kinds take |W| = wmax and saturate."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.integers(-128, 128, (N, K)).astype(np.int8)
        W = rng.integers(-wmax, wmax + 1, (O, K)).astype(np.int8)
        b = rng.integers(-(2**20), 2**20, O).astype(np.int32)
        M = rng.integers(2**30, 2**31 - 1, O).astype(np.int32)
        s = None       # per channel, below: most outputs in range, some saturated
    else:
        x = np.full((N, K), -128 if kind == "min" else 127, np.int8)
        if kind == "mixed":
            x[1::2] = -128
        W = np.where(rng.random((O, K)) < 0.5, -wmax, wmax).astype(np.int8)
        W[0] = wmax          # an all-positive and an all-negative row: the largest |rowsum|
        W[-1] = -wmax
        b = rng.choice(np.array([-(2**30), 2**30, 0], np.int32), O).astype(np.int32)
        M = np.full(O, 2**31 - 1, np.int32)
        s = rng.integers(1, 3, O).astype(np.int32)
    acc = R.linear_acc(x, W, b)
    if dtype == "int32":
        return x, W, b, (), acc
    if s is None:   # |acc| * M / 2^s about 2^(bits-1) for the largest |acc| of each channel
        bitlen = np.array([int(v).bit_length() for v in np.abs(acc.astype(np.int64)).max(0)])
        s = np.clip(31 + bitlen - (int(dtype[3:]) - 1) + rng.integers(-1, 2, O), 1, 62)
        s = s.astype(np.int32)
    return x, W, b, (M, s), R.requantize(acc, M, s, int(dtype[3:]))


def _schedule(func, isa, O, decisions=None, seed=1):
    """Sample the design space (through gemm.design_spaces), or fix some decisions."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}), seed=seed)
    if decisions is None:
        assert len(G.design_spaces(sch, isa, O)) == 1
    else:
        XW.schedule_gemm_wide(sch, isa, O, decisions)
    return sch


def _compile(sch, target):
    func = sch.mod["main"].with_attr("global_symbol", "gemm")
    return tvm.compile(tvm.IRModule({"gemm": func}), target=target)


def _run(ex, N, K, O, dtype, kind, seed, lanes=16, wmax=127):
    x, W, b, req, ref = _data(N, K, O, dtype, kind, seed, wmax)
    Wp, bc = XW.prepare_weights_wide("avx512_vnni", W, b, lanes=lanes)
    args = [tvm.runtime.tensor(a) for a in (x, Wp, bc) + tuple(req)]
    args.append(tvm.runtime.empty((N, O), dtype, tvm.cpu()))
    ex["gemm"](*args)
    return args[-1].numpy(), ref


def _asm(ex):
    return ex.mod.inspect_source("asm")


# --- target -> isa --------------------------------------------------------------------------------
@pytest.mark.parametrize("target,isa", [
    ({"kind": "llvm", "mcpu": "cascadelake"}, "avx512_vnni"),
    ({"kind": "llvm", "mcpu": "icelake-server"}, "avx512_vnni"),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, "avx512_vnni"),
    ({"kind": "llvm", "mcpu": "znver4"}, "avx512_vnni"),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, "avx512"),
    ({"kind": "llvm", "mcpu": "cascadelake", "mattr": ["-avx512vnni"]}, "avx512"),
    ({"kind": "llvm", "mcpu": "znver3", "mattr": ["+avx512f", "+avx512bw"]}, "avx512"),
    ({"kind": "llvm", "mcpu": "znver3"}, "avx2"),
    ({"kind": "llvm", "mcpu": "haswell"}, "avx2"),
    ({"kind": "llvm", "mcpu": "alderlake"}, "avx2"),      # AVX-VNNI is 256-bit: not this path
    ({"kind": "llvm", "mcpu": "nehalem"}, None),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, None),
    ("llvm -mcpu=cascadelake", "avx512_vnni"),
    ("llvm -mcpu=skylake-avx512", "avx512"),
])
def test_x86_isa(target, isa):
    assert XW.x86_isa(target) == isa


# --- packing and the bias correction --------------------------------------------------------------
def test_pack_weights_vnni_layout_and_correction():
    W = (np.arange(21 * 7) % 251 - 125).astype(np.int8).reshape(21, 7)
    P = XW.pack_weights_vnni(W)
    assert P.shape == (2, 2, 16, 4) and P.dtype == np.int8 and P.flags.c_contiguous
    assert P[1, 1, 4, 2] == W[20, 6] and P[0, 0, 3, 1] == W[3, 1]
    assert P[1, 1, 5, 0] == 0 and P[0, 1, 0, 3] == 0          # O and K padding
    assert XW.pack_weights_vnni(W, lanes=8).shape == (3, 2, 8, 4)
    # the identity the kernel relies on: (x + 128) W^T + bias' = x W^T + bias
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (5, 7)).astype(np.int8)
    b = rng.integers(-(2**20), 2**20, 21).astype(np.int32)
    Wp, bc = G.prepare_weights("avx512", W, b)
    assert np.array_equal(Wp, P) and bc.dtype == np.int32
    u = x.astype(np.int64) + 128
    assert np.array_equal(u @ W.astype(np.int64).T + bc, R.linear_acc(x, W, b))
    assert np.array_equal(G.prepare_weights("avx512_vnni", W)[1], -128 * W.astype(np.int64).sum(1))
    # other isas: the o8k2 packing, bias unchanged
    Wp, bb = G.prepare_weights("avx2", W, b)
    assert np.array_equal(Wp, G.pack_weights(W)) and np.array_equal(bb, b)
    # outside spec 5's bounds (a -128 row at K = 2^16 and |b| = 2^30) bias' leaves int32
    with pytest.raises(OverflowError):
        XW.corrected_bias(np.full((1, 2**16), -128, np.int8), np.array([2**30], np.int32))
    with pytest.raises(TypeError):
        XW.pack_weights_vnni(W.astype(np.int16))


# --- arithmetic on this host ----------------------------------------------------------------------
@pytest.mark.parametrize("K,O,dtype,nt", [
    (40, 20, "int16", 4), (37, 24, "int8", 2), (64, 32, "int32", 8), (5, 3, "int8", 1)])
def test_u8_block_form_bit_exact(K, O, dtype, nt):
    """The u8 + o16k4 + corrected-bias kernel with the lanes vectorized (no tensorize), symbolic N
    (row tails, K and O padding), on random and extreme inputs."""
    func = XW.gemm_blocks_wide(K, O, dtype, name="main")
    sch = _schedule(func, "generic", O, {"nt": nt, "unroll": 16})
    assert "tensorize" not in str(sch.trace)
    ex = _compile(sch, HOST)
    for i, (N, kind) in enumerate([(1, "random"), (7, "min"), (16, "max"), (33, "mixed"),
                                   (9, "random")]):
        y, ref = _run(ex, N, K, O, dtype, kind, seed=i)
        assert y.dtype == ref.dtype and np.array_equal(y, ref), (N, kind)
    if HOST_ISA in XW.WIDE_ISAS:   # an AVX-512 host (not this Zen3): run the tensorized kernel
        ex = _compile(_schedule(func, HOST_ISA, O, {"nt": nt, "unroll": 16}), HOST)
        for i, (N, kind) in enumerate([(3, "random"), (8, "min"), (5, "max"), (17, "mixed")]):
            y, ref = _run(ex, N, K, O, dtype, kind, seed=i)
            assert np.array_equal(y, ref), (HOST_ISA, N, kind)


@pytest.mark.parametrize("K,O,dtype", [(40, 20, "int16"), (64, 32, "int32")])
def test_pmaddwd_u8s8_step_bit_exact_8_lanes(K, O, dtype):
    """The body of the AVX-512 intrinsic (two vpmaddwd on sign-extended even/odd weight bytes) in
    its ymm twin, tensorized and run here: exact on the full int8 range."""
    func = XW.gemm_blocks_wide(K, O, dtype, name="main", lanes=8)
    sch = _schedule(func, "avx2", O, {"nt": 4, "unroll": 64})
    assert XW.INTRIN_AVX2_U8S8 in str(sch.trace)
    ex = _compile(sch, HOST)
    assert "vpmaddwd" in _asm(ex)
    for i, (N, kind) in enumerate([(3, "random"), (8, "min"), (5, "max"), (17, "mixed")]):
        y, ref = _run(ex, N, K, O, dtype, kind, seed=i, lanes=8)
        assert np.array_equal(y, ref), (N, kind)
    # and weights at -128 (outside spec 4, still exact in the kernel)
    x = np.full((2, K), 127, np.int8)
    x[1] = -128
    W = np.full((O, K), -128, np.int8)
    Wp, bc = XW.prepare_weights_wide("avx512", W, None, lanes=8)
    args = [tvm.runtime.tensor(a) for a in (x, Wp, bc)]
    if dtype != "int32":
        args += [tvm.runtime.tensor(np.full(O, 2**30, np.int32)),
                 tvm.runtime.tensor(np.full(O, 20, np.int32))]
    args.append(tvm.runtime.empty((2, O), dtype, tvm.cpu()))
    ex["gemm"](*args)
    acc = R.linear_acc(x, W)
    ref = acc if dtype == "int32" else R.requantize(acc, np.full(O, 2**30), np.full(O, 20), 16)
    assert np.array_equal(args[-1].numpy(), ref)


@pytest.mark.parametrize("K,O,dtype", [(40, 20, "int16"), (64, 32, "int32")])
def test_pmaddubsw_step_bit_exact_for_7bit_weights(K, O, dtype):
    """The 7-bit intrinsic (isa avx2_w7: vpmaddubsw, then vpmaddwd by ones; what tune uses for
    QuantConfig(weight_bits=7) GEMMs): exact for weights in [-64, 64] at every extreme of x, and
    wrong with full-range weights (vpmaddubsw saturates: 2 * 255 * 127 > 2^15), which is why only
    GEMMs on the u8 route get it."""
    func = XW.gemm_blocks_wide(K, O, dtype, name="main", lanes=8)
    sch = _schedule(func, XW.W7_ISA, O, {"nt": 4, "unroll": 64})
    assert XW.INTRIN_AVX2_U8S7 in str(sch.trace)
    ex = _compile(sch, HOST)
    assert "vpmaddubsw" in _asm(ex)
    for i, (N, kind) in enumerate([(3, "random"), (8, "min"), (5, "max"), (17, "mixed")]):
        y, ref = _run(ex, N, K, O, dtype, kind, seed=i, lanes=8, wmax=64)
        assert np.array_equal(y, ref), (N, kind)
    if dtype == "int32":     # (a requantized output would saturate both ways)
        y, ref = _run(ex, 5, K, O, dtype, "max", seed=0, lanes=8, wmax=127)
        assert not np.array_equal(y[:, 0], ref[:, 0])


def test_trace_tuned_at_static_n_replays_on_symbolic_n():
    """As for the AVX2 kernels: a trace sampled on the static-N task replays on the symbolic-N
    kernel the compiler calls (here the 8-lane twin, run; and the VNNI kernel, compiled)."""
    K, O = 48, 40
    for lanes, isa, target in ((8, "avx2", HOST), (16, "avx512_vnni", CASCADELAKE)):
        static = XW.gemm_blocks_wide(K, O, "int8", n_rows=16, name="main", lanes=lanes)
        sch = _schedule(static, isa, O, seed=7)
        sym = s_tir.Schedule(tvm.IRModule({"main": XW.gemm_blocks_wide(K, O, "int8", name="main",
                                                                        lanes=lanes)}))
        sch.trace.apply_to_schedule(sym, remove_postproc=True)
        ex = _compile(sym, target)
        if target is HOST:
            for N in (1, 13, 40):
                y, ref = _run(ex, N, K, O, "int8", "random", seed=N, lanes=lanes)
                assert np.array_equal(y, ref), N
        else:
            assert "vpdpbusd" in _asm(ex)


# --- structure of the AVX-512 builds --------------------------------------------------------------
@pytest.mark.parametrize("K,O,dtype", [(256, 96, "int8"), (64, 40, "int32")])
def test_design_space_vnni_emits_vpdpbusd(K, O, dtype):
    for seed in (1, 2, 3):
        func = XW.gemm_blocks_wide(K, O, dtype, n_rows=16, name="main")
        sch = _schedule(func, "avx512_vnni", O, seed=seed)
        assert XW.INTRIN_VNNI in str(sch.trace)
        asm = _asm(_compile(sch, CASCADELAKE))
        assert "vpdpbusd" in asm and "vpmaddubsw" not in asm, seed


@pytest.mark.parametrize("K,O,dtype", [(256, 96, "int8"), (64, 40, "int16")])
def test_design_space_avx512_emits_zmm_pmaddwd_not_pmaddubsw(K, O, dtype):
    for seed in (1, 2, 3):
        func = XW.gemm_blocks_wide(K, O, dtype, n_rows=16, name="main")
        sch = _schedule(func, "avx512", O, seed=seed)
        assert XW.INTRIN_AVX512_U8S8 in str(sch.trace)
        asm = _asm(_compile(sch, SKYLAKE))
        pmadd = [ln for ln in asm.splitlines() if "vpmaddwd" in ln]
        assert pmadd and all("zmm" in ln for ln in pmadd), seed
        assert "vpmaddubsw" not in asm and "vpdpbusd" not in asm, seed


def test_metaschedule_space_generator_samples():
    """The space through MetaSchedule (ScheduleFn, as tune.py builds it) for a VNNI target."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_intlstm.tuning._ms import fast_tensor_intrin

    K, O = 128, 64
    mod = tvm.IRModule({"main": G.gemm_blocks_for_isa("avx512_vnni", K, O, "int16", n_rows=16,
                                                      name="main")})
    with fast_tensor_intrin():
        for seed in (11, 12):
            ctx = ms.TuneContext(
                mod=mod, target=CASCADELAKE,
                space_generator=ms.space_generator.ScheduleFn(
                    lambda sch: G.design_spaces(sch, "avx512_vnni", O), sch_rules=[],
                    postprocs=[], mutator_probs={ms.mutator.MutateTileSize(): 1.0}),
                task_name="vnni", rand_state=seed, num_threads=1)
            spaces = ctx.generate_design_space()
            assert len(spaces) == 1
            assert "vpdpbusd" in _asm(_compile(spaces[0], CASCADELAKE))


def test_tvm_dot_16x4_intrinsics():
    """Why INTRIN_VNNI is ours: TVM 0.27's dot_16x4_vnni (imported cheaply, x86 only) builds only
    with LLVM < 22; the wheel's LLVM 22 rejects its <16 x i32> byte operands. (TVM's
    dot_16x4_avx512 is vpmaddubsw: saturating, not used, see x86_wide's doc.)"""
    from tvm.s_tir import TensorIntrin

    x86 = XW.import_tvm_x86_intrinsics()
    assert TensorIntrin.get(x86.VNNI_DOT_16x4_INTRIN) is not None
    assert x86.AVX512_DOT_16x4_INTRIN == XW.TVM_INTRIN_AVX512
    func = XW.gemm_blocks_wide(64, 32, "int32", n_rows=8, name="main")
    sch = s_tir.Schedule(tvm.IRModule({"main": func}), seed=1)
    gemm = sch.get_sblock("gemm")
    n, o, k = sch.get_loops(gemm)
    o0, o1 = sch.split(o, [None, 16])
    k0, k1 = sch.split(k, [None, 4])
    sch.reorder(n, o0, k0, o1, k1)
    sch.decompose_reduction(gemm, k0)
    sch.tensorize(o1, x86.VNNI_DOT_16x4_INTRIN)     # the same description as ours
    assert "dot_16x4_vnni" in str(sch.trace)
    if codegen.llvm_version_major() >= 22:
        with pytest.raises(Exception, match="does not match function signature"):
            _compile(sch, CASCADELAKE)
    else:
        assert "vpdpbusd" in _asm(_compile(sch, CASCADELAKE))


# --- the AVX2 path is unchanged -------------------------------------------------------------------
def test_avx2_path_unchanged():
    K, O = 64, 40
    func = G.gemm_blocks(K, O, "int8", n_rows=16, name="main", packed=True)
    tvm.ir.assert_structural_equal(
        G.gemm_blocks_for_isa("avx2", K, O, "int8", n_rows=16, name="main"), func)
    a = s_tir.Schedule(tvm.IRModule({"main": func}), seed=5)
    G.register_intrinsics()
    G.schedule_gemm(a, "avx2", O)
    b = s_tir.Schedule(tvm.IRModule({"main": func}), seed=5)
    assert len(G.design_spaces(b, "avx2", O)) == 1
    assert str(a.trace) == str(b.trace) and G.INTRIN_AVX2_PMADDWD_I8W in str(b.trace)
    # an o8k2 kernel on an AVX-512 isa falls back to the AVX2 step
    c = s_tir.Schedule(tvm.IRModule({"main": func}), seed=5)
    G.design_spaces(c, "avx512_vnni", O)
    assert str(c.trace) == str(a.trace)
    asm = _asm(_compile(b, ZNVER3))
    assert "vpmaddwd" in asm and "zmm" not in asm and "vpdpbusd" not in asm
    # the unpacked kernel: still one design per packing order
    u = s_tir.Schedule(tvm.IRModule({"main": G.gemm_blocks(K, O, "int8", n_rows=16,
                                                           name="main")}), seed=5)
    assert len(G.design_spaces(u, "avx2", O)) == len(G.PACK_ORDERS)
