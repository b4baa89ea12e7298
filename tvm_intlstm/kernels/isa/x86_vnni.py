"""x86 VNNI on 256-bit vectors: vpdpbusd (AVX-VNNI's VEX form, or AVX512-VNNI's EVEX form with
AVX512-VL) adds four u8 x s8 products into each int32 lane with no intermediate saturation, so the
u8 route u = x + 128 with the correction -128 rowsum(W) is exact for full-range int8 weights: one
instruction per 32 multiply-adds where AVX2 needs three (vpmaddubsw, vpmaddwd, vpaddd) and only for
7-bit weights. Everything else (packing, the int16 route where the folded bias would leave int32,
the cell) is the AVX2 family's."""
from tvm import tirx

from .. import _x86
from . import register
from .avx2 import AVX2


class X86VNNI(AVX2):
    name = "x86_vnni"
    priority = 20
    requires = "AVX-VNNI, or AVX512-VNNI with AVX512-VL"
    example_target = "llvm -mcpu=alderlake"

    def supports(self, f) -> bool:
        return f.has_avx2 and (f.has_avxvnni or (f.has_vnni and f.has_avx512vl))

    def u8_exact(self, W) -> bool:
        return True

    def outer_step(self, acc, xb, w, u8: bool):
        if u8:
            return _x86.vpdpbusd(acc, tirx.reinterpret("int8x32", xb), w)
        return super().outer_step(acc, xb, w, u8)

    def tuning_isa(self, u8: bool) -> str | None:
        # u8 route: the o8k4 block kernel tensorized with vpdpbusd ymm (tuning.x86_wide); the int16
        # route (rare: a folded bias out of int32) is AVX2's
        return "x86_vnni_u8" if u8 else "avx2"


X86_VNNI = register(X86VNNI())
