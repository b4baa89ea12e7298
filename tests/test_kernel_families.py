"""Every x86 kernel family (kernels/isa/) against the numpy reference, picked by target features.

Each family is exercised through a representative target; a target whose features this CPU lacks
(decided from the features, never the CPU name) is compiled and its assembly checked instead of
run. `test_families_report` prints which families ran here and which were only compiled
(`pytest -rA` or `-s` shows it).

The AMX family (opt-in, `compile(..., kernels="amx")`) runs its tile kernels only on a CPU with
amx_tile / amx_int8 (and a kernel that grants the tile state); elsewhere they are compiled and their
assembly checked for tdpbssd / ldtilecfg / tilerelease, and the same kernels with every tile
instruction emulated in plain TIR (the `amx_emulated` family: same addresses, packing and epilogue)
run here bit-exact, so the layout is checked on any AVX-512 VNNI CPU. The amx family's own machine
code (what LLVM made of the tile intrinsics: tile configuration, registers, strides) runs too, built
for `AMX_TRAP_TARGET` (x86-64-v4 + VNNI + AMX) with its tile instructions carried out by the SIGILL
handler of `tvm_intlstm.runtime.amx_trap` on a CPU without AMX (an autouse fixture enters
`emulate_amx()` for the tests of that target; on an AMX CPU they run natively).

The x86_vnni family's u8 route (u = x + 128, vpdpbusd, -128 rowsum(W) added back) must be exact
for FULL-RANGE int8 weights (-128 included), unlike AVX2's vpmaddubsw route (|W| <= 64): the
extremes below (x = -128 / 127 against weights of -128 / 127, biases placing results on the int32
limits) are the cases a saturating or wrapping step would get wrong.
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
from tvm_intlstm.kernels._gemm import AMX_PACK
from tvm_intlstm.reference import ops
from tvm_intlstm.runtime.amx import AMXUnavailableError, amx_permission_answer
from tvm_intlstm.runtime.amx_trap import TRAP_TARGET as AMX_TRAP_TARGET
from tvm_intlstm.runtime.amx_trap import emulate_amx, native_amx, runs_emulated, trap_available
from tvm_intlstm.target import missing_host_features, parse_target

from test_fast_kernels import int32_limit_case
from test_kernels import assert_lstm_equal, make_lstm, ref_recurrence, run, run_recurrent

# family -> representative targets (x86_vnni in AVX-VNNI's VEX form and AVX512-VNNI's EVEX ymm
# form: the generators get isa= explicitly, a target may run several families)
FAMILY_TARGETS = [
    ("generic", "llvm -mcpu=x86-64"),
    ("avx2", "llvm -mcpu=haswell"),
    ("x86_vnni", "llvm -mcpu=x86-64-v3 -mattr=+avxvnni"),
    ("x86_vnni", "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni"),
    ("avx512_vnni", "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni"),
    ("amx", "llvm -mcpu=sapphirerapids"),                          # runs only on an AMX CPU
    ("amx_emulated", "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni"),   # its tiles emulated: runs here
    ("amx", AMX_TRAP_TARGET),       # the real tile code; tile instructions trapped where no AMX
]
AMX_TARGET = "llvm -mcpu=sapphirerapids"
HOST_AMX = native_amx()
# the trap target runs where only AMX is missing (the emulator supplies it)
RUNNABLE = {t: missing_host_features(t) == [] or (t == AMX_TRAP_TARGET and runs_emulated(t))
            for _, t in FAMILY_TARGETS}


@pytest.fixture(autouse=True)
def _amx_trap(request):
    """Tests of AMX_TRAP_TARGET run with the tile instructions emulated (runtime/amx_trap.py)
    where the CPU has no AMX, and must have run some."""
    spec = getattr(request.node, "callspec", None)
    if spec is None or spec.params.get("target") != AMX_TRAP_TARGET or HOST_AMX \
            or not RUNNABLE[AMX_TRAP_TARGET]:
        yield
        return
    with emulate_amx() as emu:
        yield
    if spec.params.get("fam") == "amx":
        assert emu.counts()["tdpbxxd"] > 0, "no tile instruction ran"
# the GEMM step's instruction (as it appears in the assembly)
SIGNATURE = {"avx2": "vpmaddwd", "x86_vnni": "vpdpbusd", "avx512_vnni": "vpdpbusd\t%zmm",
             "amx": "vpdpbusd\t%zmm", "amx_emulated": "vpdpbusd\t%zmm"}
# the tile kernels (packed linear kernels of the amx family) instead
TILE_SIGNATURE = ("ldtilecfg", "tileloadd", "tdpbssd", "tilestored", "tilerelease")
VNNI = ("x86_vnni", "avx512_vnni", "amx", "amx_emulated")
TILES = ("amx", "amx_emulated")
IDS = [f"{f}-{t.split(' ', 1)[1]}" for f, t in FAMILY_TARGETS]


def test_families_report():
    """Which families ran here and which were compile-checked only (shown with -rA / -s)."""
    ran = [f"{f} ({t})" for f, t in FAMILY_TARGETS if RUNNABLE[t]]
    compiled = [f"{f} ({t})" for f, t in FAMILY_TARGETS if not RUNNABLE[t]]
    print(f"\nkernel families run on this CPU: {', '.join(ran) or 'none'}; compile-checked only: "
          f"{', '.join(compiled) or 'none'}")
    why = amx_permission_answer() if RUNNABLE[AMX_TARGET] else "this CPU has no AMX"
    print("AMX tile kernels: " + (
        "RUN on this CPU (bit-exact checks below)" if HOST_AMX and RUNNABLE[AMX_TARGET] else
        f"not run natively ({why}); their machine code runs with the tile instructions emulated "
        f"(runtime/amx_trap.py, {AMX_TRAP_TARGET}) and their layout with emulated tiles "
        "(amx_emulated)" if RUNNABLE[AMX_TRAP_TARGET] else
        f"compile-checked only ({why}; the trap emulator cannot run: "
        f"{trap_available() or 'CPU lacks AVX-512 VNNI'}); their layout runs emulated (amx_emulated)"))
    assert RUNNABLE["llvm -mcpu=x86-64"]   # the generic family always runs on an x86 host


@pytest.mark.parametrize("target,want", [
    ("llvm -mcpu=znver3", "avx2"), ("llvm -mcpu=haswell", "avx2"),
    ("llvm -mcpu=skylake-avx512", "avx2"),          # AVX-512 without VNNI
    ("llvm -mcpu=icelake-server", "avx512_vnni"), ("llvm -mcpu=sapphirerapids", "avx512_vnni"),
    ("llvm -mcpu=znver4", "avx512_vnni"), ("llvm -mcpu=alderlake", "x86_vnni"),   # AVX-VNNI
    ("llvm -mcpu=znver5 -mattr=-avx512vnni", "x86_vnni"),        # features, not the name
    ("llvm -mcpu=znver5 -mattr=-avxvnni,-avx512vnni", "avx2"),
    ("llvm -mcpu=x86-64", "generic"), ("rpi5", "neon_dotprod"), ("rpi4", "generic"),
])
def test_pick_from_features(target, want):
    assert K.isa.pick(parse_target(target)).name == want
    assert K.resolve_isa(parse_target(target)) == want


def test_build_accepts_supported_and_refuses_unsupported_family():
    f_avx2 = K.linear_i32(16, 8, isa="avx2", packed=True)
    f_vnni = K.linear_i32(16, 8, isa="x86_vnni", packed=True, w7=True)
    f_512 = K.linear_i32(16, 8, isa="avx512_vnni", packed=True, w7=True)
    K.build_kernel(f_avx2, "llvm -mcpu=icelake-server")   # a VNNI target runs AVX2 kernels too
    K.build_kernel(f_vnni, "llvm -mcpu=icelake-server")
    with pytest.raises(ValueError, match="x86_vnni"):
        K.build_kernel(f_vnni, "llvm -mcpu=znver3")
    with pytest.raises(ValueError, match="avx512_vnni"):
        K.build_kernel(f_512, "llvm -mcpu=alderlake")        # AVX-VNNI only: no zmm


_built: dict = {}


def _kernel(func, target):
    """(PrimFunc, built kernel or None when not runnable here): a target this CPU cannot run is
    only compiled, and its GEMM step instruction checked in the assembly."""
    key = (func.script(), target)
    if key not in _built:
        k = K.build_kernel(func, target)
        fam = str(func.attrs["intlstm.isa"])
        tiles = K.kernel_convention(func)[1] == AMX_PACK
        asm = k.module.inspect_source("asm")
        if tiles:
            assert K.uses_amx(func) == (fam == "amx") and k.amx == (fam == "amx")
            for ins in TILE_SIGNATURE:
                assert (ins in asm) == (fam == "amx"), f"{fam} tile kernel: {ins} in asm?"
        elif fam in SIGNATURE:
            assert SIGNATURE[fam] in asm, f"{fam} kernel without {SIGNATURE[fam]}"
            if fam in VNNI and int(func.attrs["intlstm.u8"]):
                assert "vpmaddubsw" not in asm
        _built[key] = k if RUNNABLE[target] else None
    return _built[key]


def _full_range_weights(rng, O, Kd):
    W = rng.integers(-128, 128, (O, Kd)).astype(np.int8)
    W[0] = -128
    W[1 % O] = 127
    return W


@pytest.mark.parametrize("fam,target", FAMILY_TARGETS, ids=IDS)
@pytest.mark.parametrize("Kd,O", [(33, 13), (256, 40), (7, 9)])
def test_linear_full_range(fam, target, Kd, O):
    rng = np.random.default_rng(Kd * 1000 + O)
    W = _full_range_weights(rng, O, Kd)
    u8 = K.isa.family(fam).u8_exact(W)
    assert u8 == (fam in VNNI)
    M, s = quantize_multiplier_array(np.exp(rng.uniform(np.log(2**-20), np.log(0.5), O)))
    x = rng.integers(-128, 128, (70, Kd)).astype(np.int8)
    x[0], x[1] = -128, 127
    x[40] = -128                  # a whole row at -128 in the second 32-row tile block
    b = rng.integers(-2**20, 2**20, O).astype(np.int32)
    for dt in ("int32", "int8", "int16"):
        f = (K.linear_i32(Kd, O, target=target, isa=fam, w7=u8, packed=True) if dt == "int32" else
             K.linear_requant(Kd, O, dt, target=target, isa=fam, w7=u8, packed=True))
        assert str(f.attrs["intlstm.isa"]) == fam
        k = _kernel(f, target)
        if k is None:
            continue
        wk, bk, _ = K.prepare_weights(f, W, b)
        if fam in TILES:     # s8 x s8 tiles: the bias is not corrected, W is in the tile layout
            assert not int(f.attrs["intlstm.u8"]) and wk.shape == K._gemm.amx_shape(Kd, O)
            np.testing.assert_array_equal(bk, b)
        # (the tile kernels: 32-row blocks; 33 and 70 rows end in a partial block)
        for n in (1, 2, 8, 17) + ((32, 33, 70) if fam in TILES else ()):
            extra = [] if dt == "int32" else [M, s]
            got = run(k, [x[:n], wk, bk, *extra], [((n, O), dt)])
            ref = (ops.linear(x[:n], W, b) if dt == "int32" else
                   ops.requantize(ops.linear_acc(x[:n], W, b), M, s, int(dt[3:])))
            np.testing.assert_array_equal(got, ref, err_msg=f"{fam} {dt} rows={n}")


@pytest.mark.parametrize("fam,target", FAMILY_TARGETS, ids=IDS)
def test_linear_int32_limits(fam, target):
    """Results exactly on INT32_MAX / INT32_MIN with weights at -128 / 127 and x at -128 / 127."""
    x, W, b = int32_limit_case(650, 20, 127, -128)
    Kd, O = 650, 20
    u8 = K.isa.family(fam).u8_exact(W) and K.u8_bias_fits(W, b)
    f = K.linear_i32(Kd, O, target=target, isa=fam, w7=u8, packed=True)
    k = _kernel(f, target)
    if k is not None:
        wk, bk, _ = K.prepare_weights(f, W, b)
        np.testing.assert_array_equal(run(k, [x, wk, bk], [((4, O), "int32")]),
                                      ops.linear(x, W, b))


# (the amx families' recurrent kernels run their steps of >= lstm.AMX_REC_ROWS rows on tiles: B = 8,
# 12, 16, 17 below; the amx one on the trap target, with its instructions emulated where no AMX)
# (20: an odd count of k quads, the last one outside the zmm tiles' two accumulator sets; the
# amx_emulated family, whose tile steps are slow TIR loops, at two sizes only)
REC_CASES = [(f, t, H) for f, t in FAMILY_TARGETS
             for H in ((21, 64) if f == "amx_emulated" else (8, 20, 21, 64))]


@pytest.mark.parametrize("fam,target,H", REC_CASES,
                         ids=[f"{H}-{f}-{t.split(' ', 1)[1]}" for f, t, H in REC_CASES])
def test_recurrent_full_range(fam, target, H):
    rng = np.random.default_rng(H)
    w_h = _full_range_weights(rng, 4 * H, H)
    p = make_lstm(rng, H, 12, w_h=w_h)
    u8 = K.isa.family(fam).u8_exact(w_h)
    for parallel in (False, True):
        f = K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
                             tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces,
                             target=target, isa=fam, w7=u8, packed=True, parallel=parallel)
        k = _kernel(f, target)
        if k is None:
            continue
        for T_, B in ((1, 1), (5, 2), (2, 4), (3, 8), (2, 12), (2, 16), (2, 17)):   # row tiles 8, 4, 2
            gx = rng.integers(-2**15, 2**15, (T_, B, 4 * H)).astype(np.int16)
            gx[0, 0, :] = -2**15   # saturating gate adds
            assert_lstm_equal(run_recurrent(f, k, p, gx), ref_recurrence(gx, p))


AVX512_TARGET = "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni"


@pytest.fixture
def pool_size():
    """Set the size of TVM's thread pool for a test (`runtime.config_threadpool`), restored after;
    returns whether the pool has that size now (TVM sizes it once per process, from
    TVM_NUM_THREADS or half the hardware threads: 1 worker on a 2-vCPU machine)."""
    num = tvm.get_global_func("runtime.NumThreads")
    config = tvm.get_global_func("runtime.config_threadpool")
    before = int(num())

    def resize(n):
        config(0, n)
        return int(num()) == n
    yield resize
    config(0, before)


@pytest.mark.parametrize("H", [16, 48, 64])
@pytest.mark.parametrize("fold,bins", [(False, False), (True, False), (True, True)],
                         ids=["plain", "fold", "fold-bins"])
def test_recurrent_zmm_cell(H, fold, bins, pool_size):
    """The AVX-512 family's 16-unit zmm cell (serial forms, and the threaded form's steps on a pool
    of one worker, batch 1 included): H = 16 (one block), 48 (a pair and a last single block), 64
    (two pairs), saturating gates, extreme states, both directions, against the reference; the
    piece index of block pairs in two rounds or (bins) one (`pwl_bin_shift`: for the gates and the
    cell's tanh, or with cell_frac 11, whose tanh table has two knots in a bin, for the gates only).
    Where the CPU lacks AVX-512 VNNI the kernels are compiled and their assembly checked only."""
    rng = np.random.default_rng(H + 100 * fold + 1000 * bins)
    w_h = _full_range_weights(rng, 4 * H, H)
    p = make_lstm(rng, H, 12, w_h=w_h, cell_frac=11 if H == 48 else 12)
    tabs = [K.pack_pwl(t) for t in (p.sig, p.tanh, p.tanh_c)]
    if fold and not all(K.pwl_foldable(t) for t in tabs):
        pytest.fail("the test's tables should be foldable")
    shifts = tuple(K.pwl_bin_shift(t) for t in tabs) if bins else None
    if bins and (None in shifts[:2] or (shifts[2] is None) != (H == 48)):
        pytest.fail("the test's tables should allow the one-round piece index (cell_frac 12)")
    for parallel in (False, True):
        for reverse in (False, True):
            f = K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, sig_pieces=p.sig.pieces,
                                 tanh_pieces=p.tanh.pieces, tanh_c_pieces=p.tanh_c.pieces,
                                 target=AVX512_TARGET, isa="avx512_vnni", w7=True, packed=True,
                                 parallel=parallel, reverse=reverse, init_state=True, pwl_fold=fold,
                                 pwl_bins=shifts)
            k = _kernel(f, AVX512_TARGET)
            asm = (k or K.build_kernel(f, AVX512_TARGET)).module.inspect_source("asm")
            # the cell's table lookups: vpermd on zmm registers; the bins' 64-entry int16 lookups
            # (where a cell call has a block pair, H >= 32)
            assert any("vpermd" in l and "%zmm" in l for l in asm.splitlines())
            assert any(("vpermt2w" in l or "vpermi2w" in l) for l in asm.splitlines()) == (bins and H >= 32)
            if k is None:
                continue
            for workers in ((1, 2) if parallel else (1,)):
                # (2 workers where this process's pool can have them; the threaded zmm form on
                # 2 workers also runs guarded in test_guarded_buffers' child process)
                if not pool_size(workers):
                    continue
                for T_, B in ((1, 1), (4, 1), (3, 2), (2, 5), (2, 8)):
                    gx = rng.integers(-2**15, 2**15, (T_, B, 4 * H)).astype(np.int16)
                    gx[0, 0, :] = -2**15                 # saturating gate adds
                    gx[-1, B - 1, : 2 * H] = 2**15 - 1
                    h0 = rng.integers(-128, 128, (B, H)).astype(np.int8)
                    c0 = rng.integers(-2**15, 2**15, (B, H)).astype(np.int16)
                    c0[0, :4] = [-2**15, 2**15 - 1, 0, -1]
                    assert_lstm_equal(run_recurrent(f, k, p, gx, h0=h0, c0=c0),
                                      ref_recurrence(gx, p, reverse, h0, c0))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 16)
        self.lstm = torch.nn.LSTM(16, 21, num_layers=2, bidirectional=True)
        self.fc = torch.nn.Linear(42, 11)

    def forward(self, x):
        return self.fc(self.lstm(self.emb(x))[0])


@pytest.mark.parametrize("target", ["llvm -mcpu=x86-64-v3 -mattr=+avxvnni",
                                    "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni"])
def test_whole_model_vnni_8bit(target):
    """A stacked bidirectional model with the default 8-bit weights on the VNNI families (x86_vnni,
    avx512_vnni): every GEMM takes the u8 route (vpdpbusd, no vpmaddubsw) and the module equals
    the reference."""
    torch.manual_seed(5)
    net = _Net().eval()
    g = torch.Generator().manual_seed(6)
    calib = [torch.randint(0, 30, (9, 3), generator=g) for _ in range(2)]
    q = til.quantize(net, calib)
    cm = til.compile(q, target=target, example_inputs=(calib[0],), verbose=False)
    from test_fast_kernels import _library_asm
    asm = _library_asm(cm.executable)
    assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
    if not RUNNABLE[target]:
        return
    for T_, B in ((1, 1), (7, 2), (4, 17)):
        x = torch.randint(0, 30, (T_, B), generator=g)
        np.testing.assert_array_equal(cm(x.numpy()), q(x).numpy())


# --- the AMX family: opt-in, its permission, the whole model -------------------------------------

class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def test_amx_is_opt_in():
    """AMX targets keep avx512_vnni unless asked (compile(kernels="amx") / isa.prefer); asking on a
    target without AMX is a clear error naming the features."""
    spr = parse_target(AMX_TARGET)
    assert K.isa.pick(spr).name == "avx512_vnni"
    assert K.isa.family("amx") in K.isa.supported(spr)
    with K.isa.prefer("amx"):
        assert K.isa.pick(spr).name == "amx" and K.resolve_isa(spr) == "amx"
        with pytest.raises(ValueError, match="'amx' needs AMX-TILE and AMX-INT8.*sapphirerapids"):
            K.isa.pick(parse_target("llvm -mcpu=znver5"))
    assert K.isa.pick(spr).name == "avx512_vnni"          # the preference ends with the block
    with K.isa.prefer("avx2"):                            # any supported family can be asked for
        assert K.isa.pick(spr).name == "avx2"
    with pytest.raises(ValueError, match="isa must be one of"):
        with K.isa.prefer("amx2"):
            pass
    torch.manual_seed(0)
    q = til.quantize(_Head().eval(), [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="'amx' needs AMX-TILE.*-mcpu=sapphirerapids"):
        til.compile(q, target="llvm -mcpu=znver5", example_inputs=(torch.randn(2, 8),),
                    kernels="amx", verbose=False)
    import tempfile

    from tvm_intlstm.cli import main as cli_main
    with tempfile.TemporaryDirectory() as d:
        til.save_quantized(q, f"{d}/q.qpt")
        with pytest.raises(SystemExit, match="error: kernel family 'amx' needs AMX-TILE"):
            cli_main(["compile", f"{d}/q.qpt", "--example-shape", "2,8", "--target",
                      "llvm -mcpu=znver5", "--kernels", "amx", "-o", f"{d}/m.so"])


def test_amx_permission_once_per_process(monkeypatch):
    """The permission is asked from the OS once per process; where it is refused (this machine, if
    its CPU has no AMX) the answer says why and what to do, and calling an AMX kernel raises that
    clear AMXUnavailableError instead of dying with SIGILL."""
    from tvm_intlstm.runtime import amx

    calls = []
    real = amx._arch_prctl
    monkeypatch.setattr(amx, "_arch_prctl", lambda code, arg: calls.append(code) or real(code, arg))
    monkeypatch.setattr(amx, "_answer", None)
    first = amx.amx_permission_answer()
    n = len(calls)
    assert calls[0] == amx.ARCH_REQ_XCOMP_PERM and n >= 1
    assert amx.amx_permission_answer() == first and len(calls) == n     # asked once
    if HOST_AMX:
        assert first == "", f"this CPU has AMX but the OS refused it: {first}"
        amx.request_amx_permission()
        print("\nAMX permission granted by the OS")
        return
    assert "refused this process the AMX tile state" in first and "SIGILL" in first
    assert 'without kernels="amx"' in first
    with pytest.raises(AMXUnavailableError, match="ARCH_REQ_XCOMP_PERM"):
        amx.request_amx_permission()
    # an AMX kernel for a target with the features (deployed elsewhere) refuses to run here
    f = K.linear_i32(64, 32, isa="amx", packed=True)
    k = K.build_kernel(f, "llvm -mcpu=znver5 -mattr=+amx-tile,+amx-int8")
    assert k.amx
    with pytest.raises(AMXUnavailableError, match="refused"):
        k()
    print(f"\nAMX permission refused here, as expected: {first}")


@pytest.mark.parametrize("fam,target", [("amx", AMX_TARGET), ("amx", AMX_TRAP_TARGET),
                                        ("amx_emulated", "llvm -mcpu=x86-64-v4 -mattr=+avx512vnni")])
def test_whole_model_amx(fam, target):
    """The stacked bidirectional model compiled with kernels="amx": the LSTM input projections and
    the head take the tile kernels (the recurrent steps stay on vpdpbusd), the module is marked as
    needing the AMX permission, and it equals the reference where it runs (amx on an AMX CPU;
    amx_emulated, the same kernels with emulated tiles, here)."""
    torch.manual_seed(5)
    net = _Net().eval()
    g = torch.Generator().manual_seed(6)
    calib = [torch.randint(0, 30, (9, 3), generator=g) for _ in range(2)]
    q = til.quantize(net, calib)
    cm = til.compile(q, target=target, example_inputs=(calib[0],), verbose=False, kernels=fam)
    from test_fast_kernels import _library_asm
    asm = _library_asm(cm.executable)
    assert cm.amx == (fam == "amx")
    tiled = [f for f in cm.ir_module.functions.values()
             if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
             and "intlstm.wpack" in f.attrs and int(f.attrs["intlstm.wpack"]) == AMX_PACK]
    assert len(tiled) >= 3          # the input projections (two layers) and the head
    assert ("tdpbssd" in asm and "ldtilecfg" in asm) == (fam == "amx")
    assert "vpdpbusd" in asm        # the recurrent steps
    if fam == "amx":                # the exported module remembers that it needs the permission
        import json
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = cm.export_library(f"{d}/m.so")
            assert json.load(open(path + ".json"))["amx"] is True
            if not RUNNABLE[target]:    # refused before the library is mapped: no SIGILL
                with pytest.raises(til.target.TargetError, match="amx-int8"):
                    til.load(path)
                return
            assert til.load(path).amx
    for T_, B in ((1, 1), (7, 2), (4, 17), (12, 3)):
        x = torch.randint(0, 30, (T_, B), generator=g)
        np.testing.assert_array_equal(cm(x.numpy()), q(x).numpy())


def test_recurrent_bins_promise_checked():
    """A kernel compiled with `pwl_bins` for one set of tables, called with tables whose knots do
    not fit those bins (tables replaced after compiling), fails with an error naming the fix, not a
    wrong answer. Compiled only where the CPU lacks AVX-512 VNNI."""
    H = 32
    rng = np.random.default_rng(7)
    p = make_lstm(rng, H, 12, w_h=_full_range_weights(rng, 4 * H, H), cell_frac=12)
    shifts = tuple(K.pwl_bin_shift(K.pack_pwl(t)) for t in (p.sig, p.tanh, p.tanh_c))
    f = K.lstm_recurrent(H, mo=p.mo, so=p.so, cell_frac=p.cell_frac, target=AVX512_TARGET,
                         isa="avx512_vnni", w7=True, packed=True, pwl_fold=True, pwl_bins=shifts)
    assert int(f.attrs["intlstm.pwl_bins"]) == 3
    k = _kernel(f, AVX512_TARGET)
    if k is None:
        return
    gx = rng.integers(-2**15, 2**15, (2, 2, 4 * H)).astype(np.int16)
    assert_lstm_equal(run_recurrent(f, k, p, gx), ref_recurrence(gx, p))
    from tvm_intlstm.quant.pwl import fit_pwl
    dense = dataclasses.replace(p, tanh_c=fit_pwl("tanh", 16, 10))   # two knots in a bin
    with pytest.raises(Exception, match="compile the model again"):
        run_recurrent(f, k, dense, gx)
