"""Diagnostic: the base model's loss by position within one long window (no sliding).

    python experiments/rope_scaling/position_loss.py --out=runs/rope_study --length=4096

Where plain RoPE extrapolation fails, loss rises at positions beyond the training
length; a model that mostly attends locally loses little there (relative distances
it attends over stay in-distribution).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

_OUT = flags.DEFINE_string("out", "runs/rope_study", "The study's output directory.")
_LENGTH = flags.DEFINE_integer("length", 4096, "Window length (tokens).")
_DOCS = flags.DEFINE_integer("docs", 4, "Held-out documents (one window each).")
_BUCKET = flags.DEFINE_integer("bucket", 256, "Positions per reported bucket.")


def main(argv):
    del argv
    import jax.numpy as jnp

    from lctx import data as ld
    from lctx import model as lm
    from lctx.eval.api import load_run
    from lctx.training.loop import open_run_corpus

    workdir = os.path.join(_OUT.value, "runs", "base_s0")
    config, model_config, params, step, _ = load_run(workdir)
    corpus = open_run_corpus(config, os.path.abspath(workdir))
    tokenizer = ld.make_tokenizer(config.data.tokenizer)
    held_out, n = corpus.splits["validation"], _LENGTH.value
    windows = []
    for i in range(len(held_out)):
        ids = ld.encode_document(tokenizer, held_out[i][corpus.text_key])
        if len(ids) > n:
            windows.append(ids[:n + 1])
        if len(windows) == _DOCS.value:
            break
    tokens = np.stack(windows)
    nll = []
    for row in tokens:  # one row at a time keeps the [seq, vocab] logits small
        logits = np.asarray(lm.forward(model_config, params, jnp.asarray(row[None, :-1])))[0]
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(n), row[1:]])
    nll = np.stack(nll)
    b = _BUCKET.value
    table = {f"{lo}-{lo + b - 1}": float(np.exp(nll[:, lo:lo + b].mean())) for lo in range(0, n, b)}
    result = {"step": step, "length": n, "documents": len(windows), "ppl_by_position": table}
    with open(os.path.join(_OUT.value, f"position_loss_{n}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
