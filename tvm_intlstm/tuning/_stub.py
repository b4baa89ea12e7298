"""`fast_tensor_intrin()`: while active, `tvm.s_tir.tensor_intrin` is an empty package (see _ms's
module doc for why). A leaf module: the intrinsic registrations of gemm.py and x86_wide.py use it
without importing the MetaSchedule plumbing of _ms."""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types

_TI = "tvm.s_tir.tensor_intrin"


@contextlib.contextmanager
def fast_tensor_intrin():
    """Make `import tvm.s_tir.tensor_intrin` a no-op for the duration (see module doc)."""
    if _TI in sys.modules:
        yield
        return
    spec = importlib.util.find_spec(_TI)
    stub = types.ModuleType(_TI, "tvm_intlstm stub: backend intrinsics not imported")
    stub.__path__ = list(spec.submodule_search_locations or [])
    stub.__spec__ = spec
    stub.__file__ = spec.origin
    stub.__tvm_intlstm_stub__ = True
    sys.modules[_TI] = stub
    import tvm.s_tir as s_tir_pkg  # pylint: disable=import-outside-toplevel

    had_attr = hasattr(s_tir_pkg, "tensor_intrin")
    old_attr = getattr(s_tir_pkg, "tensor_intrin", None)
    s_tir_pkg.tensor_intrin = stub
    try:
        yield
    finally:
        if sys.modules.get(_TI) is stub:
            del sys.modules[_TI]
            # submodules imported through the stub stay importable on their own
            if had_attr:
                s_tir_pkg.tensor_intrin = old_attr
            elif getattr(s_tir_pkg, "tensor_intrin", None) is stub:
                delattr(s_tir_pkg, "tensor_intrin")
