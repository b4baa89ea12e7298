"""The spec's fixed formats are defined once (tvm_intlstm/spec.py): the reference, the PyTorch
integer ops and the kernels use that module's values, and no other module defines its own."""
from __future__ import annotations

import re
from pathlib import Path

import tvm_intlstm
from tvm_intlstm import spec

NAMES = ("PWL_FRAC", "GATE_FRAC", "LN_FRAC", "SOFTMAX_IN_FRAC", "PROB_FRAC", "INT8", "INT16",
         "INT32", "LN16_MAX_EPS")
PKG = Path(tvm_intlstm.__file__).parent


def test_no_module_redefines_a_spec_constant():
    pat = re.compile(rf"^\s*({'|'.join(NAMES)})\s*=", re.M)
    offenders = [f"{p.relative_to(PKG)}: {m.group(1)}" for p in PKG.rglob("*.py")
                 if p.name != "spec.py" for m in pat.finditer(p.read_text())]
    assert not offenders, offenders


def test_every_layer_sees_the_same_values():
    from tvm_intlstm.kernels import _tir, norm
    from tvm_intlstm.nn import intops
    from tvm_intlstm.reference import ops
    for mod in (ops, intops, _tir, norm):
        for name in NAMES:
            if hasattr(mod, name):
                assert getattr(mod, name) == getattr(spec, name), (mod.__name__, name)
    assert ops.PWL_FRAC == _tir.PWL_FRAC == intops.PWL_FRAC == 14
