"""Attention masks defined by positions and segment ids (never by array index).

A query attends to a key when both lie in the same segment, the key's position is
not after the query's (causal), and, with a sliding window w, the key's position is
greater than the query's minus w (the query sees itself and w - 1 keys before it,
as Mistral and Hugging Face define it). Because the mask is a function of the
tokens' own positions and segments, any permutation of the tokens (load-balanced
ring layouts) and any packing of documents gives the same attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pair_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array | None:
    """Boolean mask `[batch, q_len, k_len]`, True where the query may attend to the key.

    Args: positions int32 `[batch, q_len]` / `[batch, k_len]`; segment ids the same
    shapes or None. Returns None when nothing is masked (full bidirectional attention).
    """
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if q_seg is not None:
        mask = both(mask, q_seg[:, :, None] == k_seg[:, None, :])
    if causal:
        mask = both(mask, k_pos[:, None, :] <= q_pos[:, :, None])
    if sliding_window is not None:
        mask = both(mask, k_pos[:, None, :] > q_pos[:, :, None] - sliding_window)
    return mask


def block_ranges(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-block min and max of `ids` `[batch, seq]` -> two `[num_blocks, batch]` arrays."""
    batch, seq = ids.shape
    blocks = ids.reshape(batch, seq // block, block)
    return blocks.min(axis=-1).T, blocks.max(axis=-1).T


def blocks_may_interact(
    q_pos_range: tuple[jax.Array, jax.Array],
    k_pos_range: tuple[jax.Array, jax.Array],
    q_seg_range: tuple[jax.Array, jax.Array] | None,
    k_seg_range: tuple[jax.Array, jax.Array] | None,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
    """Scalar bool: may any query of a block attend to any key of another block?

    Ranges are (min, max) over each block, shaped `[batch]`. The test is conservative:
    it never reports False for a pair of blocks with a visible query/key pair, so a
    block skipped on False is exactly a block the mask hides completely.
    """
    (q_lo, q_hi), (k_lo, k_hi) = q_pos_range, k_pos_range
    possible = jnp.ones(q_lo.shape, dtype=bool)
    if q_seg_range is not None:
        (qs_lo, qs_hi), (ks_lo, ks_hi) = q_seg_range, k_seg_range
        possible &= (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
    if causal:
        possible &= k_lo <= q_hi
    if sliding_window is not None:
        possible &= k_hi > q_lo - sliding_window
    return jnp.any(possible)
