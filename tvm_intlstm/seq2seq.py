"""Encoder-decoder (sequence-to-sequence) models: quantization of the pair, one compiled library with
`encode` and `decode_step`, and greedy / beam-search drivers on the int32 logits (docs/seq2seq.md).

The model shape:

    Encoder.forward(src [B, S] int64, lengths [B] int64)  -> enc [B, S, F]      (lengths may be unused)
    DecoderStep.forward(prev [B, 1] int64, h0, c0 [L, B, Hd], enc [B, S, F], lengths [B])
        -> (logits [B, 1, V], h [L, B, Hd], c [L, B, Hd])

    q = quantize_seq2seq(encoder, decoder_step, calib)   # calib: (src, lengths, dec_in) batches
    qat = prepare_qat_seq2seq(encoder, decoder_step, calib)   # or QAT: train qat(src, lengths, dec_in),
    q = convert_seq2seq(qat)                                 # then the same kind of QuantizedSeq2Seq
    lib = compile_seq2seq(q, "host")                      # one library: encode + decode_step
    lib.export_library("g2p.so"); lib = til.load("g2p.so")
    greedy_decode(lib, src, lengths, bos, eos, max_len)   # == greedy_decode(q.reference(), ...)

The decoder's `enc` input is an int8 activation at the encoder output's scale (input kind "act",
quant/graph.py): the integer encoder's output feeds the integer decoder unchanged, with no float
and no re-quantization between them.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

SEQ2SEQ_FORMAT = "tvm_intlstm-seq2seq-1"          # the exported library's .so.json
DECODER_KINDS = ["ids", "state_h", "state_c", "act", "lengths"]
_DECODER_SIGNATURE = ("DecoderStep.forward(prev [B, 1] int64, h0 [L, B, H], c0 [L, B, H], enc [B, S, F], "
                      "lengths [B]) -> (logits [B, 1, V], h, c), with h0, c0 passed to its nn.LSTM as "
                      "(h0, c0) and lengths to its attention layer")


class Seq2SeqError(ValueError):
    """Inputs of an encoder-decoder model given in a form it cannot take (the message says how)."""


# ------------------------------------------------------------------------------------------------
# input checks shared by the quantized, reference and compiled forms


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_sources(src, lengths) -> tuple:
    """(src, lengths) as numpy int64 after checking them: src [B, S] token ids, lengths [B] with
    1 <= lengths[b] <= S (positions s >= lengths[b] are padding the decoder's attention masks)."""
    src, lengths = _np(src), _np(lengths)
    if src.dtype not in (np.int64, np.int32) or src.ndim != 2:
        raise Seq2SeqError(f"src must be int64 token ids [B, S], got {src.dtype} {tuple(src.shape)}")
    if lengths.dtype not in (np.int64, np.int32) or lengths.shape != (src.shape[0],):
        raise Seq2SeqError(f"lengths must be int64 [B] = [{src.shape[0]}] (one per source), got "
                           f"{lengths.dtype} {tuple(lengths.shape)}")
    S = src.shape[1]
    if lengths.size and (lengths.min() < 1 or lengths.max() > S):
        raise Seq2SeqError(f"source lengths must be in [1, S] = [1, {S}] (S: src's padded length), got "
                           f"min {lengths.min()}, max {lengths.max()}")
    return src.astype(np.int64), lengths.astype(np.int64)


def check_decoder_inputs(prev, enc, lengths, features: int) -> None:
    """prev [B, T] ids, enc int8 [B, S, F] (the encoder's output), lengths [B] in [1, S]."""
    prev, enc, lengths = _np(prev), _np(enc), _np(lengths)
    if enc.dtype != np.int8:
        raise Seq2SeqError(f"enc must be the encoder's int8 output [B, S, {features}] (pass what encode "
                           f"returned, unchanged), got {enc.dtype}")
    if enc.ndim != 3 or enc.shape[2] != features:
        raise Seq2SeqError(f"enc must be [B, S, {features}] (the encoder's output), got {tuple(enc.shape)}")
    if prev.ndim != 2 or prev.shape[0] != enc.shape[0]:
        raise Seq2SeqError(f"prev must be token ids [B, T] with enc's batch B = {enc.shape[0]}, got "
                           f"{tuple(prev.shape)}")
    if lengths.dtype not in (np.int64, np.int32) or lengths.shape != (enc.shape[0],):
        raise Seq2SeqError(f"lengths must be int64 [B] = [{enc.shape[0]}], got {lengths.dtype} "
                           f"{tuple(lengths.shape)}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > enc.shape[1]):
        raise Seq2SeqError(f"source lengths must be in [1, S] = [1, {enc.shape[1]}], got min {lengths.min()}, "
                           f"max {lengths.max()}")


# ------------------------------------------------------------------------------------------------
# the quantized pair


class QuantizedSeq2Seq:
    """An integer encoder and an integer decoder step (two QuantizedModels) that fit together:
    the decoder's `enc` input (kind "act") is at the encoder output's scale.

    `encode` / `decode_step` run the PyTorch integer modules (torch in, torch out);
    `reference()` is the numpy oracle with the same interface (numpy in, numpy out)."""

    seq2seq_pair = "integer"    # (what quant.api.convert asks, without importing this module)

    def __init__(self, encoder, decoder):
        from .quant.graph import QuantizedModel
        if not (isinstance(encoder, QuantizedModel) and isinstance(decoder, QuantizedModel)):
            raise TypeError("QuantizedSeq2Seq takes two quantized models (use quantize_seq2seq)")
        if list(decoder.input_kinds) != DECODER_KINDS:
            raise Seq2SeqError(f"the decoder's inputs are {decoder.input_kinds}, expected {DECODER_KINDS}: "
                               + _DECODER_SIGNATURE)
        if not encoder.input_kinds or encoder.input_kinds[0] != "ids" or len(encoder.input_kinds) > 2 or (
                len(encoder.input_kinds) == 2 and encoder.input_kinds[1] != "lengths"):
            raise Seq2SeqError(f"the encoder's inputs are {encoder.input_kinds}, expected (src ids) or "
                               "(src ids, lengths)")
        out = encoder.output_info
        if isinstance(out, (tuple, list)) or out.kind != "act":
            raise Seq2SeqError("the encoder must return one tensor (its states [B, S, F], int8 once quantized)")
        if decoder.input_scales.get(3) != out.scale:
            raise Seq2SeqError(f"the decoder's enc input is at scale {decoder.input_scales[3]}, the encoder's "
                               f"output at {out.scale}: quantize them together with quantize_seq2seq")
        self.encoder, self.decoder = encoder, decoder
        # F of enc [B, S, F]: the encoder's output size, from one run on a one-token source
        one = torch.zeros(1, 1, dtype=torch.int64)
        self.decoder_features = int(encoder(*((one, torch.ones(1, dtype=torch.int64))
                                              if self.encoder_takes_lengths else (one,))).shape[-1])

    @property
    def enc_scale(self) -> float:
        """The scale of the encoder's int8 output (and of the decoder's enc input)."""
        return float(self.encoder.output_info.scale)

    @property
    def logits_scale(self) -> float:
        """float logits = int32 logits * logits_scale."""
        return float(self.decoder.output_info[0].scale)

    @property
    def encoder_takes_lengths(self) -> bool:
        return len(self.encoder.input_kinds) == 2

    def zero_state(self, batch: int) -> tuple:
        """The decoder's initial (zero) state: int8 h, int16 c [L, B, H]."""
        return self.decoder.zero_state(batch)

    def encode(self, src, lengths) -> torch.Tensor:
        src, lengths = check_sources(src, lengths)
        args = (src, lengths) if self.encoder_takes_lengths else (src,)
        return self.encoder(*(torch.from_numpy(a) for a in args))

    def decode_step(self, prev, h, c, enc, lengths) -> tuple:
        check_decoder_inputs(prev, enc, lengths, self.decoder_features)
        return self.decoder(*(torch.as_tensor(_np(a)) for a in (prev, h, c, enc, lengths)))

    def reference(self) -> "Seq2SeqReference":
        return Seq2SeqReference(self)


class Seq2SeqReference:
    """The numpy oracle of a QuantizedSeq2Seq (til.reference of each model): numpy in, numpy out."""

    def __init__(self, q: QuantizedSeq2Seq):
        from .quant import oracle as ref_model
        self.q = q
        self._enc = ref_model.reference(q.encoder)
        self._dec = ref_model.reference(q.decoder)
        self.enc_scale, self.logits_scale = q.enc_scale, q.logits_scale

    def zero_state(self, batch: int) -> tuple:
        return tuple(s.numpy() for s in self.q.zero_state(batch))

    def encode(self, src, lengths) -> np.ndarray:
        src, lengths = check_sources(src, lengths)
        return self._enc(*((src, lengths) if self.q.encoder_takes_lengths else (src,)))

    def decode_step(self, prev, h, c, enc, lengths) -> tuple:
        check_decoder_inputs(prev, enc, lengths, self.q.decoder_features)
        for f, s in zip(self.q.decoder.state_formats(), (h, c)):
            f.check(_np(s), "decoder state")
        return tuple(self._dec(*(_np(a) for a in (prev, h, c, enc, lengths))))


def _decoder_lstm_states_shape(prepared):
    """(rows, hidden) of the decoder's state inputs, from the LSTM they feed (after prepare)."""
    from .nn.modules import QuantLSTM
    ph = [n for n in prepared.graph.nodes if n.op == "placeholder"]
    user = next(iter(ph[1].users), None)
    mod = prepared.get_submodule(user.target) if user is not None and user.op == "call_module" else None
    if not isinstance(mod, QuantLSTM):
        raise Seq2SeqError("the decoder's h0 must feed its nn.LSTM: " + _DECODER_SIGNATURE)
    m = mod.lstm
    return m.num_layers * (2 if m.bidirectional else 1), m.hidden_size


def _mark_unused_lengths(prepared) -> None:
    """An encoder's `lengths` input that it does not use (the LSTM runs over the padded sources)
    still belongs to encode's signature: mark it kind "lengths" (int64 [B], never quantized), not
    a float feature."""
    from .quant.layers import LENGTHS_KIND
    ph = [n for n in prepared.graph.nodes if n.op == "placeholder"]
    if len(ph) == 2 and not ph[1].users:
        ph[1].meta["til_kind"] = LENGTHS_KIND


def _as_batch(batch, i):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
        raise TypeError(f"calibration batch {i}: expected (src [B, S], lengths [B], dec_in [B, T]) "
                        f"(dec_in: the decoder's teacher-forced inputs, BOS then the target shifted), got "
                        f"{type(batch).__name__}")
    src, lengths = check_sources(*batch[:2])
    dec_in = _np(batch[2])
    if dec_in.dtype not in (np.int64, np.int32) or dec_in.ndim != 2 or dec_in.shape[0] != src.shape[0]:
        raise TypeError(f"calibration batch {i}: dec_in must be int64 token ids [B={src.shape[0]}, T], got "
                        f"{dec_in.dtype} {tuple(dec_in.shape)}")
    return torch.from_numpy(src), torch.from_numpy(lengths), torch.from_numpy(dec_in.astype(np.int64))


def _check_float_pair(encoder, decoder_step, what: str) -> None:
    from .quant import api, graph
    for m, name in ((encoder, "encoder"), (decoder_step, "decoder_step")):
        if isinstance(m, (QuantizedSeq2Seq, QATSeq2Seq)):
            raise TypeError(f"{name} is a whole encoder-decoder pair ({type(m).__name__}); {what} takes the "
                            "float encoder and the float decoder step")
        if isinstance(m, (graph.QuantizedModel, api.QATModel)):
            raise TypeError(f"{name} is already quantized ({type(m).__name__}): {what} takes the float model")
        if isinstance(m, torch.fx.GraphModule) and any(
                type(sub).__module__.startswith("tvm_intlstm.nn.modules") for sub in m.modules()):
            raise TypeError(f"{name} is already prepared for quantization: {what} takes the float model")
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a float torch.nn.Module, got {type(m).__name__}")


@torch.no_grad()
def _calibrate_pair(encoder, decoder_step, calib_data, config, what: str) -> dict:
    """Prepare and calibrate the pair as quantize_seq2seq does (the encoder first, converted; then
    the decoder step by step with `enc` the integer encoder's output dequantized). Returns the
    prepared (observe-mode) graphs, the integer encoder and the facts about them."""
    from .quant import api, graph
    from .quant.config import QuantConfig
    _check_float_pair(encoder, decoder_step, what)
    config = config or QuantConfig()
    batches = [_as_batch(b, i) for i, b in enumerate(calib_data)]
    if not batches:
        raise ValueError("calib_data is empty: give at least one (src, lengths, dec_in) batch")

    pe = graph.prepare(encoder, config)
    _mark_unused_lengths(pe)
    n_enc_inputs = sum(n.op == "placeholder" for n in pe.graph.nodes)
    if n_enc_inputs not in (1, 2):
        raise Seq2SeqError(f"the encoder takes {n_enc_inputs} inputs; expected forward(src) or forward(src, lengths)")
    enc_args = [(s, ln) if n_enc_inputs == 2 else (s,) for s, ln, _ in batches]
    api._calibrate(pe, enc_args)
    qe = graph.convert(pe)
    out = qe.output_info
    if isinstance(out, (tuple, list)) or out.kind != "act":
        raise Seq2SeqError("the encoder must return one tensor, its states [B, S, F] (e.g. the LSTM's output y "
                           "of `y, _ = self.lstm(...)`)")
    s_enc = float(out.scale)

    n_dec_inputs = sum(n.op == "placeholder" for n in graph.trace(decoder_step).graph.nodes)
    if n_dec_inputs != 5:
        raise Seq2SeqError(f"the decoder step takes {n_dec_inputs} inputs; expected " + _DECODER_SIGNATURE)
    pd = graph.prepare(decoder_step, config, int8_inputs={3: s_enc})   # enc: int8 at the encoder's scale
    rows, hidden = _decoder_lstm_states_shape(pd)
    graph.set_mode(pd, "observe")
    pd.eval()
    for src, lengths, dec_in in batches:
        enc = qe(*((src, lengths) if n_enc_inputs == 2 else (src,))).to(torch.float32) * s_enc
        h = torch.zeros(rows, src.shape[0], hidden)
        c = torch.zeros(rows, src.shape[0], hidden)
        for t in range(dec_in.shape[1]):
            outs = pd(dec_in[:, t:t + 1], h, c, enc, lengths)
            if not (isinstance(outs, (tuple, list)) and len(outs) == 3):
                raise Seq2SeqError("the decoder step must return (logits, h, c): " + _DECODER_SIGNATURE)
            _, h, c = outs
    api._warn_zero_ranges(pd)
    return {"pe": pe, "qe": qe, "pd": pd, "s_enc": s_enc, "n_enc_inputs": n_enc_inputs,
            "state_shape": (rows, hidden), "config": config}


def _convert_decoder(pd):
    from .quant import graph
    qd = graph.convert(pd)
    if list(qd.input_kinds) != DECODER_KINDS:
        raise Seq2SeqError(f"the decoder's inputs became {qd.input_kinds}, expected {DECODER_KINDS}: "
                           + _DECODER_SIGNATURE)
    return qd


def quantize_seq2seq(encoder: nn.Module, decoder_step: nn.Module, calib_data: Iterable,
                     config=None) -> QuantizedSeq2Seq:
    """Post-training quantization of an encoder and a decoder step (the model shape in the module
    docstring). `calib_data`: batches (src [B, S], lengths [B], dec_in [B, T]) with dec_in[:, t] the
    decoder's input at step t (BOS, then the target shifted: teacher forcing).

    The encoder is calibrated and converted first; the decoder is then calibrated step by step
    from the zero state (its float states carried, as it will run), with `enc` the integer
    encoder's output dequantized (q * s_enc, exactly the values the integer decoder will see), and
    converted with `enc` an int8 input at the encoder's output scale.
    (QAT of the pair: prepare_qat_seq2seq, convert_seq2seq.)"""
    cal = _calibrate_pair(encoder, decoder_step, calib_data, config, "quantize_seq2seq")
    return QuantizedSeq2Seq(cal["qe"], _convert_decoder(cal["pd"]))


# ------------------------------------------------------------------------------------------------
# quantization-aware training of the pair


class QATSeq2Seq(nn.Module):
    """An encoder and a decoder step prepared for quantization-aware training as a pair
    (prepare_qat_seq2seq): `encoder` and `decoder` are the prepared graphs (fake quantization with
    straight-through gradients, the activation ranges fixed by the PTQ calibration).

    The decoder's `enc` input is fake-quantized at the encoder's output scale `enc_scale` (int8,
    the grid the integer decoder's "act" input is on), so the decoder trains on the values the
    integer encoder hands it.

    train(): `forward(src, lengths, dec_in)` -> float logits [B, T, V], teacher-forced: the
    fake-quantized encoder, then the fake-quantized decoder over the T inputs from the zero state
    (one call: the decoder step's LSTM runs the T steps, as T decode_step calls would).
    eval(): the same call runs the converted integer pair (QuantizedSeq2Seq, cached until the
    parameters change) and returns its logits dequantized, so what is evaluated is what is deployed.
    `fake_forward` is the fake-quantized forward in either mode; `convert()` freezes the pair into
    the QuantizedSeq2Seq quantize_seq2seq returns."""

    seq2seq_pair = "qat"        # (what quant.api.convert asks, without importing this module)

    def __init__(self, encoder, decoder, enc_scale: float, encoder_takes_lengths: bool, state_shape: tuple,
                 config):
        super().__init__()
        from .quant import graph
        self.encoder, self.decoder = encoder, decoder
        self.enc_scale = float(enc_scale)
        self.encoder_takes_lengths = bool(encoder_takes_lengths)
        self.state_shape = tuple(state_shape)     # (rows L, hidden H) of the decoder's h0 / c0
        self.config = config
        self._cache = None
        graph.set_mode(encoder, "qat")
        graph.set_mode(decoder, "qat")

    # the fake-quantized pair ------------------------------------------------------------------
    def zero_state(self, batch: int) -> tuple:
        """Float zero states (h0, c0) [L, B, H] of the fake-quantized decoder."""
        rows, hidden = self.state_shape
        return torch.zeros(rows, batch, hidden), torch.zeros(rows, batch, hidden)

    def encode(self, src, lengths) -> torch.Tensor:
        """The fake-quantized encoder's output on the int8 grid of enc_scale (float [B, S, F])."""
        from .nn.fake_quant import fake_quant
        src, lengths = check_sources(src, lengths)
        args = (src, lengths) if self.encoder_takes_lengths else (src,)
        y = self.encoder(*(torch.from_numpy(a) for a in args))
        return fake_quant(y, self.enc_scale, -128, 127)

    def decode_step(self, prev, h, c, enc, lengths) -> tuple:
        """The fake-quantized decoder step: (float logits [B, T, V], h, c)."""
        prev, lengths = torch.as_tensor(_np(prev)), torch.as_tensor(_np(lengths))
        return self.decoder(prev, h, c, enc, lengths)

    def fake_forward(self, src, lengths, dec_in) -> torch.Tensor:
        dec_in = _dec_in(dec_in, _np(src).shape[0])
        enc = self.encode(src, lengths)
        logits, _, _ = self.decode_step(dec_in, *self.zero_state(dec_in.shape[0]), enc, lengths)
        return logits

    def forward(self, src, lengths, dec_in) -> torch.Tensor:
        if self.training:
            self._cache = None
            return self.fake_forward(src, lengths, dec_in)
        q = self.convert()
        dec_in = _dec_in(dec_in, _np(src).shape[0])
        enc = q.encode(src, lengths)
        logits, _, _ = q.decode_step(dec_in, *q.zero_state(dec_in.shape[0]), enc, lengths)
        return logits.to(torch.float32) * q.logits_scale

    # the integer pair ---------------------------------------------------------------------------
    def _version(self):
        return tuple(p._version for p in self.parameters())

    def convert(self) -> QuantizedSeq2Seq:
        """The integer pair (QuantizedSeq2Seq) of the current parameters (cached until they change)."""
        from .quant import graph
        v = self._version()
        if self._cache is None or self._cache[0] != v:
            qe = graph.convert(self.encoder)
            out = qe.output_info
            if isinstance(out, (tuple, list)) or out.kind != "act" or float(out.scale) != self.enc_scale:
                raise Seq2SeqError(f"the encoder's output scale moved from {self.enc_scale} to "
                                   f"{getattr(out, 'scale', out)}; its ranges must stay those of the calibration")
            self._cache = (v, QuantizedSeq2Seq(qe, _convert_decoder(self.decoder)))
        return self._cache[1]


def _dec_in(dec_in, batch: int) -> torch.Tensor:
    d = _np(dec_in)
    if d.dtype not in (np.int64, np.int32) or d.ndim != 2 or d.shape[0] != batch or d.shape[1] < 1:
        raise Seq2SeqError(f"dec_in must be int64 token ids [B={batch}, T] (BOS, then the target shifted), got "
                           f"{d.dtype} {tuple(d.shape)}")
    return torch.from_numpy(np.ascontiguousarray(d.astype(np.int64)))


def prepare_qat_seq2seq(encoder: nn.Module, decoder_step: nn.Module, calib_data: Iterable,
                        config=None) -> QATSeq2Seq:
    """Prepare a float encoder and decoder step for quantization-aware training as a pair.

    The pair is first calibrated exactly as quantize_seq2seq calibrates it (`calib_data`: batches
    (src [B, S], lengths [B], dec_in [B, T]); calibration is required: the decoder's `enc` scale is
    the encoder's output scale, which must be known before the decoder is prepared), then both
    prepared graphs switch to fake quantization. Train the returned QATSeq2Seq on teacher-forced
    batches (`qat(src, lengths, dec_in)` -> logits [B, T, V]) and `convert_seq2seq` it (or
    `qat.convert()`, `til.convert(qat)`) into the QuantizedSeq2Seq that compile_seq2seq,
    greedy_decode and beam_search take. The returned pair is in train mode."""
    if calib_data is None:
        raise ValueError("prepare_qat_seq2seq needs calib_data ((src, lengths, dec_in) batches): the decoder's "
                         "enc input is int8 at the encoder's output scale, known only after calibration")
    cal = _calibrate_pair(encoder, decoder_step, calib_data, config, "prepare_qat_seq2seq")
    qat = QATSeq2Seq(cal["pe"], cal["pd"], cal["s_enc"], cal["n_enc_inputs"] == 2, cal["state_shape"],
                     cal["config"])
    return qat.train()


def convert_seq2seq(qat_pair) -> QuantizedSeq2Seq:
    """The integer pair (QuantizedSeq2Seq) of a QATSeq2Seq; a QuantizedSeq2Seq is returned as is."""
    if isinstance(qat_pair, QATSeq2Seq):
        return qat_pair.convert()
    if isinstance(qat_pair, QuantizedSeq2Seq):
        return qat_pair
    raise TypeError(f"convert_seq2seq takes a QATSeq2Seq (prepare_qat_seq2seq's result), got "
                    f"{type(qat_pair).__name__}; a single QAT model converts with til.convert")


# ------------------------------------------------------------------------------------------------
# one library: encode + decode_step


class CompiledSeq2Seq:
    """One compiled library with two functions: `encode(src, lengths) -> enc` (int8 [B, S, F]) and
    `decode_step(prev, h, c, enc, lengths) -> (logits int32 [B, T, V], h int8, c int16)`. numpy in,
    numpy out; the same bits as QuantizedSeq2Seq.reference(). Thread-safe (one VM, one lock)."""

    def __init__(self, executable, target, enc_cm, dec_cm, enc_scale: float, logits_scale: float,
                 ir_module=None):
        self.executable, self.target, self.ir_module = executable, target, ir_module
        self.enc_scale, self.logits_scale = float(enc_scale), float(logits_scale)
        self._encode, self._decode = enc_cm, dec_cm
        # both functions run on one Relax VM (one copy of the weights, one lock)
        dec_cm._get_vm = enc_cm._get_vm
        dec_cm._lock = enc_cm._lock = threading.Lock()
        self.features = int(dec_cm.input_shapes[3][2])

    @property
    def encoder_takes_lengths(self) -> bool:
        return len(self._encode.input_kinds) == 2

    def zero_state(self, batch: int) -> tuple:
        return self._decode.zero_state(batch)

    def state_formats(self) -> list:
        return self._decode.state_formats()

    def quantize_state(self, h, c) -> tuple:
        """Float decoder states -> int8 h / int16 c in the decoder's formats (docs/stateful.md)."""
        return self._decode.quantize_state(h, c)

    def encode(self, src, lengths) -> np.ndarray:
        src, lengths = check_sources(src, lengths)
        return self._encode(*((src, lengths) if self.encoder_takes_lengths else (src,)))

    def decode_step(self, prev, h, c, enc, lengths) -> tuple:
        check_decoder_inputs(prev, enc, lengths, self.features)
        return tuple(self._decode(prev, h, c, enc, lengths))

    def export_library(self, path) -> str:
        """Write the library (.so) and its description (.so.json); til.load / load_seq2seq reopen it."""
        import json
        from .compiler import module_meta
        from .target import export_library, target_to_dict
        path = os.fspath(path)
        export_library(self.executable, path, self.target)
        meta = {"format": SEQ2SEQ_FORMAT, "target": target_to_dict(self.target), "amx": self._encode.amx,
                "enc_scale": self.enc_scale, "logits_scale": self.logits_scale,
                "functions": {"encode": module_meta(self._encode), "decode_step": module_meta(self._decode)}}
        with open(path + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        return path


def load_seq2seq(path) -> CompiledSeq2Seq:
    """Reopen an exported seq2seq library (til.load does the same for such a file). The .so is
    native code: load only files from a trusted source."""
    from .compiler import _target, load_executable, module_from_meta
    from .runtime.inputs import read_meta
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compiled library at {path}")
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"{path} has no metadata file {path}.json: export it with CompiledSeq2Seq.export_library")
    if not isinstance(meta, dict) or meta.get("format") != SEQ2SEQ_FORMAT:
        raise ValueError(f"{path}.json does not describe an encoder-decoder library (format {SEQ2SEQ_FORMAT}); "
                         "a single-model library loads with til.load")
    try:
        target = _target(meta["target"])
        funcs = meta["functions"]
        enc_meta, dec_meta = funcs["encode"], funcs["decode_step"]
        enc_scale, logits_scale = float(meta["enc_scale"]), float(meta["logits_scale"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}.json is a malformed encoder-decoder description ({e}); export it again") from e
    ex = load_executable(path, target)
    return CompiledSeq2Seq(ex, target, module_from_meta(ex, target, enc_meta, "encode"),
                           module_from_meta(ex, target, dec_meta, "decode_step"), enc_scale, logits_scale)


def compile_seq2seq(q: QuantizedSeq2Seq, target="host", tuning_logs=None, verbose: bool = True,
                    threads: bool = False, kernels: Optional[str] = None) -> CompiledSeq2Seq:
    """Compile a QuantizedSeq2Seq into one integer-only library with `encode` and `decode_step`
    (one Relax IRModule, one lowering, one VerifyIntegerOnly, one .so). Batch size, source length
    and the number of decoder steps per call are symbolic. Options as in til.compile."""
    import tvm
    from .compiler import (_log, _state_batch_of, _uses_amx, checked_target, input_shapes_of,
                           lower_and_build, vocab_sizes, CompiledModule)
    from .frontend.importer import import_quantized
    from .kernels import isa as families
    if isinstance(q, QATSeq2Seq):
        raise TypeError("compile_seq2seq takes a QuantizedSeq2Seq; this is a QATSeq2Seq (the trainable pair): "
                        "convert it first with convert_seq2seq(qat_pair)")
    if not isinstance(q, QuantizedSeq2Seq):
        raise TypeError(f"compile_seq2seq takes a QuantizedSeq2Seq (quantize_seq2seq's result), got "
                        f"{type(q).__name__}; a single model compiles with til.compile")
    tgt, family = checked_target(target, kernels)
    t0 = time.perf_counter()
    # example shapes only (every dim that can vary is symbolic): batch 3, source length 5 and
    # one decoder step, sizes distinct so that torch.export does not equate the dims
    B, S = 3, 5
    src = torch.zeros(B, S, dtype=torch.int64)
    lengths = torch.full((B,), S, dtype=torch.int64)
    enc_args = (src, lengths) if q.encoder_takes_lengths else (src,)
    enc = torch.zeros(B, S, q.decoder_features, dtype=torch.int8)
    dec_args = (torch.zeros(B, 1, dtype=torch.int64), *q.zero_state(B), enc, lengths)
    _log("importing encoder and decoder step (torch.export -> Relax)", verbose)
    funcs = {}
    for name, model, args in (("encode", q.encoder, enc_args), ("decode_step", q.decoder, dec_args)):
        funcs[name] = import_quantized(model, args)["main"].with_attr("global_symbol", name)
    mod = tvm.IRModule(funcs)
    _log(f"lowering to integer kernels for {tgt.attrs.get('mcpu', '') or tgt.kind.name}", verbose)
    with families.prefer(family):
        lowered, ex = lower_and_build(mod, tgt, tuning_logs, threads, verbose)
    _log(f"done in {time.perf_counter() - t0:.1f} s", verbose)
    amx = _uses_amx(lowered)
    cms = {}
    for name, model in (("encode", q.encoder), ("decode_step", q.decoder)):
        cms[name] = CompiledModule(ex, tgt, model.input_kinds, model.output_info, None, vocab_sizes(model),
                                   input_shapes_of(mod[name]), model.state_formats(),
                                   _state_batch_of(mod[name], model.state_formats()), amx=amx, entry=name,
                                   input_scales=model.input_scales)
    return CompiledSeq2Seq(ex, tgt, cms["encode"], cms["decode_step"], q.enc_scale, q.logits_scale, lowered)


# ------------------------------------------------------------------------------------------------
# drivers on the int32 logits


def _runner(model):
    """An object with numpy encode / decode_step / zero_state for the drivers."""
    if isinstance(model, QuantizedSeq2Seq):
        return _TorchRunner(model)
    if isinstance(model, (CompiledSeq2Seq, Seq2SeqReference, _TorchRunner)):
        return model
    hint = "; convert the QAT pair first with convert_seq2seq" if isinstance(model, QATSeq2Seq) else ""
    raise TypeError(f"the decoding drivers take a CompiledSeq2Seq (compile_seq2seq / til.load), a "
                    f"QuantizedSeq2Seq or its reference(), got {type(model).__name__}{hint}")


class _TorchRunner:
    """A QuantizedSeq2Seq (the PyTorch integer modules) with numpy in and out."""

    def __init__(self, q):
        self.q, self.logits_scale = q, q.logits_scale

    def zero_state(self, batch):
        return tuple(s.numpy() for s in self.q.zero_state(batch))

    def encode(self, src, lengths):
        return self.q.encode(src, lengths).numpy()

    def decode_step(self, prev, h, c, enc, lengths):
        return tuple(t.numpy() for t in self.q.decode_step(prev, h, c, enc, lengths))


def _check_tokens(bos, eos, max_len):
    for name, v in (("bos", bos), ("eos", eos), ("max_len", max_len)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def greedy_decode(model, src, lengths, bos: int, eos: int, max_len: int) -> list:
    """Greedy decoding of a batch of sources: each step feeds back the integer argmax of the int32
    logits (the lowest token id among equal maxima). Returns one token list per source, without BOS
    and EOS, at most max_len tokens (a source that produced no EOS by then stops there). Sources
    whose EOS came leave the batch (every batch row is computed independently, so this changes no
    other row's bits)."""
    run = _runner(model)
    _check_tokens(bos, eos, max_len)
    src, lengths = check_sources(src, lengths)
    B = src.shape[0]
    enc = run.encode(src, lengths)
    h, c = run.zero_state(B)
    prev = np.full((B, 1), bos, np.int64)
    active = np.arange(B)            # source index of each batch row
    out = [[] for _ in range(B)]
    for _ in range(max_len):
        logits, h, c = run.decode_step(prev, h, c, enc, lengths)
        tokens = np.argmax(logits[:, -1], axis=-1)
        keep = tokens != eos
        for row in np.flatnonzero(keep):
            out[active[row]].append(int(tokens[row]))
        if not keep.all():
            if not keep.any():
                break
            active, h, c, enc, lengths = (active[keep], h[:, keep], c[:, keep], enc[keep], lengths[keep])
            tokens = tokens[keep]
        prev = tokens[:, None].astype(np.int64)
        h, c, enc = np.ascontiguousarray(h), np.ascontiguousarray(c), np.ascontiguousarray(enc)
    return out


@dataclass(frozen=True)
class Hypothesis:
    """One beam-search result: tokens without BOS / EOS, the sum of the tokens' log-probabilities
    (EOS's included when finished), the length-normalized score the ranking uses, and whether it
    ended with EOS (False: cut at max_len)."""

    tokens: tuple
    score: float
    normalized: float
    finished: bool


def log_softmax64(logits: np.ndarray, scale: float) -> np.ndarray:
    """float64 log-softmax over the last axis of int32 logits at `scale` (float logits = q * scale):
    host-side, deterministic (the same int32 logits give the same bits)."""
    z = logits.astype(np.float64) * float(scale)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def beam_search(model, src, lengths, bos: int, eos: int, max_len: int, beam: int = 4,
                length_penalty: float = 1.0, return_all: bool = False) -> list:
    """Beam search over a batch of sources (all beams of all sources in one decode_step call).

    Scores: log-probabilities from the int32 logits by a float64 log-softmax on the host
    (`log_softmax64`, the logits at the model's logits scale), summed over a hypothesis' tokens.
    Each step every live beam of a source is extended by every token; the candidates are taken
    best first (ties: the lower beam, then the lower token id) until `beam` of them that do not end
    in EOS are found, which stay live; the ones ending in EOS met on the way become finished
    hypotheses. A source is done when it has `beam`
    finished hypotheses (or at max_len, where its live beams are kept as unfinished ones).
    Ranking: score / length**length_penalty, length = tokens + 1 for EOS when finished
    (length_penalty 0: raw scores, which favour short outputs; 1: per-token average).

    Returns per source the best hypothesis' tokens, or with return_all=True all its hypotheses
    (Hypothesis objects, best first)."""
    run = _runner(model)
    _check_tokens(bos, eos, max_len)
    if not isinstance(beam, (int, np.integer)) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    src, lengths = check_sources(src, lengths)
    B, K = src.shape[0], int(beam)
    scale = float(run.logits_scale)
    enc1 = run.encode(src, lengths)
    # rows: source a's beams are rows a*K .. a*K+K-1 of the active sources
    enc = np.repeat(enc1, K, axis=0)
    lens = np.repeat(lengths, K)
    h, c = run.zero_state(B * K)
    prev = np.full((B * K, 1), bos, np.int64)
    scores = np.tile(np.r_[0.0, np.full(K - 1, -np.inf)], B)   # one live beam per source at first
    tokens = [() for _ in range(B * K)]
    active = list(range(B))
    finished = [[] for _ in range(B)]

    def norm(score, n):
        return score / (max(n, 1) ** length_penalty)

    for step in range(max_len):
        logits, h, c = run.decode_step(prev, h, c, enc, lens)
        logp = log_softmax64(logits[:, -1], scale)
        V = logp.shape[1]
        cand = (scores[:, None] + logp).reshape(len(active), K * V)
        order = np.argsort(-cand, axis=1, kind="stable")
        rows, new_tokens, new_scores, new_prev, still = [], [], [], [], []
        for i, a in enumerate(active):
            live = []
            for idx in order[i]:
                sc = cand[i, idx]
                if sc == -np.inf or len(live) == K:
                    break
                k, tok = divmod(int(idx), V)
                seq = tokens[i * K + k]
                if tok == eos:
                    if len(finished[a]) < K:
                        finished[a].append(Hypothesis(seq, float(sc), norm(float(sc), len(seq) + 1), True))
                else:
                    live.append((i * K + k, seq + (tok,), float(sc), tok))
            if len(finished[a]) >= K or not live:
                continue   # done: leaves the batch
            if step == max_len - 1:
                finished[a].extend(Hypothesis(s, sc, norm(sc, len(s)), False) for _, s, sc, _ in live)
                continue
            still.append(a)
            live += [(live[0][0], (), -np.inf, eos)] * (K - len(live))    # dead rows keep the shape
            for r, seq, sc, tok in live:
                rows.append(r)
                new_tokens.append(seq)
                new_scores.append(sc)
                new_prev.append(tok)
        if not still:
            break
        sel = np.asarray(rows)
        h, c = np.ascontiguousarray(h[:, sel]), np.ascontiguousarray(c[:, sel])
        if len(still) != len(active):   # finished sources leave the batch
            enc = np.ascontiguousarray(np.repeat(enc1[np.asarray(still)], K, axis=0))
            lens = np.repeat(lengths[np.asarray(still)], K)
        active, tokens, scores = still, new_tokens, np.asarray(new_scores)
        prev = np.asarray(new_prev, np.int64)[:, None]
    results = []
    for hyps in finished:
        ranked = sorted(hyps, key=lambda hy: -hy.normalized)   # stable: equal scores keep their order
        results.append(ranked if return_all else (list(ranked[0].tokens) if ranked else []))
    return results
