"""x86 AVX2: vpmaddwd on int16 pairs (exact for every int8 input) and, for weights in [-64, 64]
(`QuantConfig(weight_bits=7)`), vpmaddubsw on u = x + 128 (u8 x s8 pair sums, which saturate in
int16 unless one operand fits 7 bits: |u0 w0 + u1 w1| <= 2 * 255 * 64 = 32640 < 32767)."""
from tvm import tirx

from .. import _x86
from . import KernelFamily, register

W7_MAX = 64       # |W| bound under which the u8 x s8 AVX2 kernel is exact (see above)
_ONES16 = tirx.Broadcast(tirx.const(1, "int16"), 16)


class AVX2(KernelFamily):
    name = "avx2"
    priority = 10
    arch = "x86_64"
    dot = "vpmaddwd"
    outer = True
    x86_cell = True
    unit_block = 8
    threaded = True
    _has_u8 = True
    requires = "x86-64 with AVX2"
    example_target = "llvm -mcpu=haswell"

    def supports(self, f) -> bool:
        return f.has_avx2

    def u8_exact(self, W) -> bool:
        import numpy as np  # pylint: disable=import-outside-toplevel
        W = np.asarray(W)
        return W.size > 0 and int(np.abs(W.astype(np.int32)).max()) <= W7_MAX

    def outer_step(self, acc, xb, w, u8: bool):
        if u8:   # vpmaddubsw pair sums, then vpmaddwd against ones -> int32 quad sums
            return acc + _x86.pmaddwd(_x86.pmaddubsw(xb, w), _ONES16)
        return acc + _x86.pmaddwd(tirx.Cast("int16x16", w), xb)

    def tuning_isa(self, u8: bool) -> str | None:
        return "avx2_w7" if u8 else "avx2"


AVX2_FAMILY = register(AVX2())
