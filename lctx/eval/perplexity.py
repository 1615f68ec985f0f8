"""Held-out perplexity against context length, by sliding windows (Press et al.).

For a length L and stride S, each document is read in windows of L tokens that
advance by S; the first window scores all of its predictions, later ones only the
last S (each scored token sees at least L - S tokens of context), and a last
window aligned to the document's end scores the remainder, so every token after
the first is scored exactly once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lctx import model as lm
from lctx.data.tokenizer import Tokenizer, encode_document
from lctx.parallel.sharding import LOGICAL_RULES


def sliding_windows(num_tokens: int, length: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window over a document of `num_tokens`.

    A window covers inputs [start, start + length) and targets [start + 1, start + length + 1);
    targets at offsets >= first scored offset within the window are scored.
    """
    if num_tokens < length + 1:
        return []
    windows, scored_until = [(0, 0)], length  # targets scored up to position `length`
    last_start = num_tokens - length - 1
    start = 0
    while scored_until < num_tokens - 1:
        start = min(start + stride, last_start)
        windows.append((start, scored_until - start))
        scored_until = start + length
    return windows


def token_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (specials: 0), `[vocab_size]`."""
    table = np.zeros(tokenizer.vocab_size, np.int64)
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    for token in range(tokenizer.vocab_size):
        if token not in specials:
            table[token] = len(tokenizer.decode([token]).encode("utf-8"))
    return table


@functools.partial(jax.jit, static_argnames=("model_config", "mesh"))
def _window_nll(model_config: lm.ModelConfig, params: Any, tokens: jax.Array, targets: jax.Array,
                mask: jax.Array, mesh: Mesh | None) -> jax.Array:
    mean, metrics = lm.loss(model_config, params, tokens, targets, loss_mask=mask, mesh=mesh)
    return mean * metrics["tokens"]


def _documents(source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, text_key: str,
               min_tokens: int) -> Iterable[np.ndarray]:
    for i in range(len(source)):
        ids = encode_document(tokenizer, source[i][text_key])
        if len(ids) >= min_tokens:
            yield ids


def perplexity_by_length(model_config: lm.ModelConfig, params: Any,
                         source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                         lengths: Sequence[int], stride: int, max_tokens: int,
                         text_key: str = "text", batch_size: int = 4,
                         longest: int | None = None, mesh: Mesh | None = None,
                         window_nll: Callable | None = None) -> dict[str, Any]:
    """{str(L): {"ppl", "bits_per_byte", "tokens", "documents"}} for each length L.

    Only documents longer than the longest length (or `longest`, when lengths are
    evaluated one call at a time) are used, so every length is measured on the same
    text. Attention runs as the model config says (blockwise by
    default); RoPE variants that depend on the length see L. With a `mesh` (needed by
    ring and Ulysses) the batch is padded up to a multiple of its data-parallel size.
    window_nll: `(tokens, targets, mask) -> summed nll` of a window batch in place of the
    model's forward (a cache policy's, e.g. beacons: CachePolicy.window_nll).
    """
    if window_nll is None:
        window_nll = lambda tok, tgt, msk: _window_nll(model_config, params, tok, tgt, msk, mesh)
    if mesh is not None:
        replicas = math.prod(mesh.shape.get(axis, 1) for axis in dict(LOGICAL_RULES)["batch"])
        batch_size = -(-batch_size // replicas) * replicas
    longest = max(max(lengths), longest or 0)
    docs = []
    for ids in _documents(source, tokenizer, text_key, longest + 1):
        docs.append(ids)
        if sum(len(d) for d in docs) >= 4 * max_tokens:
            break
    if not docs:
        raise ValueError(f"no held-out document has more than {longest} tokens; lower eval.lengths")
    bytes_of = token_bytes(tokenizer)
    results = {}
    for length in lengths:
        step = min(stride, length)
        nll = scored = nbytes = 0.0
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

        def flush():
            nonlocal nll
            if not rows:
                return
            while len(rows) < batch_size:  # fixed shapes: one compilation per length
                rows.append((rows[0][0], rows[0][1], np.zeros(length, np.float32)))
            tok, tgt, msk = (np.stack(col) for col in zip(*rows))
            nll += float(window_nll(tok, tgt, msk))
            rows.clear()

        for ids in docs:
            for start, first in sliding_windows(len(ids), length, step):
                if scored >= max_tokens:
                    break
                window = ids[start:start + length + 1]
                mask = np.zeros(length, np.float32)
                mask[first:] = 1.0
                scored += mask.sum()
                nbytes += bytes_of[window[1:]][first:].sum()
                rows.append((window[:-1].astype(np.int32), window[1:].astype(np.int32), mask))
                if len(rows) == batch_size:
                    flush()
        flush()
        results[str(length)] = {"ppl": math.exp(nll / scored), "nll": nll / scored,
                                "bits_per_byte": nll / math.log(2) / max(nbytes, 1.0),
                                "tokens": int(scored), "documents": len(docs)}
    return results
