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

from ._common import check_multiplier, check_shift, finish
from ._tir import add_sat16, pwl_piece, requantize, rshift_round, sat_cast
from .norm import check_ln16, ln16_row


@T.macro
def _pwl_scalar(TBL, n, x, XC, IDX):
    """XC[0], IDX[0] = the clamped input and piece index of x for table TBL of n pieces (spec 7);
    the value is then pwl_piece(TBL, IDX[0], XC[0])."""
    XC[0] = T.max(T.min(T.Cast("int32", x), TBL[0, n]), TBL[0, 0])
    IDX[0] = 0
    for q in range(1, n):
        IDX[0] = IDX[0] + T.Cast("int32", XC[0] >= TBL[0, q])


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
    H = int(hidden)
    if H <= 0:
        raise ValueError(f"hidden size must be positive, got {H}")
    G = 4 * H
    mo = check_multiplier(mo)
    so = check_shift(so, 1, 62)
    F = check_shift(cell_frac, 0, 15)
    _, mlh, slh, eh = check_ln16(H, *ln_h)
    _, mlc, slc, ec = check_ln16(H, *ln_c)
    n_sig, n_tanh, n_tc = int(sig_pieces), int(tanh_pieces), int(tanh_c_pieces)
    for n in (n_sig, n_tanh, n_tc):
        if not 1 <= n <= 64:
            raise ValueError(f"PWL piece counts must be in 1..64, got {n}")
    ig_shift = 30 - F

    @T.macro
    def gate(TBL, n, t, b, q, j, GX, GH, XC, IDX, GATE):
        # gate q of unit j: pwl(TBL, add_sat_16(gx, gh)) into GATE[q] (Q0.15 in int32)
        _pwl_scalar(TBL, n, add_sat16(GX[t, b, q * H + j], GH[0, q, j]), XC, IDX)
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
                _pwl_scalar(TANHC, n_tc, CL[0, 0, j], XC, IDX)
                HT[b, j] = requantize(OG[j] * T.Cast("int32", pwl_piece(TANHC, IDX[0], XC[0])),
                                      mo, so, 8)
                Y[t, b, j] = HT[b, j]

    @T.prim_func
    def ln_lstm_recurrent(gx_h: T.handle, wh_h: T.handle, mh_h: T.handle, sh_h: T.handle,
                          gh_h: T.handle, bh_h: T.handle, gc_h: T.handle, bc_h: T.handle,
                          sig_h: T.handle, tanh_h: T.handle, tanhc_h: T.handle,
                          h0_h: T.handle, c0_h: T.handle,
                          y_h: T.handle, hT_h: T.handle, cT_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        TT = T.int64()
        B = T.int64()
        GX = T.match_buffer(gx_h, (TT, B, G), "int16")
        WH = T.match_buffer(wh_h, (G, H), "int8")
        MH = T.match_buffer(mh_h, (G,), "int32")
        SH = T.match_buffer(sh_h, (G,), "int32")
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

    return finish(ln_lstm_recurrent, "ln_lstm_recurrent")
