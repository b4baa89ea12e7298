"""tvm_intlstm: integer-only LSTM models from PyTorch, compiled with Apache TVM.

    qmodel = tvm_intlstm.quantize(float_model, calib_batches)
    y_int  = qmodel(x)                          # exact integer arithmetic (docs/integer_spec.md)
    y_ref  = tvm_intlstm.reference(qmodel)(x)   # numpy oracle, bit for bit equal
    cm     = tvm_intlstm.compile(qmodel, target="llvm -mcpu=znver3", example_inputs=(x,))
    y_tvm  = cm(x)                              # integer-only TVM module, same bits

The package imports lazily (PEP 562): `import tvm_intlstm.reference.ops` (the numpy oracle) needs
neither torch nor tvm; the API below loads its module on first use.
"""
from __future__ import annotations

import importlib

# public name -> module that defines it (relative to this package)
_LAZY = {
    "QuantConfig": ".quant", "quantize": ".quant", "prepare_qat": ".quant", "convert": ".quant",
    "QuantizedModel": ".quant", "UnsupportedModelError": ".quant", "save_quantized": ".quant",
    "load_quantized": ".quant",
    "add_lstm_states": ".quant.api", "StateFormat": ".quant.state_format",   # docs/stateful.md
    "compile": ".compiler", "CompiledModule": ".compiler",
    "RPCConfig": ".tuning._ms",     # tune(..., rpc=RPCConfig(...))
    # encoder-decoder models (docs/seq2seq.md)
    "quantize_seq2seq": ".seq2seq", "compile_seq2seq": ".seq2seq", "load_seq2seq": ".seq2seq",
    "QuantizedSeq2Seq": ".seq2seq", "CompiledSeq2Seq": ".seq2seq", "greedy_decode": ".seq2seq",
    "beam_search": ".seq2seq", "prepare_qat_seq2seq": ".seq2seq", "convert_seq2seq": ".seq2seq",
    "QATSeq2Seq": ".seq2seq",
}
__all__ = sorted(_LAZY) + ["reference", "tune", "load"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value      # later look-ups skip this function
        return value
    if name == "reference":          # the subpackage, callable as reference(qmodel)
        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def tune(*args, **kwargs):
    """MetaSchedule tuning of a quantized model's GEMM kernels (see tvm_intlstm.tuning.tune)."""
    from .tuning import tune as _tune
    return _tune(*args, **kwargs)


def load(path):
    """Reopen an exported library (its .so and .so.json): a CompiledModule, or a
    seq2seq.CompiledSeq2Seq for an encoder-decoder library (encode + decode_step). The .so is
    native code: load only files from a trusted source."""
    from .runtime.inputs import read_meta
    from .compiler import load as _load_module
    from .seq2seq import SEQ2SEQ_FORMAT, load_seq2seq
    try:
        meta = read_meta(path)
    except ValueError:
        meta = None        # compiler.load names the corrupt file
    if isinstance(meta, dict) and meta.get("format") == SEQ2SEQ_FORMAT:
        return load_seq2seq(path)
    return _load_module(path)


__version__ = "0.1.0"
