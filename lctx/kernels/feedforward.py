"""Blockwise feed-forward (BPT): the position-wise MLP applied chunk by chunk."""

from __future__ import annotations

from typing import Callable

import jax
from jax import lax


def blockwise_feedforward(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk_size: int,
                          *, remat: bool = True) -> jax.Array:
    """Applies a position-wise `fn` to `x` `[batch, seq, features]` in sequence chunks.

    Only one chunk's hidden activations (`[batch, chunk, mlp_dim]`) are live at a time;
    with `remat` they are recomputed in the backward instead of stored, so the
    feed-forward's activation memory is O(chunk) rather than O(seq x mlp_dim).
    `fn` must close over its parameters (e.g. a bound Flax module call).
    Returns `fn(x)`'s value, `[batch, seq, out_features]`.
    """
    batch, seq = x.shape[:2]
    if chunk_size <= 0 or seq % chunk_size:
        raise ValueError(f"blockwise_feedforward: chunk_size={chunk_size} must be a positive "
                         f"divisor of the sequence length {seq}")
    body = jax.checkpoint(fn) if remat else fn
    chunks = x.reshape(batch, seq // chunk_size, chunk_size, *x.shape[2:]).swapaxes(0, 1)
    _, out = lax.scan(lambda carry, chunk: (carry, body(chunk)), None, chunks)
    out = out.swapaxes(0, 1)
    return out.reshape(batch, seq, *out.shape[3:])
