"""Chunked cross-entropy: the LM loss without materialising `[batch, seq, vocab]` logits.

Each sequence shard is visited in chunks (`shard_major`); each chunk's
logits are computed, reduced to (log-sum-exp - target logit) and dropped, and
`jax.checkpoint` recomputes them in the backward pass. Peak memory for the loss is
one chunk's float32 `[batch, chunk, vocab]` logits and their gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lctx.model.transformer import head_logits, shard_major

# Elements of one chunk's float32 logits (64 MiB): small next to activations at
# long lengths, large enough that the per-chunk loop overhead is negligible.
DEFAULT_CHUNK_ELEMENTS = 2**24


def default_chunk(rows: int, local_seq: int, vocab: int) -> int:
    """The largest divisor of `local_seq` with rows x chunk x vocab logits within the budget."""
    limit = max(1, DEFAULT_CHUNK_ELEMENTS // (rows * vocab))
    return max(d for d in range(1, min(local_seq, limit) + 1) if local_seq % d == 0)


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                          mask: jax.Array, *, tied: bool, chunk: int, shards: int = 1
                          ) -> tuple[jax.Array, jax.Array]:
    """Sums of masked next-token loss and of correct argmax predictions.

    Args:
      hidden: final-normed hidden states `[b, s, D]`.
      head: `[D, V]` (or the tied `[V, D]` embedding).
      targets: int `[b, s]`; mask: `[b, s]` (0/1 or weights).
      chunk: sequence positions per step, chunk / shards from each of the `shards`
        sequence shards (as `hidden` is sharded); must divide s, a multiple of shards.
    Returns:
      float32 scalars (sum of mask * (logsumexp(logits) - logits[target]),
      sum of mask * (argmax == target)).
    """
    seq = hidden.shape[1]
    if seq % chunk or chunk % shards:
        raise ValueError(f"chunk={chunk}: must divide the sequence length {seq} and be a "
                         f"multiple of the {shards} sequence shards")
    local, chunk = seq // shards, chunk // shards
    mask = mask.astype(jnp.float32)

    def steps(x):  # [b, s, ...] -> [n, b, chunk, shards, ...]: scan over the chunk index
        x = shard_major(x, shards)
        x = x.reshape(x.shape[0], local // chunk, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    @jax.checkpoint
    def chunk_sums(h, t, m):
        logits = head_logits(h, head, tied)  # float32 [b, chunk, shards, V]
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
        correct = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
        return jnp.sum(nll * m), jnp.sum(correct * m)

    def step(carry, x):
        nll, correct = chunk_sums(*x)
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    xs = [steps(x) for x in (hidden, targets, mask)]
    (nll_sum, correct_sum), _ = lax.scan(step, (zero, zero), xs)
    return nll_sum, correct_sum
