"""Grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary (issue 18, item 5).

A BiLSTM encoder and an attention LSTM decoder in the shape the tvm_intlstm compiler takes
(docs/g2p.md):

* :mod:`examples.g2p.data`        -- CMUdict entries, the fixed split by word, vocabularies, batches
* :mod:`examples.g2p.model`       -- ``Encoder``, ``DecoderStep``, ``G2P``, greedy and beam decoding
* :mod:`examples.g2p.metrics`     -- phoneme and word error rates
* :mod:`examples.g2p.train_fp`    -- float training
* :mod:`examples.g2p.evaluate_fp` -- PER / WER and latency of the float model
* :mod:`examples.g2p.quantize_ptq` -- PTQ of the float model (til.quantize_seq2seq)
* :mod:`examples.g2p.evaluate`    -- the integer pair through the compiled library: PER / WER, latency
"""
