"""Differential fuzzing of the whole compiler: random supported models (token or float input, 1-3
LSTM layers, bidirectional or not, batch-first or not, residual LSTM, layer norm, linear head, odd
sizes, 7- or 8-bit weights), random batch and length; the compiled module must equal the numpy
reference bit for bit.

In the suite a few models are drawn (derandomized: the same models every run). A long offline run:

    FUZZ_MODELS=1000 FUZZ_SEED=1 .venv/bin/python -m pytest -q -s tests/test_fuzz_models.py

(FUZZ_SEED set: random draws; the last line printed says how many models ran.)
"""
from __future__ import annotations

import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvm_intlstm as til
from test_compile import Stacked

N_MODELS = int(os.environ.get("FUZZ_MODELS", "3"))
SEED = os.environ.get("FUZZ_SEED")
_RAN = []

configs = st.fixed_dictionaries(dict(
    tokens=st.booleans(), V=st.integers(2, 50), E=st.integers(1, 24), H=st.integers(1, 40),
    layers=st.integers(1, 3), bidir=st.booleans(), batch_first=st.booleans(),
    residual=st.booleans(), norm=st.booleans(), out=st.integers(1, 30),
))


@settings(max_examples=N_MODELS, deadline=None, derandomize=SEED is None, database=None,
          suppress_health_check=list(HealthCheck))
@given(cfg=configs, bits=st.sampled_from([7, 8]), seed=st.integers(0, 2**16),
       shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 12)), min_size=1, max_size=3))
def test_random_model_compiled_equals_reference(cfg, bits, seed, shapes):
    torch.manual_seed(seed)
    m = Stacked(cfg).eval()
    g = torch.Generator().manual_seed(seed)

    def make(B, T):
        shape = (B, T) if cfg["batch_first"] else (T, B)
        if cfg["tokens"]:
            return torch.randint(0, cfg["V"], shape, generator=g)
        return torch.randn(*shape, cfg["E"], generator=g) * 2

    q = til.quantize(m, [make(3, 6) for _ in range(2)], config=til.QuantConfig(weight_bits=bits))
    cm = til.compile(q, "host", (make(1, 4),), verbose=False)
    ref = til.reference(q)
    for B, T in shapes:
        x = make(B, T).numpy()
        np.testing.assert_array_equal(cm(x), ref(x), err_msg=f"{cfg} bits={bits} B={B} T={T}")
    _RAN.append(cfg)


def test_report_count():
    """(Prints how many random models the fuzz test compiled and checked.)"""
    print(f"\nfuzz: {len(_RAN)} random models compiled and equal to the reference")
    assert len(_RAN) == N_MODELS or not _RAN
