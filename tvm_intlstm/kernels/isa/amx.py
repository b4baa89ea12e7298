"""x86 AMX-INT8 (opt-in): the linear GEMMs with many rows (each LSTM direction's input projection
over T*B rows, linear layers) on AMX tiles, and the recurrent product of the steps with at least
`lstm.AMX_REC_ROWS` batch rows (serial steps and the threaded form's one-worker steps; W_h is then
kept in both layouts); everything else (steps with fewer rows, the threaded form's multi-worker
steps, the cells, the natural-layout kernels) is the avx512_vnni family's.

`tdpbssd` multiplies a 16 x 64 int8 tile of activations by a 16 x 64 int8 tile of weights (16 k quads
x 16 channels x 4 bytes, the layout `_gemm.pack_outer` already has) and adds the sums of four s8 x s8
products into the 16 x 16 int32 tile: 1024 multiply-adds per instruction, exact, signed on both
sides, so there is no u = x + 128 route and no -128 rowsum(W) correction. The register block is
2 x 2 tiles (32 rows x 32 channels: two A tiles, two B tiles, four accumulators, all 8 tile
registers); K is padded with zeros to a multiple of 64 (weights at compile time, `_gemm.pack_amx`;
activations in the kernel's source copy, whose rows are also padded to 32 with zeros), which adds
only zero products. The tile configuration (palette 1, 8 tiles of 16 rows x 64 bytes) is loaded
with `ldtilecfg` by the kernel itself, in each channel group (so each worker of the threaded form
configures its own thread), and released with `tilerelease`. Linux lets a process use the tile
registers only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`:
`tvm_intlstm.runtime.amx.request_amx_permission` makes it once per process before the first AMX
kernel runs (kernels carry `intlstm.amx`), with a clear error where the OS refuses.

Opt-in (`opt_in`): picked only by `compile(..., kernels="amx")` / `isa.prefer("amx")`. Its machine
code runs bit-exact in the tests on any AVX-512 VNNI CPU, the tile instructions carried out by the
SIGILL-trap emulator (`runtime/amx_trap.py`; natively on an AMX CPU), but its speed against the
avx512_vnni kernels is unmeasured without AMX hardware: it becomes the default for AMX targets when
a benchmark on an AMX machine shows it faster (docs/compiler.md)."""
from . import register
from .avx512_vnni import AVX512VNNI


class AMXInt8(AVX512VNNI):
    name = "amx"
    priority = 40
    opt_in = True
    tiles = True
    # the register block of the tile kernel: 32 rows x 4 vectors of 8 channels (2 x 2 tiles of
    # 16 x 16 int32; the kernel's accumulator scratch is sized from it)
    lin_tile = (32, 4)
    requires = "AMX-TILE and AMX-INT8 with AVX512-VNNI and AVX-512 F/BW/VL"
    example_target = "llvm -mcpu=sapphirerapids"

    def supports(self, f) -> bool:
        return super().supports(f) and f.has_amx_int8

    def tuning_isa(self, u8: bool) -> str | None:
        # the tile kernel has no tuning space: tuned records (VNNI schedules) are not applied to its
        # GEMMs (`passes._lowering`), and `tune` keeps tuning the avx512_vnni family it picks
        return None


AMX = register(AMXInt8())


class AMXEmulated(AMXInt8):
    """The amx family's kernels with every tile instruction replaced by plain TIR loops that compute
    what the instruction set reference defines (`_gemm.gemm_amx_macro(emulate=True)`): the same
    addresses, packing, padding and epilogue, runnable on any AVX-512 VNNI CPU, so that the tests
    check the tile kernels' data layout bit for bit where no AMX CPU is at hand. Slow; never picked
    (opt-in) and not for models."""
    name = "amx_emulated"
    priority = 1
    tiles_emulated = True
    requires = "AVX512-VNNI with AVX-512 F/BW/VL (the tile instructions are emulated)"
    example_target = "llvm -mcpu=icelake-server"

    def supports(self, f) -> bool:
        return AVX512VNNI.supports(self, f)


AMX_EMULATED = register(AMXEmulated())
