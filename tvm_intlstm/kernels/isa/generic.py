"""The generic family: plain TIR loop nests that LLVM vectorizes for any target (and the
fallback where no other family applies)."""
from . import KernelFamily, register


class Generic(KernelFamily):
    name = "generic"
    priority = 0


GENERIC = register(Generic())
