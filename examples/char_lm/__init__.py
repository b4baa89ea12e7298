"""Character-level LSTM language model on the CPython 3.11 documentation sources.

The showcase model of tvm_intlstm: a float model is trained here
(:mod:`examples.char_lm.train_fp`), then quantized and compiled to integer-only
code by the rest of the package.

* :mod:`examples.char_lm.data`  -- corpus, deterministic splits, vocabulary, batching
* :mod:`examples.char_lm.model` -- ``CharLM`` and the ``bpc`` evaluation protocol
"""
