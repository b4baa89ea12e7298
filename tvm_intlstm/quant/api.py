"""Public quantization API: quantize (PTQ), prepare_qat (QAT), convert."""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from . import graph
from .config import QuantConfig


def _as_args(batch, i: int = 0):
    """The model arguments of one calibration batch as tensors (numpy arrays are accepted)."""
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    out = []
    for k, a in enumerate(args):
        if isinstance(a, np.ndarray):
            a = torch.from_numpy(np.ascontiguousarray(a))
        elif not isinstance(a, torch.Tensor):
            raise TypeError(f"calibration batch {i}, input {k}: expected a torch.Tensor or numpy array, "
                            f"got {type(a).__name__}")
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            bad = int((~torch.isfinite(a)).sum())
            raise ValueError(f"calibration batch {i}, input {k} contains {bad} non-finite value(s) (NaN or "
                             "inf); they would poison the observed ranges: clean or drop them")
        out.append(a)
    return tuple(out)


def _warn_zero_ranges(prepared):
    """warnings.warn for every observer that saw data but only zeros (its scale falls back)."""
    from ..nn.modules import RangeObserver
    zero = [name for name, m in prepared.named_modules()
            if isinstance(m, RangeObserver) and int(m.seen) > 0 and float(m.max_abs) == 0.0]
    if zero:
        warnings.warn(f"calibration saw only zeros at {', '.join(zero)}: their quantization scale "
                      "falls back to 1/127 (give calibration data that exercises the model)",
                      CalibrationWarning, stacklevel=3)


class CalibrationWarning(UserWarning):
    """Calibration data that gives no usable range for some activation."""


def _check_float_model(model: nn.Module):
    if isinstance(model, (graph.QuantizedModel, QATModel)):
        raise TypeError("this model is already quantized/prepared; pass the float model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")


class QATModel(nn.Module):
    """A model prepared for quantization-aware training.

    train(): fake-quantized forward with straight-through gradients (the first
    `config.qat_observe_batches` batches run in float to record ranges when no calibration data was
    given). eval(): the exact integer forward of the converted model (cached until the parameters
    change), so what is evaluated is what is deployed. `convert()` freezes it into a QuantizedModel.
    """

    def __init__(self, prepared, config: QuantConfig, observed_batches: int):
        super().__init__()
        self.prepared = prepared
        self.config = config
        self._observed = observed_batches
        self._cache = None
        graph.set_mode(prepared, "qat" if observed_batches >= config.qat_observe_batches else "observe")

    def forward(self, *args):
        if self.training:
            if self._observed < self.config.qat_observe_batches:
                out = self.prepared(*_as_args(args, self._observed))
                self._observed += 1
                if self._observed >= self.config.qat_observe_batches:
                    graph.set_mode(self.prepared, "qat")
                    _warn_zero_ranges(self.prepared)
                return out
            self._cache = None
            return self.prepared(*args)
        return self.convert()(*args)

    def _version(self):
        return tuple(p._version for p in self.prepared.parameters())

    def convert(self) -> graph.QuantizedModel:
        if self._observed == 0:
            raise RuntimeError("no activation ranges yet: train (or calibrate) before evaluating a QAT model")
        v = self._version()
        if self._cache is None or self._cache[0] != v:
            self._cache = (v, graph.convert(self.prepared))
        return self._cache[1]


@torch.no_grad()
def _calibrate(prepared, calib_data: Iterable) -> int:
    graph.set_mode(prepared, "observe")
    prepared.eval()
    n = 0
    for batch in calib_data:
        prepared(*_as_args(batch, n))
        n += 1
    if n == 0:
        raise ValueError("calib_data is empty: give at least one batch of representative inputs")
    _warn_zero_ranges(prepared)
    return n


def quantize(model: nn.Module, calib_data: Iterable, config: Optional[QuantConfig] = None) -> graph.QuantizedModel:
    """Post-training quantization: trace `model`, record activation ranges on `calib_data` (an
    iterable of input batches: tensors, or tuples of tensors for multi-input models), and return the
    integer-only QuantizedModel. A QATModel is converted directly (its trained parameters and ranges)."""
    if isinstance(model, QATModel):
        return model.convert()
    _check_float_model(model)
    config = config or QuantConfig()
    prepared = graph.prepare(model, config)
    _calibrate(prepared, calib_data)
    return graph.convert(prepared)


def prepare_qat(model: nn.Module, config: Optional[QuantConfig] = None,
                calib_data: Optional[Iterable] = None) -> QATModel:
    """Prepare a float model for quantization-aware training (see QATModel)."""
    _check_float_model(model)
    config = config or QuantConfig()
    prepared = graph.prepare(model, config)
    observed = 0
    if calib_data is not None:
        _calibrate(prepared, calib_data)
        observed = config.qat_observe_batches
    qat = QATModel(prepared, config, observed)
    qat.train(model.training)
    return qat


def convert(model) -> graph.QuantizedModel:
    """The integer model of a QATModel (a QuantizedModel is returned as is); the integer pair
    (seq2seq.QuantizedSeq2Seq) of a seq2seq.QATSeq2Seq (prepare_qat_seq2seq)."""
    if isinstance(model, QATModel):
        return model.convert()
    if isinstance(model, graph.QuantizedModel):
        return model
    # an encoder-decoder pair converts itself (seq2seq.QATSeq2Seq.convert; a QuantizedSeq2Seq is
    # returned as is), asked by a marker attribute: quant/ must not import seq2seq, which imports it
    if getattr(type(model), "seq2seq_pair", None) == "qat":
        return model.convert()
    if getattr(type(model), "seq2seq_pair", None) == "integer":
        return model
    raise TypeError(f"convert takes a QATModel (or a QATSeq2Seq), got {type(model).__name__}")


def add_lstm_states(qmodel, layers=None):
    """A copy of an integer model whose LSTMs (all, or those named in `layers`) take their initial
    states as extra inputs and return their final states as extra outputs.

    New inputs come after the model's own, (h0, c0) per LSTM in graph order; outputs become
    (original outputs..., h_n, c_n per LSTM). Every integer module is kept: same weights, same
    scales, same bits from the zero state (so a model trained and quantized without states, like
    the shipped char LM, streams without retraining). Raises for LSTMs that already take states."""
    import copy
    import operator

    from ..nn.intmodules import IntLSTM
    from .graph import QuantizedModel
    from .state_format import STATE_KINDS
    gm = copy.deepcopy(qmodel.gm)
    g = gm.graph
    lstms = [n for n in g.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), IntLSTM)]
    if layers is not None:
        unknown = set(layers) - {n.target for n in lstms}
        if unknown:
            raise ValueError(f"no LSTM named {sorted(unknown)} in the model; its LSTMs: "
                             f"{[n.target for n in lstms]}")
        lstms = [n for n in lstms if n.target in layers]
    if not lstms:
        raise ValueError("the model has no LSTM to give states to")
    out_node = next(n for n in g.nodes if n.op == "output")
    last_input = [n for n in g.nodes if n.op == "placeholder"][-1]
    outs, kinds = [], list(qmodel.input_kinds)
    for node in lstms:
        if len(node.args) > 1 and node.args[1] is not None:
            raise ValueError(f"LSTM '{node.target}' already takes states")
        stem = node.target.replace(".", "_")
        with g.inserting_after(last_input):
            c0 = g.placeholder(f"{stem}_c0")
        with g.inserting_after(last_input):
            h0 = g.placeholder(f"{stem}_h0")
        last_input = c0
        node.args = (node.args[0], (h0, c0))
        kinds += list(STATE_KINDS)
        with g.inserting_before(out_node):
            state = g.call_function(operator.getitem, (node, 1))
            outs += [g.call_function(operator.getitem, (state, 0)), g.call_function(operator.getitem, (state, 1))]
    old = out_node.args[0]
    old_outs = list(old) if isinstance(old, (tuple, list)) else [old]
    out_node.args = (tuple(old_outs + outs),)
    g.lint()
    gm.recompile()
    old_info = qmodel.output_info
    old_infos = list(old_info) if isinstance(old_info, (tuple, list)) else [old_info]
    from . import layers
    new_infos = []
    for node in lstms:
        mod = gm.get_submodule(node.target)
        st = layers.for_int(mod).out_info(mod).items[1]
        new_infos += list(st.items)
    return QuantizedModel(gm, tuple(old_infos + new_infos), kinds)
