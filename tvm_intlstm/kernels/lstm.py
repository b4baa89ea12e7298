"""The fused recurrent LSTM direction (spec 8) with the time loop inside the kernel.

The input projection gx = requantize_16(W_x x_t + b, Mx, sx) does not depend on h, so it is
computed for all T*B rows at once by `linear_requant(I, 4H, "int16")` before this kernel; this
kernel runs the recurrence:

    for each step t (0..T-1, or T-1..0 with reverse=True; y[t] is written at t):
        gh    = requantize_16(W_h h, Mh, sh)                 (int8 x int8 -> int32, per row)
        z     = add_sat_16(gx[t], gh)
        i,f,o = pwl(sig, z_i / z_f / z_o),  g = pwl(tanh, z_g)
        c     = sat_16(rshift_round(f c, 15) + rshift_round(i g, 30 - F_c))
        h     = requantize_8(o * pwl(tanh_c, c), Mo, so)

Baked constants: Mo, so and F_c (cell_frac). They are per-layer compile-time constants like the
shapes; baking them turns the cell shifts into immediates, keeps the kernel signature all-tensor
(relax.call_tir takes tensors) and costs nothing since each layer's kernel is specialized on its
sizes and table sizes anyway. Per-row constants (Mh, sh) and the PWL tables are buffers, so QAT
can change them without a rebuild.

PWL tables are packed int32 [3, n+1] (`pack_pwl`): row 0 the knots k_0..k_n, row 1 the bases
v_0..v_{n-1} (+ one padding 0), row 2 the slopes a_0..a_{n-1} (+ one padding 0).

Schedule, serial form: per step the gate product is the shared `_gemm` micro-kernel (dot form on
W_h's natural layout, 8 rows per tile; vpmaddwd on AVX2, after sign-extending h into an int16
scratch; sdot on aarch64 with dotprod; plain vectorizable TIR otherwise), with the requantize and
gate add fused as its epilogue into an int16 gate scratch z [B, 4H] (packed AVX2 weights: the
outer-product form, gx[t] prefetched while the products run); then the cell block runs vectorized
over j: on AVX2 with tables of <= 16 pieces, piece index by binary search and table lookups by
vpermd, two 8-channel blocks interleaved; elsewhere piece index by counting knots and gathers for
base/slope/knot. The state lives in the h_T / c_T output buffers.

Threaded form (parallel=True, the default where it applies: packed AVX2, H % 8 == 0, H >= 16,
tables of <= 16 pieces): W_h is packed gate-interleaved (`interleave_gates`: each 32-row channel
group holds the i, f, g, o rows of 8 units; gx, mh, sh and corr come in the same order, see
`gate_order`), so a group's products are followed at once by the
cells of its 8 units (`group_done` of the outer-product GEMM). The whole time loop runs inside one
parallel launch: every worker of TVM's thread pool walks the T steps, takes a contiguous range of
channel groups per step (the same range every step: its part of W_h stays in its core's L2), and a
barrier (`TVMBackendParallelBarrier`, a spin on a counter, ~0.5 us) ends each step. The new h is
written to the other half of a double-buffered GEMM source, so no worker overwrites what another
still reads. One launch per call instead of a fork/join per step (which cost more than it gained
on two cores). A pool of one worker (the kernel asks `runtime.NumThreads`): at batch 1 it walks
the groups zig-zag like the serial form (0.97x of the serial form's time per step); with several
batch rows it runs no launch and schedules each step as the serial form does, all products then
all cells (`step_solo`; the cells right after each group's products were ~4-9 % slower per batch-8
step). gx and the per-channel constants come in the interleaved order too, so the gate epilogue
reads one stream, not four. Two workers take ~0.55-0.6x as long per step at batch 1 and 8 on a
Zen 3 core pair (BENCHMARKS.md).

Families with 16-lane cells (`KernelFamily.cell_lanes`, AVX-512): the serial forms' cells (`step`,
`step_solo`) run on 16-unit zmm blocks, two interleaved, each 16-piece table one register (one
vpermd zmm per lookup, no blend), and a pool of one worker runs `step_solo` at batch 1 too (all
products, then all cells): on a Zen 5 core the 256->512 model at T=64 took 0.78 -> 0.65 ms at
batch 1 and 2.56 -> 2.44 ms at batch 8 (one thread), the per-group 8-unit cells being the slower
part at batch 1; the one-row GEMV's k steps split over two accumulator sets (`ksplit`; its two
dependent vpdpbusd chains, not the weight stream, had set the pace) then took batch 1 to 0.54 ms.
Where a cell call has two 16-unit blocks, their piece indices are searched together on 32 int16
lanes (`S16`: vpcmpgtw / vpermw, 38 % fewer cell instructions, -1.5 % per call at batch 1 and 8),
counting the knots in two rounds of independent compares (-2.8 % more at batch 8): the cell's time
follows its dependency chains more than its instruction count. Where the tables' knots allow it
(`pwl_bin_shift`: every fitted gate table, and the cell's tanh from cell_frac 12) the index comes
in one round from x's bin, two 64-entry int16 lookups and a compare (`pwl_bins`: batch 8 -3.9 %,
batch 1 -5.4 %, 256->512 T=64 on Zen 5).
The threaded form's parallel loop then runs over pairs of channel groups (`span=2`
of the GEMM macro), each pair's products followed by the cells of its 16 units on zmm blocks (two
workers: 3-7 % less time per call). `python benchmarks/bench_kernels.py --w7
--compare-serial [--batch 8] [--threads 2]` times the forms side by side.

Families with AMX tiles (`KernelFamily.tiles`: the opt-in amx family, and amx_emulated): the
recurrent product of a serial or one-worker step (`step`, `step_solo`) with at least
`AMX_REC_ROWS` batch rows runs on tiles (`_gemm.gemm_amx_macro` on an int8 copy of h), the other
steps on vpdpbusd as above; W_h then holds both layouts (`intlstm.tiles_rec`, docs/compiler.md).
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from . import isa as _isa
from ._common import (check_multiplier, check_pieces, check_shift, finish, requantizer, resolve_isa,
                      vec_split, without_params)
from ._gemm import (AMX_NR, ROW_TILE, amx_kp, amx_shape, amx_source_macro, gemm_amx_macro,
                    gemm_macro, gemm_outer_macro, outer_shape, padded_k, uses_u8, with_convention,
                    x16_source)

# Register tiles of the packed recurrent GEMV: 1 row x 4 x 8 channels for batch 1, 2 rows x 4 x 8
# for larger batches (the sign extension of the vpmaddwd route is then shared by two rows), or
# the family's 4-row tiles (`KernelFamily.rec_rows4`), all on the same packed layout (OV = 4).
REC_OV = 4
KSPLIT1 = 2     # accumulator sets of the one-row (batch 1) tiles, see _gemm.gemm_outer_macro
# Families with AMX tiles (`KernelFamily.tiles`, the opt-in amx family): the recurrent product of a
# step with at least this many batch rows runs on tiles (`_gemm.gemm_amx_macro`, 32-row blocks),
# fewer rows on vpdpbusd. A first guess, unmeasured: oneDNN finds AMX ~2x slower than VNNI below
# 4 rows, and a 32-row block at 8 rows uses a quarter of its products; to be set on an AMX CPU.
AMX_REC_ROWS = 8
from ._tir import PWL_FRAC, add_i32, add_sat16, pwl_index_vec, pwl_piece, rshift_round, sat


def pack_pwl(table) -> np.ndarray:
    """A `reference.ops.PWLTable` (or (knots, base, slope)) -> int32 [3, n+1] kernel table."""
    if hasattr(table, "knots"):
        knots, base, slope = table.knots, table.base, table.slope
    else:
        knots, base, slope = table
    knots = np.asarray(knots, dtype=np.int64)
    base = np.asarray(base, dtype=np.int64)
    slope = np.asarray(slope, dtype=np.int64)
    n = len(base)
    if len(knots) != n + 1 or len(slope) != n:
        raise ValueError("PWL table arrays have inconsistent lengths")
    out = np.zeros((3, n + 1), dtype=np.int32)
    out[0] = knots
    out[1, :n] = base
    out[2, :n] = slope
    return out


def interleave_gates(a, axis: int = 0) -> np.ndarray:
    """Gate channels (i, f, g, o blocks of H along `axis`, size 4H) -> the threaded form's order:
    channel 32 j + 8 g + l = gate g of unit 8 j + l (H % 8 == 0). For W_h ([4H, K], axis 0, before
    `_gemm.pack_outer`) and for gx / mh / sh / corr (the gate axis)."""
    a = np.moveaxis(np.asarray(a), axis, 0)
    G = a.shape[0]
    H = G // 4
    if G != 4 * H or H % 8:
        raise ValueError(f"gate interleaving needs 4H channels with H % 8 == 0, got {G}")
    out = a.reshape(4, H // 8, 8, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def gate_interleaved(func) -> bool:
    """Is `func` a recurrent kernel in the threaded form (attribute `intlstm.gate_interleave`)?"""
    attrs = func.attrs if func.attrs is not None else {}
    return "intlstm.gate_interleave" in attrs and bool(int(attrs["intlstm.gate_interleave"]))


def gate_order(func, a, axis: int = -1) -> np.ndarray:
    """`a` (gate channels along `axis`) in the channel order the recurrent kernel `func` reads its
    W_h rows, gx, mh, sh and corr in: `interleave_gates` for the threaded form, unchanged
    otherwise."""
    if gate_interleaved(func):
        return interleave_gates(a, axis % np.ndim(a))
    return np.asarray(a)


def pwl_foldable(table) -> bool:
    """Can the AVX2 cell evaluate this PWL table (spec 7) as (a_i x + c_i) >> 14 with
    c_i = 2^13 - a_i k_i + 2^14 v_i (int32, wrapping)? That equals v_i + rshift_round(a_i (x - k_i),
    14) exactly when a_i (x - k_i) + 2^13 + 2^14 v_i stays in int32 over the piece (x in
    [k_i, k_(i+1)]): then the intermediate wrap-around cancels. True for every fitted sigmoid /
    tanh table (|v| <= 2^15); spec 7 allows |v| up to 2^20, hence the check. `table`: a PWLTable
    or a packed int32 [3, n+1] array (`pack_pwl`)."""
    t = pack_pwl(table) if hasattr(table, "knots") else np.asarray(table)
    k, v, a = (t[r].astype(np.int64) for r in range(3))
    n = t.shape[1] - 1
    lo = 2**13 + 2**14 * v[:n]
    hi = lo + a[:n] * (k[1:] - k[:n])
    return bool(np.all(np.minimum(lo, hi) >= -(2**31)) and np.all(np.maximum(lo, hi) <= 2**31 - 1))


# bins of the one-round piece index of the 16-lane cells (`pwl_bin_shift`): two 32-entry int16
# tables per lookup (vpermt2w)
PWL_BINS = 64


def _knots(table) -> np.ndarray:
    t = pack_pwl(table) if hasattr(table, "knots") else np.asarray(table)
    return t[0].astype(np.int64)


def pwl_bin_shift(table):
    """The shift s that lets the 16-lane cells find this table's piece index (spec 7, i = #{j in
    1..n-1 : x >= k_j} for x clamped to [k_0, k_n]) in one round, or None. The clamped x falls in
    bin b = (x >> s) - (k_0 >> s) (arithmetic shifts); with s the least shift for which [k_0, k_n]
    spans at most PWL_BINS bins, every knot k_1..k_(n-1) at or below a bin's first value is counted
    for each x of the bin, so i = G[b] + [x >= K[b]] with G[b] the number of those and K[b] the
    bin's other knot, if it has at most one (knots past the bin's last value are never counted;
    `pwl_bin_tables`). None where a bin holds two: the cell then counts in two rounds. Every fitted
    table of this project's gate (in_frac 12) and cell tables passes with 64 bins (s = 10); a gate
    tanh fitted at in_frac 10 would not. `table`: a PWLTable or a packed int32 [3, n+1] array
    (`pack_pwl`)."""
    k = _knots(table)
    s = 0
    while (k[-1] >> s) - (k[0] >> s) >= PWL_BINS:
        s += 1
    return s if pwl_bin_tables(table, s)[2] <= 1 else None


def pwl_bin_tables(table, s: int):
    """(G, K) int64 [PWL_BINS] of `pwl_bin_shift` for shift s, as the kernel fills them per call
    (K[b] = 32767 where bin b holds no other knot: an int16 x never exceeds it), and the largest
    count of knots past a bin's first value (the kernel asserts it is at most 1)."""
    k = _knots(table)
    n = len(k) - 1
    st = ((k[0] >> s) + np.arange(PWL_BINS)) << s
    en = st + (1 << s) - 1
    kj = k[1:n][None, :]
    G = (kj <= st[:, None]).sum(1)
    inside = (kj > st[:, None]) & (kj <= en[:, None])
    K = np.where(inside, kj - 1, 32767).min(1)
    return G, K, int(inside.sum(1).max()) if n > 1 else 0


def recurrent_units(hidden: int, isa: str) -> int:
    """How many units the recurrent kernel of an LSTM with `hidden` units should run: on x86 the
    next multiple of 8 (the family's `unit_block`: the fast cell and the threaded form work on
    blocks of 8 units; a 650-unit step takes ~0.8x as long padded to 656 as unpadded), else
    `hidden`. See `pad_units`."""
    H = int(hidden)
    blk = _isa.family(isa).unit_block
    return (H + blk - 1) // blk * blk


def pad_units(a, hidden: int, units: int, axis: int = 0, fill: str = "zero") -> np.ndarray:
    """Pad the gate axis of `a` (4 blocks i, f, g, o of `hidden` channels, size 4 hidden) to 4 blocks
    of `units` channels: each gate's extra channels go after its own, zeros (fill="zero": weight
    rows, bias) or copies of the gate block's last channel (fill="edge": multipliers and shifts,
    which keeps a per-tensor scale per-tensor). With zero W_x and W_h rows and zero W_h columns, a
    padded unit never changes a real one (its h only meets zero weights); its outputs are dropped."""
    a = np.moveaxis(np.asarray(a), axis, 0)
    H, U = int(hidden), int(units)
    if a.shape[0] != 4 * H or U < H:
        raise ValueError(f"expected 4 x {H} gate channels padded to {U}, got {a.shape[0]}")
    g = a.reshape(4, H, *a.shape[1:])
    widths = [(0, 0), (0, U - H)] + [(0, 0)] * (g.ndim - 2)
    out = np.pad(g, widths, mode="edge" if fill == "edge" else "constant").reshape(4 * U, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def source_fill(H: int, u8: bool):
    """The macro fill(B, HT, SRC, row0) writing the recurrent GEMM's source rows row0 .. row0 + B
    from the state h (int8 [B, H]): u = h + 128 (uint8) on the u8 route, else h sign-extended
    (int16). (SRC's columns past H are the caller's zero padding.)"""
    JO, JV = vec_split(H, 8)

    @T.macro
    def fill(B, HT, SRC, row0):
        for b, jo in T.grid(B, JO):
            for jv in T.vectorized(JV):
                if u8:
                    SRC[row0 + b, jo * JV + jv] = T.Cast("uint8", T.Cast("int32", HT[b, jo * JV + jv]) + 128)
                else:
                    SRC[row0 + b, jo * JV + jv] = T.Cast("int16", HT[b, jo * JV + jv])
    return fill


def gemv_outer_macro(H: int, G: int, isa: str, u8: bool, **kw):
    """The recurrent product's one-row (batch 1) tile on the packed layout (`_gemm.gemm_outer_macro`
    with NR = 1, OV = REC_OV; kw: parallel, span): two accumulator sets over k (`ksplit`: a one-row
    tile has few accumulators, and their chains of dependent multiply-adds, not the weight stream,
    set the pace), and a software prefetch of W_h only where the step is narrower than zmm (with the
    k steps split, the zmm families' prefetches only took load slots on a Zen 5 core, 256->512 at
    batch 1 -4 % on one worker, -11 % on two, the LM's 1.7 MiB W_h unchanged; the AVX2 family keeps
    them, neutral on that core and measured as helping on Zen 3). Used by this kernel and the
    LN-LSTM's."""
    return gemm_outer_macro(H, G, isa, u8, NR=1, OV=REC_OV, ksplit=KSPLIT1,
                            prefetch_w=_isa.family(isa).vec_lanes != 16, **kw)


def check_direction(hidden: int, mo: int, so: int, cell_frac: int, pieces: tuple) -> tuple:
    """(H, mo, so, F, piece counts) of a recurrent direction (spec 8 / 8b), checked."""
    H = int(hidden)
    if H <= 0:
        raise ValueError(f"hidden size must be positive, got {H}")
    return (H, check_multiplier(mo), check_shift(so, 1, 62), check_shift(cell_frac, 0, 15),
            tuple(check_pieces(n) for n in pieces))


def recurrent_kernel(H: int, w_shape, pieces: tuple, direction, init_state: bool = True,
                     corr: bool = True, layer_norm: bool = False):
    """The PrimFunc of a recurrent direction kernel (spec 8 / 8b), G = 4 H, T and B symbolic:

        gx int16 [T, B, G], w_h int8 w_shape, mh, sh int32 [G], corr int32 [G],
        gam_h int16 [4, H], bet_h int64 [4, H], gam_c int16 [1, H], bet_c int64 [1, H],
        sig, tanh, tanh_c int32 [3, n + 1] (n: `pieces`), h0 int8 [B, H], c0 int16 [B, H],
        y int8 [T, B, H] (out), h_T int8 [B, H] (out), c_T int16 [B, H] (out),

    keeping corr (the u8 correction) if `corr`, the layer norms' gamma / beta if `layer_norm` and
    h0, c0 if `init_state`. The macro `direction` takes T, B and all these buffers, in this order,
    and writes y, h_T and c_T. One signature serves the LSTM and the layer-norm LSTM kernels."""
    G = 4 * H
    n_sig, n_tanh, n_tc = pieces

    @T.prim_func
    def recurrent(gx_h: T.handle, wh_h: T.handle, mh_h: T.handle, sh_h: T.handle,
                  corr_h: T.handle, gh_h: T.handle, bh_h: T.handle, gc_h: T.handle,
                  bc_h: T.handle, sig_h: T.handle, tanh_h: T.handle, tanhc_h: T.handle,
                  h0_h: T.handle, c0_h: T.handle, y_h: T.handle, hT_h: T.handle,
                  cT_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        TT = T.int64()
        B = T.int64()
        GX = T.match_buffer(gx_h, (TT, B, G), "int16")
        WH = T.match_buffer(wh_h, w_shape, "int8")
        MH = T.match_buffer(mh_h, (G,), "int32")
        SH = T.match_buffer(sh_h, (G,), "int32")
        CORR = T.match_buffer(corr_h, (G,), "int32")
        GAMH = T.match_buffer(gh_h, (4, H), "int16")
        BETH = T.match_buffer(bh_h, (4, H), "int64")
        GAMC = T.match_buffer(gc_h, (1, H), "int16")
        BETC = T.match_buffer(bc_h, (1, H), "int64")
        SIG = T.match_buffer(sig_h, (3, n_sig + 1), "int32")
        TANH = T.match_buffer(tanh_h, (3, n_tanh + 1), "int32")
        TANHC = T.match_buffer(tanhc_h, (3, n_tc + 1), "int32")
        H0 = T.match_buffer(h0_h, (B, H), "int8")
        C0 = T.match_buffer(c0_h, (B, H), "int16")
        Y = T.match_buffer(y_h, (TT, B, H), "int8")
        HT = T.match_buffer(hT_h, (B, H), "int8")
        CT = T.match_buffer(cT_h, (B, H), "int16")
        direction(TT, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, H0, C0,
                  Y, HT, CT)

    unused = ((() if corr else ("CORR",)) + (() if layer_norm else ("GAMH", "BETH", "GAMC", "BETC"))
              + (() if init_state else ("H0", "C0")))
    return without_params(recurrent, *unused)


def lstm_recurrent(hidden: int, *, mo: int, so: int, cell_frac: int, sig_pieces: int = 16,
                   tanh_pieces: int = 16, tanh_c_pieces: int = 16, reverse: bool = False,
                   init_state: bool = False, target=None, isa: str | None = None,
                   w7: bool = False, packed: bool = False, shift_hi: bool = False,
                   gate_scale: tuple | None = None, parallel: bool = True,
                   pwl_fold: bool = False, pwl_bins: tuple | None = None):
    """PrimFunc of one LSTM direction's recurrence (spec 8). With G = 4 * hidden:

    Parameters (destination passing; T, B symbolic int64):
        gx    int16 [T, B, G]       input gates, requantize_16(W_x x + b, Mx, sx)
        w_h   int8  [G, H]          (packed=True on AVX2: `_gemm.pack_outer(w_h, u8, REC_OV)`,
                                     see `kernels.prepare_weights`)
        mh    int32 [G], sh int32 [G]
        corr  int32 [G]             read only on the u8 route (`uses_u8(isa, w7, packed)`; w7=True
                                     promises |w_h| <= 64): _gemm.u8_correction(w_h); zeros
                                     elsewhere (`kernels.prepare_weights` returns the right one)
        sig   int32 [3, sig_pieces + 1]      (gate sigmoid, in_frac 12)
        tanh  int32 [3, tanh_pieces + 1]     (gate tanh, in_frac 12)
        tanh_c int32 [3, tanh_c_pieces + 1]  (cell tanh, in_frac = cell_frac)
        h0    int8  [B, H], c0 int16 [B, H]  (only with init_state=True; else zeros)
        y     int8  [T, B, H]   (out)
        h_T   int8  [B, H]      (out)
        c_T   int16 [B, H]      (out)

    shift_hi=True promises every sh[o] is in [32, 62] (`_tir.requantize_hi`); gate_scale=(M, s)
    promises every (mh[o], sh[o]) is (M, s) (per-tensor quantization) and bakes them in as
    immediates (mh / sh stay parameters but are not read); gate_scale=(None, s) bakes only the
    shift (per-channel multipliers, one shift: what the quantizer produces).

    parallel=True (the default) on the packed AVX2 route with H % 8 == 0, H >= 16 and tables of
    <= 16 pieces: the threaded form (module doc). Its gate channels are then gate-interleaved
    (attribute `intlstm.gate_interleave`): W_h's rows (`kernels.prepare_weights` does it, and
    returns corr in that order) and the channel axis of gx, mh and sh (`gate_order(func, a)`; the
    compiler permutes the input projection's rows so that it writes gx in that order).
    parallel=False keeps the serial form (one thread whatever the pool size).

    pwl_fold=True promises `pwl_foldable` of all three tables: the AVX2 cell (tables of <= 16
    pieces) then evaluates each PWL as (a x + c) >> 14 from two table lookups (slope, and c with the
    knot, base and rounding folded in, computed per call from the tables) instead of three plus a
    subtraction and the rounding add.

    pwl_bins=(s_sig, s_tanh, s_tanh_c), the `pwl_bin_shift` of the three tables, promises that
    the knots of the tables with a shift (not None) allow the one-round piece index: the 16-lane
    cells then find it from xc's bin (two table lookups, one compare) instead of two rounds of
    compares, for the gates where both gate tables have a shift and for the cell's tanh where its
    table has one. The bin tables are filled from the table inputs at each call, and a call whose
    tables break the promise (tables replaced after compiling) fails with an error naming the fix.
    """
    H, mo, so, F, (n_sig, n_tanh, n_tc) = check_direction(
        hidden, mo, so, cell_frac, (sig_pieces, tanh_pieces, tanh_c_pieces))
    G = 4 * H
    isa = resolve_isa(target, isa)
    fam = _isa.family(isa)
    u8 = uses_u8(isa, w7, packed)
    wide = x16_source(isa, u8)
    fast_pwl = fam.x86_cell and H % 8 == 0 and max(n_sig, n_tanh, n_tc) <= 16
    # the threaded form: a channel group of the packed W_h (REC_OV * 8 = 32 rows) holds the i, f, g,
    # o rows of 8 units, so whoever computes a group's products can also update its units' cells
    # (at least two groups: a parallel loop of one iteration is simplified away, and codegen then
    # rejects the launch point around it)
    fused = bool(parallel) and packed and fam.threaded and fast_pwl and REC_OV == 4 and H >= 16
    # tile steps (AMX_REC_ROWS): serial steps and the threaded form's one-worker steps (step_solo)
    tiles = bool(packed) and fam.tiles and fam.outer
    # the threaded form of a family with 16-lane cells: its parallel loop runs over pairs of channel
    # groups (16 units), each pair's products followed by their cells on zmm blocks
    P16 = fused and fam.cell_lanes == 16 and H % 16 == 0 and H >= 32   # (two pairs at least)
    span = 2 if P16 else 1
    gemm_tiles = fill_tiles = None
    if packed and fam.outer:
        # The multi-row tiles of the families with 32 vector registers (`rec_rows4`: AVX-512) keep
        # two accumulator sets over k (`ksplit`): a 4-row tile's 8 zmm accumulators are 8 chains
        # of dependent vpdpbusd, too few to keep two multiply-adds per cycle in flight (as the one
        # row GEMV's two were, KSPLIT1). 256->512 T=64 on Zen 5, one thread: batch 8 -7 %, batch 2
        # -13 %.
        KS_ROWS = 2 if fam.rec_rows4 else 1
        # one row per batch element, W_h streamed once per step: 1 row x 8 x 8 channels
        WS = outer_shape(H, G, u8, REC_OV)
        HP = WS[1] * WS[3]      # the source is zero padded to the packed k extent
        gemm = gemv_outer_macro(H, G, isa, u8, parallel=fused, span=span)
        # the 2-row tile re-reads each channel group from L1: no software prefetch of W_h (it
        # only took issue slots; batch-8 step -3 to -8 % on one worker, -2.6 % on two)
        gemm2 = gemm_outer_macro(H, G, isa, u8, NR=2, OV=REC_OV, parallel=fused,
                                 prefetch_w=False, span=span, ksplit=KS_ROWS)
        # the threaded form's steps on a pool of one worker with several batch rows (step_solo)
        gemm2_solo = gemm_outer_macro(H, G, isa, u8, NR=2, OV=REC_OV,
                                      prefetch_w=False, ksplit=KS_ROWS) if fused else None
        # ... and at batch 1 where the cell is 16 lanes wide (C16): all products, then all cells
        gemm1_solo = gemv_outer_macro(H, G, isa, u8) if fused else None
        # 4-row tiles where the family has the registers (the 32 zmm of AVX-512): more rows share
        # each weight load. Taken when 4 divides the batch (a tile's missing rows would be computed
        # anyway); gemm4p is the threaded form's (cells still per group, 2 rows at once)
        gemm4, gemm4p = (gemm_outer_macro(H, G, isa, u8, NR=4, OV=REC_OV, parallel=par,
                                          prefetch_w=False, span=span if par else 1,
                                          ksplit=KS_ROWS)
                         if fam.rec_rows4 else None
                         for par in (False, fused))
        outer = True
        if tiles:
            # W_h in both layouts, one flat int8 buffer: the vpdpbusd one (WS, first) for steps of
            # fewer than AMX_REC_ROWS rows, then the tile one (`_gemm.pack_amx`) for the others
            # (`kernels.prepare_weights`); s8 x s8 tiles take no correction
            n_outer = int(np.prod(WS))
            WS = (n_outer + int(np.prod(amx_shape(H, G))),)
            gemm_tiles = gemm_amx_macro(H, G, emulate=fam.tiles_emulated, w_offset=n_outer)
            fill_tiles = amx_source_macro(H)
    else:
        WS = (G, H)
        HP = padded_k(H) if wide else H
        gemm = gemm_macro(H, G, isa)
        gemm2 = gemm
        gemm2_solo = gemm1_solo = gemm4 = gemm4p = None
        outer = False
    rows4, rows4p = gemm4 is not None, gemm4p is not None and fused
    JO, JV = vec_split(H, 8)
    ig_shift = 30 - F

    rq = requantizer(shift_hi, gate_scale)     # the gate products' requantize_16
    rq_out = requantizer(scale=(mo, so))       # h = requantize_8(o tanh(c)), constants baked

    # gx, mh, sh, corr and the GEMM's channels share one order (`gate_order`: natural, or
    # gate-interleaved in the threaded form), so the gate epilogue reads them contiguously
    def gate_store(Z, GX, MH, SH, CORR, tt, corr=u8):
        # the u8 route adds its correction; the others do not read CORR (nor do the tile steps:
        # tdpbssd's s8 x s8 sums need none)
        return lambda n, o, acc: tirx.BufferStore(
            Z, add_sat16(GX[tt, n, o], rq(add_i32(acc, CORR[o]) if corr else acc, MH[o], SH[o], 16)), [n, o])

    def gx_addr(GX, tt):
        return lambda n, o: tirx.address_of(GX[tt, n, o])

    # where the cell (8 lanes) finds block u of a call: batch row brow(u), units unit(u) .. + 8, gate g
    # at Z[brow(u), zcol(u, g) + jv]; valid(u) guards the state stores (row tails of a tile)
    def rows_fixed(b):
        return lambda u: b

    def units_natural(jp):
        return lambda u: (jp * U + u) * 8

    def zcol_natural(jp):
        return lambda u, g: g * H + (jp * U + u) * 8

    def zcol_interleaved(jp):
        return lambda u, g: (jp * U + u) * 32 + g * 8

    def valid_all():
        return lambda u: True

    def rows_tile(nb, nrows, NR_):
        return lambda u: tirx.min(nb * NR_ + u, nrows - 1)

    def units_tile(og):
        return lambda u: og * 8

    def zcol_tile(og):
        return lambda u, g: og * 32 + g * 8

    def valid_tile(nb, nrows, NR_):
        return lambda u: nb * NR_ + u < nrows

    def pwl_finish(XC, IDX, TBL, g, jv):
        """spec 7 once the clamped input XC and the piece index IDX are known."""
        return pwl_piece(TBL, IDX[g, jv], XC[g, jv])

    # AVX2 with tables of <= 16 pieces: the per-lane table reads (which LLVM scalarizes into
    # extract / load / insert, ~24 instructions per 8 lanes) become register lookups, two vpermd
    # of the table's halves and a blend on idx > 7. The tables are copied once per call into TV
    # [3 tables, 3 rows, 16] (padded by repeating the last column) so both halves are in bounds.
    U = 2 if fast_pwl and JO % 2 == 0 else 1
    # families with 16-lane cells (AVX-512): the serial forms' cells (`step`, `step_solo`) on
    # 16-unit zmm blocks, each table one register (vpermd zmm: no blend), U16 blocks interleaved
    C16 = fast_pwl and fam.cell_lanes == 16 and H % 16 == 0
    NB16 = H // 16
    U16 = 2 if C16 and NB16 >= 2 else 1
    PAIRS16, TAIL16 = NB16 // U16, NB16 % U16 == 1  # (a last single block when NB16 is odd)
    # tables of <= 8 pieces (QuantConfig(pwl_pieces=8)) fit one register: one vpermd per lookup, no
    # blend, and the binary search starts one level down (k_8 is never counted)
    small = max(n_sig, n_tanh, n_tc) <= 8
    fold = bool(pwl_fold) and fast_pwl

    def perm(L, tbl, idx):
        """vpermd on L = 8 (ymm) or 16 (zmm) int32 lanes: tbl[idx]."""
        if L == 16:
            return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.permvar.si.512", tbl, idx)
        return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.permd", tbl, idx)

    def vec(v, L):
        return tirx.Broadcast(tirx.const(v, "int32"), L)

    def pwl_vec(XC, IDX, TV, t, g, L):
        """pwl_finish for the L lanes of row g at once, table t of TV (fast_pwl only): on 8 lanes
        a table of up to 16 pieces is two registers (two vpermd and a blend, one for <= 8 pieces),
        on 16 lanes one."""
        idx = IDX[g, tirx.Ramp(0, 1, L)]
        x = XC[g, tirx.Ramp(0, 1, L)]

        def look(r):
            lo = perm(L, TV[t, r, tirx.Ramp(0, 1, L)], idx)
            if small or L == 16:
                return lo
            return tirx.Select(idx > vec(7, 8), perm(L, TV[t, r, tirx.Ramp(8, 1, 8)], idx), lo)

        if fold:   # TV row 1 holds c = 2^13 - a k + 2^14 v; the product and sum wrap (uint32)
            u = (tirx.Cast(f"uint32x{L}", look(2)) * tirx.Cast(f"uint32x{L}", x)
                 + tirx.Cast(f"uint32x{L}", look(1)))
            return sat(tirx.Cast(f"int32x{L}", u) >> vec(PWL_FRAC, L), 16)
        return sat(look(1) + rshift_round(look(2) * (x - look(0)), PWL_FRAC), 16)

    # fast_pwl piece index (spec 7: i = #{j in 1..n-1 : xc >= k_j}) by a 4-level binary search on
    # register tables instead of n - 1 compare-and-adds: the knots are sorted, so the counted set is
    # a prefix {1..i}, and bit by bit i = 8 b3 + 4 b2 + 2 b1 + b0 with b3 = [xc >= k_8],
    # b2 = [xc >= k_(8 b3 + 4)], ... Each level looks its knot up with one vpermd indexed by the bits
    # found so far. BS[t, level, 8] holds k_j - 1 (xc >= k_j <=> xc > k_j - 1, one vpcmpgtd) for
    # j = 8 (broadcast); 4, 12; 2, 6, 10, 14; 1, 3, .., 15; and 32767 for j >= n, which an int16 xc
    # never exceeds (those knots are not counted). (16-lane cells: rows of 16, lanes 8..15 never
    # indexed.)
    def bs_fill(BS, TBL, t, n, level, l):
        j = [8, 8 * (l % 2) + 4, 4 * (l % 4) + 2, 2 * l + 1][level]
        return tirx.BufferStore(BS, tirx.if_then_else(j <= n - 1, TBL[0, tirx.min(j, n)] - 1,
                                                      tirx.const(32767, "int32")), [t, level, l])

    def bs_level(BS, t, level, xc, p, L):
        k = perm(L, BS[t, level, tirx.Ramp(0, 1, L)], p)
        return p * vec(2, L) + tirx.Cast(f"int32x{L}", xc > k)

    # scratch of the serial forms' cells: rows (4 per block) and lanes; binary-search rows
    SU, SW = (max(U, U16), 16) if C16 else (U, JV)
    BW = 16 if C16 else 8

    # 16-lane cells search pairs of blocks at once on 32 int16 lanes (S16): xc and the knots are
    # int16, so one vpcmpgtw / vpermw covers two blocks. The count is taken in two rounds of
    # independent compares instead of four dependent levels (the cell's time follows its chains):
    # q = 4 #{j in 4, 8, 12 : xc > k_j - 1}, then idx = q + #{m in 1, 2, 3 : xc > k_(q + m) - 1}
    # (the same knots and count as the search above; knots are sorted), each m's table of
    # k_(i + m) - 1 (i = 0..15; 32767 where i + m >= n) packed two int16 per word into row 4 + m of
    # BS (row 4 unused; k_4, k_8, k_12 - 1 are in the int32 rows 0 and 1). Against four levels:
    # -2.8 % per call at batch 8, -0.8 % at batch 1 (256->512 T=64, Zen 5).
    S16 = C16
    # ... and with pwl_bins the count is one round: i = G[b] + [xc > K[b] - 1] for the bin b of xc
    # (`pwl_bin_shift`), G and K 64-entry int16 tables (two vpermt2w), packed two per word into rows
    # 8-9 (G) and 10-11 (K - 1) of BS; row 12 word 0 holds the bin offset k_0 >> s. A shorter chain
    # and 5 instead of 16 instructions per 32 lanes.
    # (only where a cell call has a block pair: U16 == 2)
    BINS = (tuple(None if v is None else check_shift(v, 0, 15) for v in pwl_bins)
            if S16 and U16 == 2 and pwl_bins else (None,) * 3)
    BINS_G = BINS[0] is not None and BINS[1] is not None    # the gates' tables (sig, tanh)
    BINS_C = BINS[2] is not None                            # the cell's tanh

    def bin_shift16(t):   # (t: 2, or an expression of the unrolled gate: 0 or 1)
        if isinstance(t, int):
            sh = BINS[t]
        else:
            sh = BINS[0] if BINS[0] == BINS[1] else tirx.if_then_else(t == 1, BINS[1], BINS[0])
        return tirx.Broadcast(tirx.Cast("int16", sh), 32)

    def perm2w(BS, t, r, idx):   # 64-entry int16 lookup (rows r, r + 1 of BS; vpermt2w)
        return tirx.call_llvm_pure_intrin(
            "int16x32", "llvm.x86.avx512.vpermi2var.hi.512",
            tirx.reinterpret("int16x32", BS[t, r, tirx.Ramp(0, 1, 16)]), idx,
            tirx.reinterpret("int16x32", BS[t, r + 1, tirx.Ramp(0, 1, 16)]))

    def bin_holds(TBL, j, b, sh):   # k_j lies past the first value of bin b, within the bin
        first = ((TBL[0, 0] >> sh) + b) << sh
        return tirx.And(TBL[0, j] > first, TBL[0, j] <= first + ((1 << sh) - 1))

    @T.macro
    def fill_bins(BS, GK, OK, TBL, t, n, sh):
        # the bin tables of `pwl_bin_tables` from the table input, GK [3, 64] int32 scratch (G,
        # K - 1, the count of knots past the bin's first value); OK[0] stays 1 while the promise
        # of `pwl_bin_shift` holds
        # (vectorized over the bins: this runs once per call, also for one-step calls)
        OK[0] = OK[0] * T.Cast("int32", (TBL[0, n] >> sh) - (TBL[0, 0] >> sh) < PWL_BINS)
        for b in T.vectorized(PWL_BINS):
            GK[0, b] = 0
            GK[1, b] = 32767
            GK[2, b] = 0
        for j in range(1, n):
            for b in T.vectorized(PWL_BINS):
                GK[0, b] = GK[0, b] + T.Cast("int32", TBL[0, j] <= ((TBL[0, 0] >> sh) + b) << sh)
                GK[1, b] = T.Select(bin_holds(TBL, j, b, sh), T.min(GK[1, b], TBL[0, j] - 1), GK[1, b])
                GK[2, b] = GK[2, b] + T.Cast("int32", bin_holds(TBL, j, b, sh))
        for b in range(PWL_BINS):
            OK[0] = OK[0] * T.Cast("int32", GK[2, b] <= 1)
        for r, w in T.grid(2, PWL_BINS // 2):
            BS[t, 8 + 2 * r + w // 16, w % 16] = (GK[r, 2 * w] & 0xFFFF) | (GK[r, 2 * w + 1] << 16)
        BS[t, 12, 0] = TBL[0, 0] >> sh

    def bs_word16(BS, TBL, t, n, m, w):
        def ent(i):
            return tirx.if_then_else(i + m <= n - 1, TBL[0, tirx.min(i + m, n)] - 1,
                                     tirx.const(32767, "int32"))
        return tirx.BufferStore(BS, (ent(2 * w) & 0xFFFF) | (ent(2 * w + 1) << 16), [t, 4 + m, w])

    @T.macro
    def fill_bs(BS, TBL, t, n):
        for l in range(BW):
            bs_fill(BS, TBL, t, n, 0, l)
            bs_fill(BS, TBL, t, n, 1, l)
            bs_fill(BS, TBL, t, n, 2, l)
            bs_fill(BS, TBL, t, n, 3, l)
            if S16:
                bs_word16(BS, TBL, t, n, 1, l)
                bs_word16(BS, TBL, t, n, 2, l)
                bs_word16(BS, TBL, t, n, 3, l)

    def v16(v):
        return tirx.Broadcast(tirx.const(v, "int16"), 32)

    def gt16(X16, k16, v):
        return tirx.Select(X16[0, tirx.Ramp(0, 1, 32)] > k16, v16(v), v16(0))

    def knot16(BS, t, level, lane):   # a k_j - 1 of the int32 search rows, broadcast to int16x32
        return tirx.Broadcast(tirx.Cast("int16", BS[t, level, lane]), 32)

    def perm16(BS, t, m, Q):
        return tirx.call_llvm_pure_intrin(
            "int16x32", "llvm.x86.avx512.permvar.hi.512",
            tirx.reinterpret("int16x32", BS[t, 4 + m, tirx.Ramp(0, 1, 16)]), Q[1, tirx.Ramp(0, 1, 32)])

    @T.macro
    def bs_index16(X16, I16, BS, t, bins):
        """I16[0] = the piece index of the 32 int16 lanes X16[0] (two blocks), table t, in two
        rounds of independent compares: q = 4 #{j in 4, 8, 12 : xc >= k_j} (k_j - 1 from the int32
        search rows), then idx = q + #{m in 1, 2, 3 : xc >= k_(q + m)} (three lookups of row 4 + m
        of BS, k_(i + m) - 1 packed two int16 per word); with BINS in one (bin b in I16[1])."""
        if bins:
            I16[1, T.Ramp(0, 1, 32)] = ((X16[0, T.Ramp(0, 1, 32)] >> bin_shift16(t))
                                        - T.Broadcast(T.Cast("int16", BS[t, 12, 0]), 32))
            I16[0, T.Ramp(0, 1, 32)] = (perm2w(BS, t, 8, I16[1, T.Ramp(0, 1, 32)])
                                        + gt16(X16, perm2w(BS, t, 10, I16[1, T.Ramp(0, 1, 32)]), 1))
        else:
            if small:   # k_8, k_12 are never counted
                I16[1, T.Ramp(0, 1, 32)] = gt16(X16, knot16(BS, t, 1, 0), 4)
            else:
                I16[1, T.Ramp(0, 1, 32)] = (gt16(X16, knot16(BS, t, 1, 0), 4)
                                            + gt16(X16, knot16(BS, t, 0, 0), 4)
                                            + gt16(X16, knot16(BS, t, 1, 1), 4))
            I16[0, T.Ramp(0, 1, 32)] = (I16[1, T.Ramp(0, 1, 32)]
                                        + gt16(X16, perm16(BS, t, 1, I16), 1)
                                        + gt16(X16, perm16(BS, t, 2, I16), 1)
                                        + gt16(X16, perm16(BS, t, 3, I16), 1))

    def half16(V, h):
        """int32x16 of lanes 16 h .. 16 h + 15 of the int16x32 row V[0]."""
        return tirx.Cast("int32x16", tirx.Shuffle([V[0, tirx.Ramp(0, 1, 32)]], list(range(16 * h, 16 * h + 16))))

    @T.macro
    def bs_index(XC, IDX, BS, t, g, L):
        if small:   # b3 = 0; level 1's knot is k_4 for every lane
            IDX[g, T.Ramp(0, 1, L)] = T.Cast(f"int32x{L}", XC[g, T.Ramp(0, 1, L)] > T.Broadcast(BS[t, 1, 0], L))
        else:
            IDX[g, T.Ramp(0, 1, L)] = T.Cast(f"int32x{L}", XC[g, T.Ramp(0, 1, L)] > BS[t, 0, T.Ramp(0, 1, L)])
            IDX[g, T.Ramp(0, 1, L)] = bs_level(BS, t, 1, XC[g, T.Ramp(0, 1, L)], IDX[g, T.Ramp(0, 1, L)], L)
        IDX[g, T.Ramp(0, 1, L)] = bs_level(BS, t, 2, XC[g, T.Ramp(0, 1, L)], IDX[g, T.Ramp(0, 1, L)], L)
        IDX[g, T.Ramp(0, 1, L)] = bs_level(BS, t, 3, XC[g, T.Ramp(0, 1, L)], IDX[g, T.Ramp(0, 1, L)], L)

    # where the cell finds gate g of its block u (L units from unit(u)) in Z: zval(u, g), an L-lane
    # int16 vector: 8 contiguous channels (z8), 16 (natural order, z16_natural) or the two 8-unit
    # halves of adjacent channel groups (gate-interleaved order, z16_interleaved / z16_pairs)
    def z8(Z, brow, zcol):
        return lambda u, g: Z[brow(u), tirx.Ramp(zcol(u, g), 1, 8)]

    def z16_natural(Z, b, q):   # (q: the first of the call's 16-unit blocks)
        return lambda u, g: Z[b, tirx.Ramp(g * H + (q + u) * 16, 1, 16)]

    def z16_pairs(Z, brow, blk):
        # gate g of the 16 units of channel-group pair blk(u), in the gate-interleaved order
        return lambda u, g: tirx.Shuffle(
            [Z[brow(u), tirx.Ramp(blk(u) * 64 + g * 8, 1, 8)],
             Z[brow(u), tirx.Ramp(blk(u) * 64 + 32 + g * 8, 1, 8)]], list(range(16)))

    def z16_interleaved(Z, b, q):   # blocks q, q + 1, ... of row b
        return z16_pairs(Z, rows_fixed(b), lambda u: q + u)

    def units16(q):
        return lambda u: (q + u) * 16

    @T.macro
    def cell(tt, L, brow, CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, UU, zval, unit, valid, SRC, nxt):
        """fast_pwl cell of UU blocks of L = 8 or 16 units: block u is batch row brow(u), units
        unit(u) .. + L, gates zval(u, g); valid(u) guards its state stores (row tails of a tile).
        The stages are written for all blocks at once because the chain of one block (clamp,
        index, lookups, cell, tanh(c), h) is long and serial (vpermd has a 4-5 cycle latency),
        and interleaving independent blocks lets the core overlap them (batch-8 cell 28-30 -> 23-27
        us; the binary search alone: no change). In the threaded form the new h also goes to SRC
        rows nxt + b."""
        if S16 and L == 16 and UU == 2:
            # two blocks on 32 int16 lanes: clamp and piece index per gate (S16 above)
            X16 = T.alloc_buffer((1, 32), "int16")
            I16 = T.alloc_buffer((2, 32), "int16")
            for g in T.unroll(4):   # sigmoid for i, f, o; tanh for g
                X16[0, T.Ramp(0, 1, 32)] = T.Shuffle([zval(0, g), zval(1, g)], list(range(32)))
                for jv in T.vectorized(32):
                    X16[0, jv] = T.max(T.min(X16[0, jv], T.Cast("int16", LIM[g, 1])),
                                       T.Cast("int16", LIM[g, 0]))
                bs_index16(X16, I16, BS, T.if_then_else(g == 2, 1, 0), BINS_G)
                XC[g, T.Ramp(0, 1, 16)] = half16(X16, 0)
                IDX[g, T.Ramp(0, 1, 16)] = half16(I16, 0)
                XC[4 + g, T.Ramp(0, 1, 16)] = half16(X16, 1)
                IDX[4 + g, T.Ramp(0, 1, 16)] = half16(I16, 1)
                for u in T.unroll(2):
                    ACT[u * 4 + g, T.Ramp(0, 1, 16)] = pwl_vec(XC, IDX, TV, T.if_then_else(g == 2, 1, 0),
                                                              u * 4 + g, 16)
        else:
            for u in T.unroll(UU):
                for g in T.unroll(4):   # z rows i, f, g, o
                    XC[u * 4 + g, T.Ramp(0, 1, L)] = T.Cast(f"int32x{L}", zval(u, g))
                    for jv in T.vectorized(L):
                        XC[u * 4 + g, jv] = T.max(T.min(XC[u * 4 + g, jv], LIM[g, 1]), LIM[g, 0])
            for u in T.unroll(UU):
                for g in T.unroll(4):   # sigmoid for i, f, o; tanh for g
                    bs_index(XC, IDX, BS, T.if_then_else(g == 2, 1, 0), u * 4 + g, L)
                    ACT[u * 4 + g, T.Ramp(0, 1, L)] = pwl_vec(XC, IDX, TV, T.if_then_else(g == 2, 1, 0),
                                                              u * 4 + g, L)
        for u in T.unroll(UU):
            # cell update, written to the state after its tanh input is taken
            for jv in T.vectorized(L):
                XC[u * 4, jv] = sat(rshift_round(ACT[u * 4 + 1, jv] * T.Cast("int32", CT[brow(u), unit(u) + jv]), 15)
                                    + rshift_round(ACT[u * 4, jv] * ACT[u * 4 + 2, jv], ig_shift), 16)
            if valid(u):
                for jv in T.vectorized(L):
                    CT[brow(u), unit(u) + jv] = T.Cast("int16", XC[u * 4, jv])
            for jv in T.vectorized(L):
                XC[u * 4, jv] = T.max(T.min(XC[u * 4, jv], LIM[4, 1]), LIM[4, 0])
        if S16 and L == 16 and UU == 2:
            C16S = T.alloc_buffer((1, 32), "int16")
            C16I = T.alloc_buffer((2, 32), "int16")
            C16S[0, T.Ramp(0, 1, 32)] = T.Cast("int16x32", T.Shuffle(
                [XC[0, T.Ramp(0, 1, 16)], XC[4, T.Ramp(0, 1, 16)]], list(range(32))))
            bs_index16(C16S, C16I, BS, 2, BINS_C)
            IDX[0, T.Ramp(0, 1, 16)] = half16(C16I, 0)
            IDX[4, T.Ramp(0, 1, 16)] = half16(C16I, 1)
            for u in T.unroll(2):
                ACT[u * 4 + 2, T.Ramp(0, 1, 16)] = pwl_vec(XC, IDX, TV, 2, u * 4, 16)   # tanh(c)
        else:
            for u in T.unroll(UU):
                bs_index(XC, IDX, BS, 2, u * 4, L)
                ACT[u * 4 + 2, T.Ramp(0, 1, L)] = pwl_vec(XC, IDX, TV, 2, u * 4, L)   # tanh(c)
        for u in T.unroll(UU):
            if valid(u):
                # (h as one vector expression: its requantize works on the lanes' halves)
                HT[brow(u), T.Ramp(unit(u), 1, L)] = rq_out(
                    ACT[u * 4 + 3, T.Ramp(0, 1, L)] * ACT[u * 4 + 2, T.Ramp(0, 1, L)], mo, so, 8)
                for jv in T.vectorized(L):
                    Y[tt, brow(u), unit(u) + jv] = HT[brow(u), unit(u) + jv]
                    if fused:
                        if u8:
                            SRC[nxt + brow(u), unit(u) + jv] = T.Cast(
                                "uint8", T.Cast("int32", HT[brow(u), unit(u) + jv]) + 128)
                        else:
                            SRC[nxt + brow(u), unit(u) + jv] = T.Cast("int16", HT[brow(u), unit(u) + jv])

    # the threaded form's cells follow each channel group (8 units), or with P16 each pair of
    # groups (16 units, zmm): where their gates are in Z, which units they are
    GL = 16 if P16 else 8

    def group_z(Z, brow, og):
        return z16_pairs(Z, brow, lambda u: og) if P16 else z8(Z, brow, zcol_tile(og))

    def group_units(og):
        return (lambda u: og * 16) if P16 else units_tile(og)

    def make_cell_group(NR_):
        @T.macro
        def cell_group(og, nrows, a):
            # the threaded form's group_done: the cells of the group's (pair's) units in every row,
            # NR_ rows interleaved (after the whole group, not per row tile: consecutive cells then
            # overlap, -4 % per batch-8 step); a = (tt, Z, CT, HT, Y, TV, BS, LIM, SRC, nxt);
            # the scratch is per worker
            XCL = T.alloc_buffer((4 * NR_, GL), "int32")
            IDXL = T.alloc_buffer((4 * NR_, GL), "int32")
            ACTL = T.alloc_buffer((4 * NR_, GL), "int32")
            for nb in range((nrows + NR_ - 1) // NR_):
                cell(a[0], GL, rows_tile(nb, nrows, NR_), a[2], a[3], a[4], XCL, IDXL, ACTL, a[5],
                     a[6], a[7], NR_, group_z(a[1], rows_tile(nb, nrows, NR_), og),
                     group_units(og), valid_tile(nb, nrows, NR_), a[8], a[9])
        return cell_group

    cell_group1 = make_cell_group(1)
    cell_group2 = make_cell_group(2)

    fill_source = source_fill(H, u8)

    @T.macro
    def step_threaded(tt, B, GX, WH, MH, SH, CORR, Y, HT, CT, H16, Z, ACC, RED, TV, BS, LIM, t, solo):
        # the parallel group loop: per group its products, gate epilogue and the cells of its 8
        # units, whose new h also goes to the other half of the double-buffered source (step t
        # reads rows (t % 2) B ..); a pool of one worker (solo, batch 1 here: several rows take
        # step_solo) walks the groups zig-zag
        if B == 1:
            gemm(H16, (t % 2) * B, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt),
                 solo and t % 2 == 1, gx_addr(GX, tt), cell_group1,
                 (tt, Z, CT, HT, Y, TV, BS, LIM, H16, ((t + 1) % 2) * B), 8)
        elif rows4p and B % 4 == 0:
            gemm4p(H16, (t % 2) * B, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt), False,
                   gx_addr(GX, tt), cell_group2,
                   (tt, Z, CT, HT, Y, TV, BS, LIM, H16, ((t + 1) % 2) * B), 8)
        else:
            gemm2(H16, (t % 2) * B, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt), False,
                  gx_addr(GX, tt), cell_group2,
                  (tt, Z, CT, HT, Y, TV, BS, LIM, H16, ((t + 1) % 2) * B), 8)

    @T.macro
    def step_solo(tt, B, GX, WH, MH, SH, CORR, Y, HT, CT, H16, Z, ACC, RED, XC, IDX, ACT, TV, BS,
                  LIM, t, XT, CFT):
        # a step of the threaded form's layout (gate-interleaved channels, double-buffered source)
        # scheduled as the serial form: all products, then all cells, two 8-unit blocks
        # interleaved; with one worker and several batch rows this is faster than a group's cells
        # right after its products (batch 8: ~4 % per step), at batch 1 it is not
        if tiles and B >= AMX_REC_ROWS:
            fill_tiles(HT, XT, B)
            gemm_tiles(XT, 0, B, WH, CFT, RED, gate_store(Z, GX, MH, SH, CORR, tt, corr=False))
        elif rows4 and B % 4 == 0:
            gemm4(H16, (t % 2) * B, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt),
                  t % 2 == 1, gx_addr(GX, tt))
        else:
            if B == 1:
                gemm1_solo(H16, (t % 2) * B, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt),
                           t % 2 == 1, gx_addr(GX, tt))
            else:
                gemm2_solo(H16, (t % 2) * B, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt),
                       t % 2 == 1, gx_addr(GX, tt))
        if C16:
            for b, jp in T.grid(B, PAIRS16):
                cell(tt, 16, rows_fixed(b), CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, U16,
                       z16_interleaved(Z, b, jp * U16), units16(jp * U16), valid_all(), H16,
                       ((t + 1) % 2) * B)
            if TAIL16:
                for b in range(B):
                    cell(tt, 16, rows_fixed(b), CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, 1,
                           z16_interleaved(Z, b, PAIRS16 * U16), units16(PAIRS16 * U16), valid_all(),
                           H16, ((t + 1) % 2) * B)
        else:
            for b, jp in T.grid(B, JO // U):
                cell(tt, 8, rows_fixed(b), CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, U,
                     z8(Z, rows_fixed(b), zcol_interleaved(jp)), units_natural(jp), valid_all(), H16,
                     ((t + 1) % 2) * B)

    @T.macro
    def step(tt, B, GX, WH, MH, SH, CORR, SIG, TANH, TANHC, Y, HT, CT, H16, Z, ACC, RED, XC, IDX,
             ACT, TV, BS, LIM, XT, CFT):
        """One step of the serial forms."""
        if tiles and B >= AMX_REC_ROWS:
            fill_tiles(HT, XT, B)
            gemm_tiles(XT, 0, B, WH, CFT, RED, gate_store(Z, GX, MH, SH, CORR, tt, corr=False))
        else:
            if wide or u8:
                fill_source(B, HT, H16, 0)
            # (H16 is HT itself on the natural route; the u8 route is always packed, i.e. outer)
            if outer:
                if B == 1:
                    gemm(H16, 0, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt), tt % 2 == 1,
                         gx_addr(GX, tt))
                elif rows4 and B % 4 == 0:
                    gemm4(H16, 0, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt), tt % 2 == 1,
                          gx_addr(GX, tt))
                else:
                    gemm2(H16, 0, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt), tt % 2 == 1,
                          gx_addr(GX, tt))
            else:
                gemm(H16, 0, B, WH, ACC, RED, gate_store(Z, GX, MH, SH, CORR, tt))
        if C16:
            for b, jp in T.grid(B, PAIRS16):
                cell(tt, 16, rows_fixed(b), CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, U16,
                       z16_natural(Z, b, jp * U16), units16(jp * U16), valid_all(), H16, 0)
            if TAIL16:
                for b in range(B):
                    cell(tt, 16, rows_fixed(b), CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, 1,
                           z16_natural(Z, b, PAIRS16 * U16), units16(PAIRS16 * U16), valid_all(), H16, 0)
        elif fast_pwl:
            for b, jp in T.grid(B, JO // U):
                cell(tt, 8, rows_fixed(b), CT, HT, Y, XC, IDX, ACT, TV, BS, LIM, U,
                     z8(Z, rows_fixed(b), zcol_natural(jp)), units_natural(jp), valid_all(), H16, 0)
        else:
            for b, jo in T.grid(B, JO):
                # sigmoid of the i, f, o gates (rows 0, 1, 3 of z): ACT[0], ACT[1], ACT[2]
                for g in T.unroll(3):
                    for jv in T.vectorized(JV):
                        XC[g, jv] = T.max(T.min(T.Cast("int32", Z[b, (g + g // 2) * H + jo * JV + jv]),
                                                SIG[0, n_sig]), SIG[0, 0])
                        IDX[g, jv] = 0
                for q in T.unroll(1, n_sig):
                    for g in T.unroll(3):
                        for jv in T.vectorized(JV):
                            IDX[g, jv] = IDX[g, jv] + T.Cast("int32", XC[g, jv] >= SIG[0, q])
                for g in T.unroll(3):
                    for jv in T.vectorized(JV):
                        ACT[g, jv] = pwl_finish(XC, IDX, SIG, g, jv)
                # tanh of the g gate (rows 2): ACT[3]
                for jv in T.vectorized(JV):
                    XC[0, jv] = T.Cast("int32", Z[b, 2 * H + jo * JV + jv])
                pwl_index_vec(TANH, n_tanh, XC, IDX, 0, JV)
                for jv in T.vectorized(JV):
                    ACT[3, jv] = pwl_finish(XC, IDX, TANH, 0, jv)
                # cell update, written to the state after its tanh input is taken
                for jv in T.vectorized(JV):
                    XC[1, jv] = sat(rshift_round(ACT[1, jv] * T.Cast("int32", CT[b, jo * JV + jv]), 15)
                                    + rshift_round(ACT[0, jv] * ACT[3, jv], ig_shift), 16)
                    CT[b, jo * JV + jv] = T.Cast("int16", XC[1, jv])
                    XC[0, jv] = XC[1, jv]
                pwl_index_vec(TANHC, n_tc, XC, IDX, 0, JV)
                for jv in T.vectorized(JV):
                    HT[b, jo * JV + jv] = rq_out(ACT[2, jv] * pwl_finish(XC, IDX, TANHC, 0, jv),
                                                 mo, so, 8)
                    Y[tt, b, jo * JV + jv] = HT[b, jo * JV + jv]

    @T.macro
    def run(TT, B, GX, WH, MH, SH, CORR, SIG, TANH, TANHC, Y, HT, CT):
        Z = T.alloc_buffer((B, G), "int16")
        # (the largest register tile: 4 or 2 rows, or one row in KSPLIT1 accumulator sets)
        ACC = T.alloc_buffer((max(ROW_TILE, KSPLIT1 * REC_OV, (4 if fam.rec_rows4 else 2) * REC_OV), 8),
                             "int32")
        # (RED: unused by the outer-product GEMM, except as the second accumulator set of a tile
        # whose two sets would take ACC to 1 KiB, see _gemm.gemm_outer_macro)
        RED = T.alloc_buffer((max(ROW_TILE, 4 * REC_OV * 8 if fam.rec_rows4 else 0),), "int32")
        # the tile steps' int8 source (h zero padded to 32-row blocks and KP columns) and their C
        # tile scratch (4 KiB, apart from ACC: a 1 KiB ACC would leave the registers, see RED)
        XT = T.alloc_buffer((((B + AMX_NR - 1) // AMX_NR * AMX_NR if tiles else 1),
                             (amx_kp(H) if tiles else 1)), "int8")
        CFT = T.alloc_buffer((4 * 16 * 16 if tiles else 1,), "int32")
        XC = T.alloc_buffer((4 * SU, SW), "int32")
        IDX = T.alloc_buffer((4 * SU, SW), "int32")
        ACT = T.alloc_buffer((4 * SU, SW), "int32")
        LIM = T.alloc_buffer((5, 2), "int32")
        TV = T.alloc_buffer((3, 3, 16), "int32")
        BS = T.alloc_buffer((3, 13 if BINS_G or BINS_C else 8 if S16 else 4, BW), "int32")
        if fast_pwl:
            fill_bs(BS, SIG, 0, n_sig)
            fill_bs(BS, TANH, 1, n_tanh)
            fill_bs(BS, TANHC, 2, n_tc)
            if BINS_G or BINS_C:
                GK = T.alloc_buffer((3, PWL_BINS), "int32")
                OK = T.alloc_buffer((1,), "int32")
                OK[0] = 1
                if BINS_G:
                    fill_bins(BS, GK, OK, SIG, 0, n_sig, BINS[0])
                    fill_bins(BS, GK, OK, TANH, 1, n_tanh, BINS[1])
                if BINS_C:
                    fill_bins(BS, GK, OK, TANHC, 2, n_tc, BINS[2])
                assert OK[0] == 1, ("lstm_recurrent: a PWL table's knots no longer fit the bins this "
                                    "kernel was compiled for (pwl_bins); compile the model again "
                                    "with its current tables")
            for g in range(4):   # clamp bounds (k_0, k_n) of the gates' tables and the cell's
                LIM[g, 0] = T.if_then_else(g == 2, TANH[0, 0], SIG[0, 0])
                LIM[g, 1] = T.if_then_else(g == 2, TANH[0, n_tanh], SIG[0, n_sig])
            LIM[4, 0] = TANHC[0, 0]
            LIM[4, 1] = TANHC[0, n_tc]

            for r, c in T.grid(3, 16):
                TV[0, r, c] = SIG[r, T.min(c, n_sig)]
                TV[1, r, c] = TANH[r, T.min(c, n_tanh)]
                TV[2, r, c] = TANHC[r, T.min(c, n_tc)]
            if fold:   # row 1: c = 2^13 - a k + 2^14 v, in wrapping uint32 arithmetic
                for t, c in T.grid(3, 16):
                    TV[t, 1, c] = T.Cast("int32", T.Cast("uint32", TV[t, 1, c]) * T.uint32(16384)
                                         + T.uint32(8192)
                                         - T.Cast("uint32", TV[t, 2, c]) * T.Cast("uint32", TV[t, 0, c]))
        if fused:
            # source double buffer: rows [0, B) and [B, 2B)
            H16 = T.alloc_buffer((2 * B, HP), "uint8" if u8 else "int16")
            for b, kp in T.grid(2 * B, HP - H):
                H16[b, H + kp] = T.Cast(H16.dtype, 0)
            fill_source(B, HT, H16, 0)
            # the time loop runs once in every worker of the thread pool (one launch per call);
            # each step's group loop is split among them and ends with a barrier, since the next
            # step reads all of h. A pool of one worker with several batch rows runs step_solo
            # instead (no launch), and so does batch 1 where the cell is 16 lanes wide (C16); else
            # at batch 1 its one worker walks the groups zig-zag as the serial form does (-3 % per
            # step: a step starts where the previous one left W_h in L2)
            solo = T.call_packed("runtime.NumThreads", dtype="int32") == 1
            if solo and (B > 1 or C16):
                for t in range(TT):
                    if reverse:
                        step_solo(TT - 1 - t, B, GX, WH, MH, SH, CORR, Y, HT, CT, H16, Z, ACC, RED,
                                  XC, IDX, ACT, TV, BS, LIM, t, XT, CFT)
                    else:
                        step_solo(t, B, GX, WH, MH, SH, CORR, Y, HT, CT, H16, Z, ACC, RED, XC, IDX,
                                  ACT, TV, BS, LIM, t, XT, CFT)
            else:
                with T.attr(0, "pragma_parallel_launch_point", 1):
                    for t in range(TT):
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            if reverse:
                                step_threaded(TT - 1 - t, B, GX, WH, MH, SH, CORR, Y, HT, CT, H16, Z,
                                              ACC, RED, TV, BS, LIM, t, solo)
                            else:
                                step_threaded(t, B, GX, WH, MH, SH, CORR, Y, HT, CT, H16, Z, ACC,
                                              RED, TV, BS, LIM, t, solo)
        else:
            if wide:
                H16 = T.alloc_buffer((B, HP), "int16")
                for b, kp in T.grid(B, HP - H):
                    H16[b, H + kp] = T.int16(0)
            elif u8:
                H16 = T.alloc_buffer((B, HP), "uint8")  # u = h + 128, the u8 micro-kernel's source
                for b, kp in T.grid(B, HP - H):
                    H16[b, H + kp] = T.uint8(0)
            else:
                H16 = HT  # no scratch: the micro-kernel reads the int8 state directly
            for t in range(TT):
                if reverse:
                    step(TT - 1 - t, B, GX, WH, MH, SH, CORR, SIG, TANH, TANHC, Y, HT, CT, H16, Z, ACC, RED, XC, IDX, ACT, TV, BS, LIM, XT, CFT)
                else:
                    step(t, B, GX, WH, MH, SH, CORR, SIG, TANH, TANHC, Y, HT, CT, H16, Z, ACC, RED, XC, IDX, ACT, TV, BS, LIM, XT, CFT)

    # Without init_state the states start at zero. `corr` is always a parameter; only the u8 route
    # reads it (the others get zeros from `kernels.prepare_weights`).
    @T.macro
    def zero_state(B, HT, CT):
        for b, jo in T.grid(B, JO):
            for jv in T.vectorized(JV):
                HT[b, jo * JV + jv] = T.int8(0)
                CT[b, jo * JV + jv] = T.int16(0)

    @T.macro
    def copy_state(B, H0, C0, HT, CT):
        for b, jo in T.grid(B, JO):
            for jv in T.vectorized(JV):
                HT[b, jo * JV + jv] = H0[b, jo * JV + jv]
                CT[b, jo * JV + jv] = C0[b, jo * JV + jv]

    @T.macro
    def direction(TT, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, H0, C0,
                  Y, HT, CT):
        if init_state:
            copy_state(B, H0, C0, HT, CT)
        else:
            zero_state(B, HT, CT)
        run(TT, B, GX, WH, MH, SH, CORR, SIG, TANH, TANHC, Y, HT, CT)

    lstm_recurrent = recurrent_kernel(H, WS, (n_sig, n_tanh, n_tc), direction,
                                      init_state=init_state)
    func = with_convention(finish(lstm_recurrent, "lstm_recurrent", isa), isa, w7, packed, REC_OV)
    if tiles:   # W_h in both layouts (`kernels.prepare_weights`); the tiles need the AMX permission
        func = (func.with_attr("intlstm.tiles_rec", 1)
                .with_attr("intlstm.amx", int(not fam.tiles_emulated)))
    return (func.with_attr("intlstm.gate_interleave", int(fused)).with_attr("intlstm.pwl_fold", int(fold))
            .with_attr("intlstm.pwl_bins", int(BINS_G) + 2 * int(BINS_C)))
