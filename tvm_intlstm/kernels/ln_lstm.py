"""The recurrence of one layer-norm LSTM direction (docs/integer_spec.md 8b) as one PrimFunc.

The input side (gx = LN_x(requantize_16(W_x x)) per gate block, for all steps) is a batched GEMM
plus `norm.layer_norm16` before the call. Inside the time loop: the recurrent product of every
batch row (packed=True on x86: the kernel family's outer-product micro-kernel, `_gemm.gemm_outer_macro`,
on its u8 route where exact, requantized to int16 in its epilogue; else plain loops over the natural
[4H, H] layout), then per row its layer norm per gate block (`norm.ln16_row`), the PWL gates, the
cell and h on 8 units at once (piece index by counting knots, table reads as gathers), and the
cell's layer norm. The layer norms divide by a multiply and a shift, exact (norm.ln16_row), and
run on vectors. 128->256 at T=64, one Zen 5 core, the whole compiled model
(`benchmarks/ln_lstm_speed.py`): batch 1 1.37 -> 0.97 ms with the micro-kernel and the vectorized
gates, -> 0.29 ms with the layer norms' division so (15x the float module in PyTorch); batch 8
11.1 -> 7.5 -> 1.95 ms.
"""
from __future__ import annotations

from tvm.script import tirx as T

from tvm import tirx

from . import isa as _isa
from ._common import finish, resolve_isa, vec_split
from ._gemm import gemm_outer_macro, outer_shape, uses_u8, with_convention
from ._tir import add_i32, add_sat16, pwl_index_vec, pwl_piece, requantize, rshift_round, sat_cast
from .lstm import KSPLIT1, REC_OV, check_direction, gemv_outer_macro, recurrent_kernel, source_fill
from .norm import check_ln16, ln16_row


def ln_lstm_recurrent(hidden: int, *, mo: int, so: int, cell_frac: int, ln_h: tuple, ln_c: tuple,
                      sig_pieces: int = 16, tanh_pieces: int = 16, tanh_c_pieces: int = 16,
                      reverse: bool = False, target=None, isa: str | None = None,
                      w7: bool = False, packed: bool = False):
    """PrimFunc of one LN-LSTM direction's recurrence (spec 8b). With G = 4 * hidden:

    Parameters (destination passing; T, B symbolic int64):
        gx     int16 [T, B, G]     input gates after LN_x (Q3.12)
        w_h    int8  [G, H]        natural layout
        mh     int32 [G], sh int32 [G]        W_h h -> int16 at s_ah
        gam_h  int16 [4, H], bet_h int64 [4, H]   LN_h per gate block
        gam_c  int16 [1, H], bet_c int64 [1, H]   LN_c
        sig, tanh, tanh_c  int32 [3, n + 1]   (`lstm.pack_pwl`; all in_frac 12)
        h0     int8  [B, H], c0 int16 [B, H]
        y      int8  [T, B, H] (out), h_T int8 [B, H] (out), c_T int16 [B, H] (out)

    ln_h, ln_c: (Ml, sl, eps) of the two layer norms, baked like mo, so and cell_frac.

    packed=True on a family with the packed outer-product GEMM (x86): the recurrent product is
    that micro-kernel (`_gemm.gemm_outer_macro`, one row tile per batch row pair, W_h packed by
    `kernels.prepare_weights`), on the family's u8 route when `w7` (the caller checked
    `u8_exact(W_h)`; any int8 W_h on the VNNI families): the kernel then takes corr int32 [G]
    (the u8 correction, from prepare_weights) after sh. Else the plain loops below."""
    H, mo, so, F, (n_sig, n_tanh, n_tc) = check_direction(
        hidden, mo, so, cell_frac, (sig_pieces, tanh_pieces, tanh_c_pieces))
    G = 4 * H
    isa = resolve_isa(target, isa)
    fam = _isa.family(isa)
    outer = bool(packed) and fam.outer
    u8 = uses_u8(isa, w7, packed) if outer else False
    if outer:
        WS = outer_shape(H, G, u8, REC_OV)
        HP = WS[1] * WS[3]          # the GEMM source is zero padded to the packed k extent
        gemm1 = gemv_outer_macro(H, G, isa, u8)     # batch 1: the LSTM kernel's one-row tile
        # (two accumulator sets where the family has the registers, as the LSTM kernel's tiles)
        KS2 = 2 if fam.rec_rows4 else 1
        gemm2 = gemm_outer_macro(H, G, isa, u8, NR=2, OV=REC_OV, prefetch_w=False, ksplit=KS2)
    else:
        WS = (G, H)
        KS2 = 1
    _, mlh, slh, eh = check_ln16(H, *ln_h)
    _, mlc, slc, ec = check_ln16(H, *ln_c)
    ig_shift = 30 - F
    JO, JV = vec_split(H, 8)

    fill_source = source_fill(H, u8)

    def ah_store(AHF, MH, SH, CORR):
        # the GEMM epilogue: requantize_16 of row n's products (plus the u8 correction) into AH
        # (AHF: its flat view, channel o of row n at n G + o)
        return lambda n, o, acc: tirx.BufferStore(
            AHF, sat_cast(requantize(add_i32(acc, CORR[o]) if u8 else acc, MH[o], SH[o], 16), 16),
            [n * G + o])

    @T.macro
    def products(B, WH, MH, SH, CORR, HT, AH, SRC, ACCG, RED):
        # the recurrent product of every row (int32: |sum| < H 2^14 <= 2^26), requantized to int16
        # into AH [B, 4, H]: the family's micro-kernel, or plain loops over the natural layout
        if outer:
            AHF = T.decl_buffer((B * G,), "int16", data=AH.data)
            fill_source(B, HT, SRC, 0)
            if B == 1:
                gemm1(SRC, 0, B, WH, ACCG, RED, ah_store(AHF, MH, SH, CORR))
            else:
                gemm2(SRC, 0, B, WH, ACCG, RED, ah_store(AHF, MH, SH, CORR))
        else:
            for b, r in T.grid(B, G):
                ACCG[0, 0] = 0
                for k in range(H):
                    ACCG[0, 0] = ACCG[0, 0] + T.Cast("int32", WH[r, k]) * T.Cast("int32", HT[b, k])
                AH[b, r // H, r % H] = requantize(ACCG[0, 0], MH[r], SH[r], 16)

    @T.macro
    def step(t, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, Y, HT, CT,
             AH, GH, CN, CL, ACC, ISQ, OG, SRC, ACCG, RED, XV, IV, AV):
        products(B, WH, MH, SH, CORR, HT, AH, SRC, ACCG, RED)
        for b in range(B):
            # row b's products normalized per gate block
            for q in range(4):
                ln16_row(AH, GH, GAMH, BETH, b, q, H, mlh, slh, eh, ACC, ISQ)
            # the gates, the cell and h on JV units at once (piece index by counting knots, table
            # reads as gathers: the vectorizable form of spec 7)
            for jo in range(JO):
                for q in T.unroll(4):
                    for jv in T.vectorized(JV):
                        XV[q, jv] = T.Cast("int32", add_sat16(GX[t, b, q * H + jo * JV + jv],
                                                              GH[b, q, jo * JV + jv]))
                pwl_index_vec(SIG, n_sig, XV, IV, 0, JV)
                pwl_index_vec(SIG, n_sig, XV, IV, 1, JV)
                pwl_index_vec(TANH, n_tanh, XV, IV, 2, JV)
                pwl_index_vec(SIG, n_sig, XV, IV, 3, JV)
                for q in T.unroll(4):
                    for jv in T.vectorized(JV):
                        if q == 2:
                            AV[q, jv] = T.Cast("int32", pwl_piece(TANH, IV[q, jv], XV[q, jv]))
                        else:
                            AV[q, jv] = T.Cast("int32", pwl_piece(SIG, IV[q, jv], XV[q, jv]))
                # c = sat_16(rshift_round(f c, 15) + rshift_round(i g, 30 - F)), int32 (spec 8)
                for jv in T.vectorized(JV):
                    CT[b, jo * JV + jv] = sat_cast(
                        rshift_round(AV[1, jv] * T.Cast("int32", CT[b, jo * JV + jv]), 15)
                        + rshift_round(AV[0, jv] * AV[2, jv], ig_shift), 16)
                    CN[0, 0, jo * JV + jv] = CT[b, jo * JV + jv]
                    OG[jo * JV + jv] = AV[3, jv]
            ln16_row(CN, CL, GAMC, BETC, 0, 0, H, mlc, slc, ec, ACC, ISQ)
            for jo in range(JO):
                for jv in T.vectorized(JV):
                    XV[0, jv] = T.Cast("int32", CL[0, 0, jo * JV + jv])
                pwl_index_vec(TANHC, n_tc, XV, IV, 0, JV)
                for jv in T.vectorized(JV):
                    HT[b, jo * JV + jv] = requantize(
                        OG[jo * JV + jv] * T.Cast("int32", pwl_piece(TANHC, IV[0, jv], XV[0, jv])), mo, so, 8)
                    Y[t, b, jo * JV + jv] = HT[b, jo * JV + jv]

    @T.macro
    def direction(TT, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, H0, C0,
                  Y, HT, CT):
        AH = T.alloc_buffer((B, 4, H), "int16")    # every row's requantized products
        GH = T.alloc_buffer((B, 4, H), "int16")    # (ln16_row writes row n of X into row n)
        CN = T.alloc_buffer((1, 1, H), "int16")
        CL = T.alloc_buffer((1, 1, H), "int16")
        ACC = T.alloc_buffer((8,), "int64")   # ln16_row scratch
        ISQ = T.alloc_buffer((2,), "int64")
        XV = T.alloc_buffer((4, JV), "int32")
        IV = T.alloc_buffer((4, JV), "int32")
        AV = T.alloc_buffer((4, JV), "int32")
        OG = T.alloc_buffer((H,), "int32")
        # the packed GEMM's source and accumulator tile (ACCG[0, 0]: the plain loops' accumulator)
        SRC = T.alloc_buffer((B, HP if outer else 1), "uint8" if u8 else "int16")
        ACCG = T.alloc_buffer((max(2 * KS2, KSPLIT1) * REC_OV, 8), "int32")   # 2 rows, or 1 row, in k sets
        RED = T.alloc_buffer((8,), "int32")
        if outer:
            for b, k in T.grid(B, HP - H):
                SRC[b, H + k] = T.Cast(SRC.dtype, 0)
        for b, j in T.grid(B, H):
            HT[b, j] = H0[b, j]
            CT[b, j] = C0[b, j]
        for t in range(TT):
            if reverse:
                step(TT - 1 - t, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC,
                     Y, HT, CT, AH, GH, CN, CL, ACC, ISQ, OG, SRC, ACCG, RED, XV, IV, AV)
            else:
                step(t, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, Y, HT,
                     CT, AH, GH, CN, CL, ACC, ISQ, OG, SRC, ACCG, RED, XV, IV, AV)

    # the parameters of kernels/lstm.py's kernel plus the layer norms', the u8 correction only on
    # the u8 route
    ln_lstm_recurrent = recurrent_kernel(H, WS, (n_sig, n_tanh, n_tc), direction, corr=u8,
                                         layer_norm=True)
    func = finish(ln_lstm_recurrent, "ln_lstm_recurrent", isa)
    return with_convention(func, isa, u8, outer, REC_OV)
