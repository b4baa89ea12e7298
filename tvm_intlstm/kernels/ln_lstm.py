"""The recurrence of one layer-norm LSTM direction (docs/integer_spec.md 8b) as one PrimFunc.

The input side (gx = LN_x(requantize_16(W_x x)) per gate block, for all steps) is a batched GEMM
plus `norm.layer_norm16` before the call. Inside the time loop, per batch row: the recurrent
product (plain loops over the natural [4H, H] weight layout), its requantize to int16 and
layer norm per gate block (`norm.ln16_row`), the PWL gates, the cell, the cell's layer norm and
h. Written for correctness first (scalar PWL lookups, one row at a time): the AVX2 / VNNI
micro-kernels of kernels/lstm.py are not used here yet.
"""
from __future__ import annotations

from tvm.script import tirx as T

from ._common import finish
from ._tir import add_sat16, pwl_index_into, pwl_piece, requantize, rshift_round, sat_cast
from .lstm import check_direction, recurrent_kernel
from .norm import check_ln16, ln16_row


def ln_lstm_recurrent(hidden: int, *, mo: int, so: int, cell_frac: int, ln_h: tuple, ln_c: tuple,
                      sig_pieces: int = 16, tanh_pieces: int = 16, tanh_c_pieces: int = 16,
                      reverse: bool = False):
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

    ln_h, ln_c: (Ml, sl, eps) of the two layer norms, baked like mo, so and cell_frac."""
    H, mo, so, F, (n_sig, n_tanh, n_tc) = check_direction(
        hidden, mo, so, cell_frac, (sig_pieces, tanh_pieces, tanh_c_pieces))
    G = 4 * H
    _, mlh, slh, eh = check_ln16(H, *ln_h)
    _, mlc, slc, ec = check_ln16(H, *ln_c)
    ig_shift = 30 - F

    @T.macro
    def gate(TBL, n, t, b, q, j, GX, GH, XC, IDX, GATE):
        # gate q of unit j: pwl(TBL, add_sat_16(gx, gh)) into GATE[q] (Q0.15 in int32)
        pwl_index_into(TBL, n, T.Cast("int32", add_sat16(GX[t, b, q * H + j], GH[0, q, j])),
                       XC, 0, IDX, 0)
        GATE[q] = T.Cast("int32", pwl_piece(TBL, IDX[0], XC[0]))

    @T.macro
    def step(t, B, GX, WH, MH, SH, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, Y, HT, CT,
             AH, GH, CN, CL, ACC, ACC32, ISQ, XC, IDX, GATE, OG):
        for b in range(B):
            # the recurrent product of row b (int32: |sum| < H 2^14 <= 2^26), requantized to
            # int16 and normalized per gate block
            for r in range(G):
                ACC32[0] = 0
                for k in range(H):
                    ACC32[0] = ACC32[0] + T.Cast("int32", WH[r, k]) * T.Cast("int32", HT[b, k])
                AH[0, r // H, r % H] = requantize(ACC32[0], MH[r], SH[r], 16)
            for q in range(4):
                ln16_row(AH, GH, GAMH, BETH, 0, q, H, mlh, slh, eh, ACC, ISQ)
            for j in range(H):
                gate(SIG, n_sig, t, b, 0, j, GX, GH, XC, IDX, GATE)
                gate(SIG, n_sig, t, b, 1, j, GX, GH, XC, IDX, GATE)
                gate(TANH, n_tanh, t, b, 2, j, GX, GH, XC, IDX, GATE)
                gate(SIG, n_sig, t, b, 3, j, GX, GH, XC, IDX, GATE)
                OG[j] = GATE[3]
                # c = sat_16(rshift_round(f c, 15) + rshift_round(i g, 30 - F)), int32 (spec 8)
                CT[b, j] = sat_cast(rshift_round(GATE[1] * T.Cast("int32", CT[b, j]), 15)
                                    + rshift_round(GATE[0] * GATE[2], ig_shift), 16)
                CN[0, 0, j] = CT[b, j]
            ln16_row(CN, CL, GAMC, BETC, 0, 0, H, mlc, slc, ec, ACC, ISQ)
            for j in range(H):
                pwl_index_into(TANHC, n_tc, T.Cast("int32", CL[0, 0, j]), XC, 0, IDX, 0)
                HT[b, j] = requantize(OG[j] * T.Cast("int32", pwl_piece(TANHC, IDX[0], XC[0])),
                                      mo, so, 8)
                Y[t, b, j] = HT[b, j]

    @T.macro
    def direction(TT, B, GX, WH, MH, SH, CORR, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, H0, C0,
                  Y, HT, CT):
        AH = T.alloc_buffer((1, 4, H), "int16")
        GH = T.alloc_buffer((1, 4, H), "int16")
        CN = T.alloc_buffer((1, 1, H), "int16")
        CL = T.alloc_buffer((1, 1, H), "int16")
        ACC = T.alloc_buffer((3,), "int64")
        ACC32 = T.alloc_buffer((1,), "int32")
        ISQ = T.alloc_buffer((2,), "int64")
        XC = T.alloc_buffer((1,), "int32")
        IDX = T.alloc_buffer((1,), "int32")
        GATE = T.alloc_buffer((4,), "int32")
        OG = T.alloc_buffer((H,), "int32")
        for b, j in T.grid(B, H):
            HT[b, j] = H0[b, j]
            CT[b, j] = C0[b, j]
        for t in range(TT):
            if reverse:
                step(TT - 1 - t, B, GX, WH, MH, SH, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, Y,
                     HT, CT, AH, GH, CN, CL, ACC, ACC32, ISQ, XC, IDX, GATE, OG)
            else:
                step(t, B, GX, WH, MH, SH, GAMH, BETH, GAMC, BETC, SIG, TANH, TANHC, Y, HT, CT,
                     AH, GH, CN, CL, ACC, ACC32, ISQ, XC, IDX, GATE, OG)

    # the parameters of kernels/lstm.py's kernel, less the u8 correction, plus the layer norms'
    ln_lstm_recurrent = recurrent_kernel(H, (G, H), (n_sig, n_tanh, n_tc), direction, corr=False,
                                         layer_norm=True)
    return finish(ln_lstm_recurrent, "ln_lstm_recurrent")
