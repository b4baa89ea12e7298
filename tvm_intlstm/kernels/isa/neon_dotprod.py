"""aarch64 with the dot product extension: sdot (four int8 x int8 products into each int32 lane,
exact); packed linear kernels use smmla (2x8 by 8x2 int8 matrix multiply-accumulate) when the
target also has i8mm."""
from . import KernelFamily, register


class NeonDotprod(KernelFamily):
    name = "neon_dotprod"
    priority = 10
    arch = "aarch64"
    dot = "sdot"
    requires = "aarch64 with dotprod"
    example_target = "rpi5"

    def supports(self, f) -> bool:
        return f.has_dotprod

    def mmla(self, target) -> bool:
        from .._target import has_feature  # pylint: disable=import-outside-toplevel
        return target is not None and has_feature(target, "i8mm")


NEON_DOTPROD = register(NeonDotprod())
