"""The package's narrow doors: the numpy oracle (tvm_intlstm.reference, .ops) imports with neither
torch nor tvm (both blocked in a fresh interpreter), and the lazy top-level API still resolves."""
from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "tvm", "tvm_ffi"):
                raise ImportError(f"blocked: {name}")
            return None
    sys.meta_path.insert(0, _Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_reference_imports_without_torch_and_tvm():
    r = _run("""
        import numpy as np
        import tvm_intlstm
        import tvm_intlstm.reference as R
        from tvm_intlstm.reference import ops
        acc = np.array([2**31 - 1, -2**31, 5, -5], np.int64)
        out = ops.requantize(acc, np.full(4, 2**30, np.int32), np.full(4, 31, np.int32), 8)
        assert out[:2].tolist() == [127, -128] and out.dtype == np.int8, out   # saturation
        assert callable(R)       # tvm_intlstm.reference(qmodel): the package is callable
        from tvm_intlstm.opdefs import OPS, reference_ops   # the op declarations: no torch, no tvm
        assert "lstm_direction" in OPS
        assert reference_ops.rescale(np.array([100, -101], np.int8), 2**30, 31).tolist() == [50, -50]
        assert not any(m.split(".")[0] in ("torch", "tvm") for m in sys.modules)
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_blocking_is_real():
    """(The block works: the torch-side API fails to import under it.)"""
    r = _run("import tvm_intlstm; tvm_intlstm.quantize")
    assert r.returncode != 0 and "blocked" in r.stderr


def test_lazy_api_resolves():
    import tvm_intlstm as til
    for name in til.__all__:
        assert getattr(til, name) is not None, name
    assert "compile" in dir(til)
