"""Fast test of the SHIPPED integer char LM (examples/char_lm/model/charlm_qat.qpt).

Compiles it for this machine, checks the compiled module against the numpy reference
(til.reference) bit for bit on test-split windows, and checks that its BPC on the fixed 16-window
test slice equals the figure recorded in docs/char_lm.md (the compiled module is bit-exact, so the
figure is reproducible on any machine; the tolerance only absorbs float64 summation order).

Needs the char-LM corpus (Debian package python3.11-doc, installed by .ci/run; see
tests/test_char_lm_data.py): without it the test fails with the install command.
"""
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # examples/ is not an installed package
    sys.path.insert(0, str(REPO))

from examples.char_lm import common as C  # noqa: E402  (one thread for torch and TVM)
from examples.char_lm import data as D  # noqa: E402
from examples.char_lm.model import bpc  # noqa: E402

import tvm_intlstm as til  # noqa: E402

DOC = REPO / "docs" / "char_lm.md"
BPC_TOL = 1e-3


def recorded_slice_bpc() -> float:
    m = re.search(r"qat_test_bpc_slice\s*=\s*([0-9.]+)", DOC.read_text())
    assert m, f"{DOC} has no 'qat_test_bpc_slice = <value>' line"
    return float(m.group(1))


@pytest.fixture(scope="module")
def test_ids():
    try:
        D.ensure_corpus()
    except D.CorpusNotFoundError as e:
        pytest.fail(str(e))
    return D.load_splits()[2]


@pytest.fixture(scope="module")
def shipped():
    q = til.load_quantized(C.SHIPPED_QPT)
    return q, C.compile_host(q)


def test_shipped_files_are_small():
    assert C.SHIPPED_QPT.stat().st_size < 4_000_000
    assert D.Vocab.load(C.SHIPPED_VOCAB).size == 100


def test_compiled_equals_reference_on_test_slice(shipped, test_ids):
    q, cm = shipped
    starts = C.eval_windows(test_ids, C.SLICE_WINDOWS)
    x = C.window_batch(test_ids, starts[:2])
    same, y = C.check_bitexact(cm, q, x)
    assert y.dtype == np.int32 and y.shape == (2, C.SEQ_LEN, 100)
    assert same, "compiled module differs from til.reference"
    # shorter and odd shapes go through the same module
    x2 = C.window_batch(test_ids, starts[2:5], 37)
    assert np.array_equal(cm(x2), til.reference(q)(x2))


def test_slice_bpc_matches_docs(shipped, test_ids):
    q, cm = shipped
    got = bpc(C.dequantized_fn(cm, C.logits_scale(cm)), test_ids, C.SEQ_LEN, C.BATCH, max_windows=C.SLICE_WINDOWS)
    want = recorded_slice_bpc()
    print(f"shipped integer model, {C.SLICE_WINDOWS}-window test slice: BPC {got:.5f} (docs: {want:.5f})")
    assert abs(got - want) <= BPC_TOL
    shipped_metrics = C.read_json(C.SHIPPED_METRICS)
    assert abs(shipped_metrics["qat"]["test_bpc_slice"] - want) <= BPC_TOL  # docs and metrics.json agree
