"""What the block-form GEMM kernels of gemm.py (AVX2) and x86_wide.py (AVX-512 / VNNI) share: the
row padding, the sampled tile and unroll choices, and the requantizing epilogue. A leaf module, so
that neither kernel file imports the other for it."""
from __future__ import annotations

from ..kernels._common import requantizer
from ..kernels._tir import add_i32

ROW_PAD = 8        # the product's rows are padded to a multiple of this
NT_CHOICES = (1, 2, 4, 8)
UNROLL_CHOICES = (0, 16, 64, 512)


def requant_epilogue(out_dtype: str, scale: tuple | None = None):
    """The epilogue of the requantizing block kernels (gemm.gemm_blocks and
    `x86_wide.gemm_blocks_wide`):
    (acc, b, M, s buffers, channel o) -> requantize_N(acc + b[o], M[o], s[o]) (spec 5, 2), with
    `scale` baked in as for kernels.linear_requant and the sum written with `_tir.add_i32` (so the
    requantize stays one vpmuldq per 4 lanes). For out_dtype int32 the plain sum acc + b[o] (the
    requantizing function body is parsed for every dtype, though only returned for int8/int16)."""
    if out_dtype == "int32":
        return lambda acc, Bb, Mb, Sb, o: acc + Bb[o]
    rq = requantizer(False, scale)
    bits = int(out_dtype[3:])
    return lambda acc, Bb, Mb, Sb, o: rq(add_i32(acc, Bb[o]), Mb[o], Sb[o], bits)
