"""Generate text with the compiled integer char LM, streaming with a carried LSTM state.

    .venv/bin/python -m examples.char_lm.generate --prompt "The os module " --n 300
    .venv/bin/python -m examples.char_lm.generate --greedy --export examples/char_lm/runs/charlm_step.so
    .venv/bin/python -m examples.char_lm.generate --lib examples/char_lm/runs/charlm_step.so --greedy

The shipped model (`model/charlm_qat.qpt`) takes ids only and runs every call from the zero state.
`tvm_intlstm.add_lstm_states` gives the same integer model (same weights, same scales, no
retraining) with the LSTM's (h0, c0) as extra inputs and (h_n, c_n) as extra outputs
(docs/stateful.md); that module is compiled once and used two ways:

* **stream** (what generates the text): the prompt runs once, then each new character is one
  [1, 1] step from the carried integer state: O(1) work per character. The model sees the whole
  text so far, not a 128-character window.
* **window** (timed for comparison, same module, zero states): each character re-runs the last
  ``--context`` (default 128) characters from the zero state, the condition of training and of the
  BPC protocol, as generate.py did before the module could carry state.

Both latencies (median over the generated characters, module call only) are printed in the same
run. At the end the streamed logits are checked against one run over the whole generated text
from the zero state: bit for bit equal (chunked state carrying is exact).

Decoding (host side, outside the integer module):

* default: temperature sampling on the DEQUANTIZED logits, ``p = softmax(float32(q) * s / T)``
  (float64 softmax; ``s`` = the single logits scale, ``--temperature`` T, ``--seed``);
* ``--greedy``: integer-only ``argmax`` of the int32 logits (all logits share one scale, so no
  dequantization is needed; ties go to the lowest id);
* ``--top-k K``: sample only among the K largest int32 logits (selected in integers, then
  temperature-sampled among them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)

import numpy as np
import torch

import tvm_intlstm as til

from .data import Vocab


class Sampler:
    """Next-character choice from int32 logits (module docstring, "Decoding")."""

    def __init__(self, scale: float, temperature: float = 0.8, greedy: bool = False, top_k: int = 0,
                 seed: int = 0):
        self.scale, self.temperature, self.greedy, self.top_k = scale, temperature, greedy, top_k
        self.rng = np.random.default_rng(seed)

    def __call__(self, q: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(q))
        cand = np.arange(q.size) if self.top_k <= 0 else np.argsort(-q.astype(np.int64), kind="stable")[:self.top_k]
        z = q[cand].astype(np.float32).astype(np.float64) * self.scale / self.temperature
        pr = np.exp(z - z.max())
        return int(self.rng.choice(cand, p=pr / pr.sum()))


def stateful_module(qmodel, verbose: bool = False):
    """The char LM with (h0, c0) inputs and (h_n, c_n) outputs, compiled for this machine."""
    qs = til.add_lstm_states(qmodel)
    return til.compile(qs, target="host", example_inputs=(torch.zeros(1, 8, dtype=torch.int64), *qs.zero_state(1)),
                       verbose=verbose)


def _timed(cm, *args):
    t = time.perf_counter()
    out = cm(*args)
    return out, time.perf_counter() - t


def stream(cm, vocab: Vocab, prompt: str, n: int, sampler: Sampler):
    """Generate n characters with the state carried: the prompt in one call, then one [1, 1] step per
    character. Returns (ids of the prompt + text, int32 logits of every step, seconds per step)."""
    ids = list(vocab.encode(prompt or "\n"))
    logits, h, c = cm(np.asarray(ids, np.int64)[None, :], *cm.zero_state(1))
    rows, times = [logits[0]], []
    q = logits[0, -1]
    for _ in range(n):
        nxt = sampler(q)
        ids.append(nxt)
        (logits, h, c), dt = _timed(cm, np.array([[nxt]], np.int64), h, c)
        times.append(dt)
        rows.append(logits[0])
        q = logits[0, -1]
    return ids, np.concatenate(rows, axis=0), times


def windowed(cm, vocab: Vocab, prompt: str, n: int, sampler: Sampler, context: int = C.SEQ_LEN):
    """Generate n characters re-running the last `context` characters from the zero state for each.
    Returns (ids, seconds per character)."""
    ids = list(vocab.encode(prompt or "\n"))
    zero = cm.zero_state(1)
    times = []
    for _ in range(n):
        (logits, _, _), dt = _timed(cm, np.asarray(ids[-context:], np.int64)[None, :], *zero)
        times.append(dt)
        ids.append(sampler(logits[0, -1]))
    return ids, times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=C.SHIPPED_QPT, help="quantized model (without states) to compile")
    p.add_argument("--lib", type=Path, default=None,
                   help="use this exported stateful library (from --export) instead of compiling")
    p.add_argument("--export", type=Path, default=None, help="export the compiled stateful library here")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--context", type=int, default=C.SEQ_LEN, help="window of the re-run comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true", help="skip the windowed re-run and its timing")
    a = p.parse_args(argv)
    vocab = Vocab.load(C.SHIPPED_VOCAB)
    if a.lib:
        cm = til.load(a.lib)
        if not cm.state_formats():
            raise SystemExit(f"{a.lib} takes no LSTM states: export a stateful one with "
                             "`python -m examples.char_lm.generate --export PATH`")
        C.log(f"loaded {a.lib}")
    else:
        t = time.time()
        cm = stateful_module(til.load_quantized(a.model))
        C.log(f"compiled {a.model.name} with LSTM state inputs/outputs for {C.host_target()} in "
              f"{time.time() - t:.0f} s")
    if a.export:
        C.log(f"exported {cm.export_library(a.export)}")
    scale = float(cm.output_scales[0])   # outputs: logits, h_n, c_n
    mode = "greedy (int32 argmax)" if a.greedy else (
        f"temperature {a.temperature:g} on dequantized logits" + (f", top-{a.top_k} (integer selection)" if a.top_k else ""))
    C.log(f"generating {a.n} chars, {mode}, seed {a.seed}, streaming with the carried LSTM state")

    def sampler():
        return Sampler(scale, a.temperature, a.greedy, a.top_k, a.seed)

    t = time.time()
    ids, logits, t_stream = stream(cm, vocab, a.prompt, a.n, sampler())
    C.log(f"{a.n} chars in {time.time() - t:.2f} s")
    n_prompt = len(vocab.encode(a.prompt or "\n"))
    print((a.prompt or "") + vocab.decode(ids[n_prompt:]))
    # the streamed logits (one row per input char; the last step's row predicts past the text) are
    # those of one run over the whole text from the zero state
    whole, _, _ = cm(np.asarray(ids[:-1], np.int64)[None, :], *cm.zero_state(1))
    C.log(f"streamed logits == one zero-state run over all {len(ids) - 1} chars, bit for bit: "
          f"{bool(np.array_equal(whole[0], logits[:-1]))}")
    ms = 1e3 * np.median(t_stream)
    C.log(f"per-char latency, streaming (one [1, 1] step from the carried state): median {ms:.3f} ms, "
          f"mean {1e3 * np.mean(t_stream):.3f} ms")
    if not a.no_compare:
        _, t_win = windowed(cm, vocab, a.prompt, a.n, sampler(), a.context)
        mw = 1e3 * np.median(t_win)
        C.log(f"per-char latency, windowed re-run (last <= {a.context} chars from the zero state): median "
              f"{mw:.3f} ms, mean {1e3 * np.mean(t_win):.3f} ms; streaming is {mw / ms:.1f}x faster per char")


if __name__ == "__main__":
    main(sys.argv[1:])
