"""x86 AVX512-VNNI on 512-bit vectors: the x86_vnni family with its GEMM step widened to zmm, one
vpdpbusd per 64 multiply-adds (16 int32 lanes = two adjacent 8-channel vectors of the packed
layout, whose 64 weight bytes per k quad are contiguous). Packing, the u8 correction, the cell and
the threaded form are unchanged; the cell of the serial forms runs on 16-unit zmm blocks. CPUs that run zmm at full
width (Zen 5) or double-pumped (Zen 4) or on two ports (Xeon Ice Lake / Sapphire Rapids) all halve
the step's instruction count; `-mattr=-avx512vnni` falls back to x86_vnni (ymm) where AVX-VNNI
exists."""
from tvm import tirx

from .. import _x86
from .._tir import lanes_of
from . import register
from .x86_vnni import X86VNNI


class AVX512VNNI(X86VNNI):
    name = "avx512_vnni"
    priority = 30
    requires = "AVX512-VNNI with AVX-512 F/BW/VL"
    example_target = "llvm -mcpu=icelake-server"
    vec_lanes = 16
    # 32 zmm registers: recurrent row tiles of 4 batch rows x 2 zmm accumulators where the batch is
    # a multiple of 4 (whole 256->512 model at batch 8 on a Zen 5 core: 0.80x the time of 2-row
    # tiles; 8-row tiles were faster in the kernel alone but 1.29x slower in the compiled model,
    # not explained yet: perhaps as its 1 KiB accumulator tile is no longer a stack buffer)
    rec_rows4 = True
    # the serial forms' cells (one worker: batch > 1 steps) on 16-unit zmm blocks
    cell_lanes = 16
    # linear kernels / input projections: 6 rows x 4 vectors of 8 channels (12 zmm accumulators):
    # 256->2048 over 512 rows 1099 -> 618 us (870 GOP/s), 650->2624 over 280 rows 1895 -> 1004 us
    # on a Zen 5 core (8 x 4 is as fast; 4 x 4 0.63x, the default 4 x 2 1.0x)
    lin_tile = (6, 4)

    def supports(self, f) -> bool:
        return f.has_avx512 and f.has_avx512vl and f.has_vnni

    def outer_step(self, acc, xb, w, u8: bool):
        if u8 and lanes_of(acc) == 16:
            return _x86.vpdpbusd(acc, tirx.reinterpret("int8x64", xb), w)
        return super().outer_step(acc, xb, w, u8)


AVX512_VNNI = register(AVX512VNNI())
