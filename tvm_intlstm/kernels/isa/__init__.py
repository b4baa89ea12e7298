"""Kernel families: which micro-kernel a target gets, answered in one place.

A family is one file of this package holding one `KernelFamily` object: its feature predicate on
`tvm_intlstm.target.TargetFeatures` (the one feature object of a target), what its micro-kernels
need (an int16 or uint8 copy of the activations, packed weights, the u8 correction) and its
multiply-accumulate step. The kernel generators, the lowering passes and tuning ask the family
object instead of comparing instruction-set names:

    family            file            picked when the target has          GEMM step
    generic           generic.py      anything                            plain TIR, LLVM vectorizes
    avx2              avx2.py         AVX2                                vpmaddwd (int16 pairs);
                                                                          vpmaddubsw for 7-bit weights
    avx512_vnni       avx512_vnni.py  AVX512-VNNI + F/BW/VL               vpdpbusd zmm (64 per instruction)
    x86_vnni          x86_vnni.py     AVX-VNNI, or AVX512-VNNI + VL       vpdpbusd ymm (u8 x s8, any int8 W)
    neon_dotprod      neon_dotprod.py aarch64 dotprod                     sdot (smmla with i8mm)
    amx (opt-in)      amx.py          AMX-INT8 + avx512_vnni's features   tdpbssd tiles (linear GEMMs, the
                                                                          recurrent product at >= 8 rows),
                                                                          else avx512_vnni's

`pick(target)` returns the supported family of highest priority, leaving out the opt-in ones
(`KernelFamily.opt_in`: the AMX family, whose speed waits for a run on AMX hardware) unless the
caller asked for one with `prefer(name)` (what `compile(..., kernels=name)` does); `family(name)`
looks one up by the name kernels carry in their `intlstm.isa` attribute. Adding a family: a new
file here defining a subclass and calling `register(...)`, imported at the end of this module
(docs/compiler.md, "How to add a kernel family").
"""
from __future__ import annotations

import contextlib
import contextvars

_FAMILIES: dict[str, "KernelFamily"] = {}


class KernelFamily:
    """Defaults describe the generic family; subclasses override what their micro-kernels change."""

    name = "generic"
    priority = 0            # among the families a target supports, the highest wins
    arch: str | None = None  # "x86_64" / "aarch64": the family only applies to that architecture
    dot = "generic"         # dot-form micro-kernel of `_gemm.gemm_macro`: generic | vpmaddwd | sdot
    outer = False           # has the packed outer-product GEMM (`_gemm.gemm_outer_macro`)
    x86_cell = False        # the recurrent kernel's AVX2 cell (vpermd table lookups, 8-unit blocks)
    unit_block = 1          # the recurrent kernel pads its units to a multiple of this
    threaded = False        # has the threaded recurrent form (one parallel launch per call)
    vec_lanes = 8           # int32 lanes of the outer-product GEMM's step on the u8 route (8: ymm)
    lin_tile = None         # (rows, 8-channel vectors) of the packed linear register tile, None:
                            # linear.LIN_NR x LIN_OV
    cell_lanes = 8          # units per vector of the x86 cell in the serial forms (16: zmm, vpermd
                            # on 16 lanes holds a 16-piece table in one register)
    rec_rows4 = False       # recurrent GEMM (batch > 1) also in 4-row register tiles (taken when 4
                            # divides the batch; else 2-row tiles): needs 32 vector registers
    tiles = False           # packed linear kernels (linear layers, LSTM input projections) use AMX
                            # tiles (`_gemm.gemm_amx_macro`, s8 x s8: no u8 route, no correction)
    opt_in = False          # never picked by default: only under `prefer(name)` / compile(kernels=)
    tiles_emulated = False  # the tile kernels' instructions replaced by plain TIR (layout checks)

    requires = "nothing"    # the target features `supports` asks for, in words (error messages)
    example_target = "llvm"

    def supports(self, f) -> bool:
        """Can a target with `TargetFeatures` f run this family's kernels?"""
        return True

    # --- the u8 x s8 route: u = x + 128 against int8 weights, -128 rowsum(W) added back --------
    def u8_exact(self, W) -> bool:
        """Is the family's u8 x s8 micro-kernel exact for the int8 weights W (numpy [O, K])?
        False: the family has no u8 route (or not for these weights)."""
        return False

    def u8_route(self, w7: bool, packed: bool) -> bool:
        """Does a kernel generated with `w7` (the caller checked `u8_exact(W)`) and `packed` take the
        u8 route (uint8 source, correction -128 rowsum(W) in the bias / `corr`)?"""
        return bool(w7) and bool(packed) and self.outer and self._has_u8

    _has_u8 = False

    def outer_step(self, acc, xb, w, u8: bool):
        """acc (int32x8) plus the products of the outer-product GEMM's step: xb the broadcast
        activations (uint8x32 on the u8 route, int16x16 else), w the int8x32 / int8x16 weights."""
        raise NotImplementedError(f"kernel family {self.name!r} has no outer-product GEMM")

    def mmla(self, target) -> bool:
        """Do packed linear kernels use aarch64 smmla for this target (i8mm)?"""
        return False

    def tuning_isa(self, u8: bool) -> str | None:
        """The MetaSchedule design space (tuning.gemm / tuning.x86_wide isa name) of a GEMM on
        this family's route, or None when such GEMMs are not tuned (the default kernel is used)."""
        return None

    def __repr__(self):
        return f"<kernel family {self.name}>"


def register(fam: KernelFamily) -> KernelFamily:
    if fam.name in _FAMILIES:
        raise ValueError(f"kernel family {fam.name!r} registered twice")
    _FAMILIES[fam.name] = fam
    return fam


def names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def family(name) -> KernelFamily:
    """The family called `name` (a KernelFamily is returned as it is)."""
    if isinstance(name, KernelFamily):
        return name
    try:
        return _FAMILIES[str(name)]
    except KeyError:
        raise ValueError(f"isa must be one of {names()}, got {name!r}") from None


_PICKED: dict[str, KernelFamily] = {}
# the family asked for by `prefer` (compile(..., kernels=name)) in this thread / task, or None
_PREFERRED: contextvars.ContextVar = contextvars.ContextVar("intlstm_kernel_family", default=None)


@contextlib.contextmanager
def prefer(name):
    """Within the block, `pick` returns the family `name` (any registered family, opt-in ones
    included) instead of the default choice, for targets that support it; for a target that does
    not, `pick` raises ValueError. `prefer(None)` restores the default choice. Per thread (a context
    variable), so a compile in one thread does not change another's."""
    fam = None if name is None else family(name)
    token = _PREFERRED.set(fam)
    try:
        yield fam
    finally:
        _PREFERRED.reset(token)


def check_supported(fam, target) -> KernelFamily:
    """`fam` (a family or name) if `target` can run it; else ValueError naming what it needs."""
    from .._target import as_target  # pylint: disable=import-outside-toplevel
    fam = family(fam)
    tgt = as_target(target)
    if fam not in supported(tgt):
        raise ValueError(f"kernel family {fam.name!r} needs {fam.requires}, which target {tgt} does "
                         f"not have; pick a target with it (e.g. {fam.example_target}) or another "
                         f"family (supported here: {', '.join(f.name for f in supported(tgt))})")
    return fam


def features(target):
    """`TargetFeatures` of a target, or None for a target that is not an llvm CPU target."""
    from ...target import target_features  # pylint: disable=import-outside-toplevel
    from .._target import as_target  # pylint: disable=import-outside-toplevel
    tgt = as_target(target)
    if tgt.kind.name != "llvm":
        return None
    return target_features(tgt)


def supported(target) -> list[KernelFamily]:
    """Every family a target can run, best first."""
    f = features(target)
    if f is None:
        return [_FAMILIES["generic"]]
    fams = [fam for fam in _FAMILIES.values()
            if (fam.arch is None or fam.arch == f.arch) and fam.supports(f)]
    return sorted(fams, key=lambda fam: -fam.priority)


def pick(target) -> KernelFamily:
    """The family whose kernels a target gets: the one `prefer` asked for (ValueError if the target
    cannot run it), else the supported family of highest priority that is not opt-in."""
    from .._target import as_target  # pylint: disable=import-outside-toplevel
    tgt = as_target(target)
    asked = _PREFERRED.get()
    if asked is not None:
        return check_supported(asked, tgt)
    key = str(tgt)
    if key not in _PICKED:
        _PICKED[key] = next(f for f in supported(tgt) if not f.opt_in)
    return _PICKED[key]


# the families (each file registers its object)
from . import generic, avx2, x86_vnni, avx512_vnni, amx, neon_dotprod  # noqa: E402,F401  pylint: disable=wrong-import-position
