"""The oracle: attention with a materialised float32 softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lctx.kernels.masking import pair_mask
from lctx.kernels.registry import AttentionImpl, register


def default_positions(batch: int, seq: int) -> jax.Array:
    """Token-order positions, int32 `[batch, seq]`."""
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    kv_segment_ids: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
):
    """Dense attention; the function every other implementation must equal.

    Args:
      q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, k_len, kv_heads, head_dim]`,
        heads % kv_heads == 0 (GQA/MQA by grouping, K/V never repeated).
      segment_ids, positions: int32 `[batch, q_len]`; the kv_ variants default to them
        (self-attention) and are `[batch, k_len]` when given (decoding against a cache).
    Returns:
      out `[batch, q_len, heads, head_dim]` in q's dtype, and with `return_lse` the
      float32 natural-log log-sum-exp `[batch, q_len, heads]` (-inf, output 0, for a
      query that sees no key).
    """
    batch, q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if positions is None:
        positions = default_positions(batch, q_len)
    if kv_positions is None:
        kv_positions = positions if k_len == q_len else default_positions(batch, k_len)
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids

    qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    mask = pair_mask(positions, kv_positions, segment_ids, kv_segment_ids,
                     causal=causal, sliding_window=sliding_window)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [b, hkv, g, q]
    safe_lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
    probs = jnp.exp(logits - safe_lse[..., None])
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)
    if return_lse:
        lse = jnp.moveaxis(lse.reshape(batch, heads, q_len), 1, 2)
        return out, lse
    return out


register(AttentionImpl(
    "reference",
    build=lambda plan: lambda q, k, v, pos, seg: reference_attention(
        q, k, v, positions=pos, segment_ids=seg, **plan.mask_options)))
