"""Validation of a compiled model's inputs, shared by CompiledModule, the qemu runner, RPC and the CLI:
rank and static sizes, token ids int64 within the vocabulary, features float32 without NaN."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np


_STATE_DTYPES = {"state_h": np.int8, "state_c": np.int16}
# the dtype a model input of each kind takes (features: float32)
INPUT_DTYPES = {"ids": np.int64, "lengths": np.int64, "act": np.int8, **_STATE_DTYPES}


def example_input(kind: str, shape) -> np.ndarray:
    """A valid placeholder input of `kind` and `shape` (for tracing / compiling from the command line):
    zeros in the kind's dtype, except attention lengths, which are the full length (dim 1 of the
    keys is not known here: 1, the smallest valid length, keeps every position index valid)."""
    dt = INPUT_DTYPES.get(kind, np.float32)
    if kind == "lengths":
        return np.ones(shape, dt)
    return np.zeros(shape, dt)


def check_inputs(inputs: Iterable, kinds: Optional[list] = None, shapes: Optional[list] = None,
                 vocab: Optional[dict] = None) -> list[np.ndarray]:
    """numpy arrays (C order) from numpy/torch inputs, checked against the model's input description."""
    arrays = []
    for x in inputs:
        if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch tensor
            x = x.detach().cpu().numpy()
        arrays.append(np.asarray(x))
    vocab = vocab or {}
    if kinds and len(arrays) != len(kinds):
        from ..quant.state_format import input_count_hint
        raise TypeError(f"model takes {len(kinds)} inputs, got {len(arrays)}" + input_count_hint(kinds, len(arrays)))
    out = []
    for i, (a, kind) in enumerate(zip(arrays, kinds or [None] * len(arrays))):
        if shapes is not None and i < len(shapes) and shapes[i] is not None:
            want = shapes[i]
            if a.ndim != len(want) or any(d is not None and d != n for d, n in zip(want, a.shape)):
                desc = "[" + ", ".join("*" if d is None else str(d) for d in want) + "]"
                raise ValueError(f"input {i} has shape {tuple(a.shape)}, the model takes {desc} (* = any size)")
            if any(n == 0 for n in a.shape):
                raise ValueError(f"input {i} has an empty dimension {tuple(a.shape)}")
        if kind == "ids":
            if a.dtype not in (np.int64, np.int32):
                raise TypeError(f"input {i} takes int64 token ids, got {a.dtype}")
            a = a.astype(np.int64)
            V = vocab.get(i)
            if V is not None and a.size and (a.min() < 0 or a.max() >= V):
                raise IndexError(f"input {i}: token id out of range [0, {V}): min {a.min()}, max {a.max()}")
        elif kind == "lengths":  # attention source lengths (docs/integer_spec.md 11.2): int64 [B], >= 0
            if a.dtype not in (np.int64, np.int32) or a.ndim != 1:
                raise TypeError(f"input {i} takes attention source lengths, int64/int32 [B], got {a.dtype} "
                                f"{tuple(a.shape)}")
            a = a.astype(np.int64)
            if a.size and a.min() < 0:
                raise ValueError(f"input {i}: attention lengths must be >= 0, got {a.min()}")
        elif kind in _STATE_DTYPES:  # an LSTM state (docs/stateful.md): integers, never converted here
            if a.dtype != _STATE_DTYPES[kind]:
                raise TypeError(f"input {i} is an LSTM state {kind[-1]}0 and takes {_STATE_DTYPES[kind]} "
                                f"[L*D, B, H], got {a.dtype}: start from model.zero_state(batch), feed back the "
                                "returned h_n / c_n, or convert float states with model.quantize_state(...)")
        elif kind == "act":  # an int8 activation computed elsewhere (issue 18: a decoder's encoder states)
            if a.dtype != np.int8:
                raise TypeError(f"input {i} takes int8 activations (another integer model's output, e.g. the "
                                f"encoder's), got {a.dtype}: pass that output unchanged")
        elif kind is not None:
            if a.dtype != np.float32:
                raise TypeError(f"input {i} takes float32 features, got {a.dtype}")
            if np.isnan(a).any():
                raise ValueError(f"input {i} contains NaN")
        out.append(np.ascontiguousarray(a))
    return out


def read_meta(lib_path) -> Optional[dict]:
    """The .json metadata written next to an exported library, or None."""
    p = Path(str(lib_path) + ".json")
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{p} is not a valid tvm_intlstm module description (corrupt JSON: {e}); "
                         "export the module again with CompiledModule.export_library") from e


def check_inputs_for_library(lib_path, inputs: Iterable) -> list[np.ndarray]:
    """check_inputs with the description stored in an exported library's .json metadata."""
    meta = read_meta(lib_path)
    if meta is None:
        return check_inputs(inputs)
    return check_inputs(inputs, meta.get("input_kinds"), meta.get("input_shapes"),
                        {int(k): v for k, v in meta.get("vocab_sizes", {}).items()})
