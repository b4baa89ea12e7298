"""Generate text with the compiled integer char LM.

    .venv/bin/python -m examples.char_lm.generate --prompt "The os module " --n 300
    .venv/bin/python -m examples.char_lm.generate --lib examples/char_lm/runs/charlm_int.so --greedy

Decoding (host side, outside the integer module):

* default: temperature sampling on the DEQUANTIZED logits, ``p = softmax(float32(q) * s / T)``
  (float64 softmax; ``s`` = the single logits scale, ``--temperature`` T, ``--seed``);
* ``--greedy``: integer-only ``argmax`` of the int32 logits (all logits share one scale, so no
  dequantization is needed; ties go to the lowest id);
* ``--top-k K``: sample only among the K largest int32 logits (selected in integers, then
  temperature-sampled among them).

The compiled module has no recurrent-state inputs/outputs (it runs a window from the zero state,
like the BPC protocol and the FP training), so each step re-runs the last ``--context`` (default
128) characters: the model always sees the condition it was trained for, at the cost of a
[1, <=128] forward per generated character (~20-40 ms here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import common as C  # noqa: I001  (sets the thread counts first)

import numpy as np

import tvm_intlstm as til

from .data import Vocab


def generate(cm, vocab: Vocab, prompt: str, n: int, temperature: float = 0.8, greedy: bool = False,
             top_k: int = 0, context: int = C.SEQ_LEN, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    scale = C.logits_scale(cm)
    ids = list(vocab.encode(prompt or "\n"))
    out = []
    for _ in range(n):
        x = np.asarray(ids[-context:], dtype=np.int64)[None, :]
        q = cm(x)[0, -1]  # int32 logits of the next character
        if greedy:
            nxt = int(np.argmax(q))
        else:
            cand = np.arange(q.size) if top_k <= 0 else np.argsort(-q.astype(np.int64), kind="stable")[:top_k]
            z = q[cand].astype(np.float32).astype(np.float64) * scale / temperature
            pr = np.exp(z - z.max())
            nxt = int(rng.choice(cand, p=pr / pr.sum()))
        ids.append(nxt)
        out.append(nxt)
    return (prompt or "") + vocab.decode(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=C.SHIPPED_QPT, help="quantized model to compile")
    p.add_argument("--lib", type=Path, default=None, help="use this exported library instead of compiling")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--context", type=int, default=C.SEQ_LEN)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    vocab = Vocab.load(C.SHIPPED_VOCAB)
    if a.lib:
        cm = til.load(a.lib)
        C.log(f"loaded {a.lib}")
    else:
        t = time.time()
        cm = C.compile_host(til.load_quantized(a.model))
        C.log(f"compiled {a.model.name} for {C.host_target()} in {time.time() - t:.0f} s")
    mode = "greedy (int32 argmax)" if a.greedy else (
        f"temperature {a.temperature:g} on dequantized logits" + (f", top-{a.top_k} (integer selection)" if a.top_k else ""))
    C.log(f"generating {a.n} chars, {mode}, context {a.context}, seed {a.seed}")
    t = time.time()
    text = generate(cm, vocab, a.prompt, a.n, a.temperature, a.greedy, a.top_k, a.context, a.seed)
    C.log(f"{a.n} chars in {time.time() - t:.1f} s")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
