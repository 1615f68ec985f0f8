"""DeepSpeed-Ulysses sequence parallelism: all-to-all from sequence to head shards.

Inside `shard_map` with the sequence sharded P ways, one all-to-all turns
`[b, S/P, H, d]` into `[b, S, H/P, d]`; each device runs blockwise attention over the
whole sequence for its heads, and a second all-to-all restores the sequence split.
Positions and segment ids (int32 `[b, S/P]`, tiny) are all-gathered. K/V heads are
split the same way; when H_kv < P they are repeated up to P first — the one place
lctx materialises repeated K/V (needs P % H_kv == 0).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lctx.kernels.blockwise import blockwise_attention
from lctx.kernels.registry import AttentionImpl, register


def ulysses_heads_ok(heads: int, kv_heads: int, axis_size: int) -> bool:
    """Whether Ulysses can split these heads over `axis_size` devices."""
    return heads % axis_size == 0 and (kv_heads % axis_size == 0 or axis_size % kv_heads == 0)


def _seq_to_heads(x, axis_name):
    """`[b, S/P, H, d]` -> `[b, S, H/P, d]`."""
    return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def _heads_to_seq(x, axis_name):
    """`[b, S, H/P, d]` -> `[b, S/P, H, d]`."""
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q, k, v, *, axis_name: str, causal=False, segment_ids=None,
                      positions=None, sliding_window=None, scale=None, block_q=None,
                      block_k=None, return_lse=False):
    """Exact attention with the sequence sharded on `axis_name`; call inside `shard_map`.

    Args (this device's shards): q `[b, s_local, h, d]`; k, v `[b, s_local, h_kv, d]`;
      positions, segment_ids int32 `[b, s_local]` (positions default to contiguous).
    Returns: out `[b, s_local, h, d]` (and float32 lse `[b, s_local, h]`).
    """
    b, s, _, _ = q.shape
    kv_heads = k.shape[2]
    size = lax.axis_size(axis_name)
    if kv_heads < size:
        k, v = (jnp.repeat(x, size // kv_heads, axis=2) for x in (k, v))
    if positions is None:
        offset = lax.axis_index(axis_name) * s
        positions = jnp.broadcast_to(offset + jnp.arange(s, dtype=jnp.int32), (b, s))
    gather = lambda ids: None if ids is None else lax.all_gather(ids, axis_name, axis=1, tiled=True)
    result = blockwise_attention(
        _seq_to_heads(q, axis_name), _seq_to_heads(k, axis_name), _seq_to_heads(v, axis_name),
        causal=causal, segment_ids=gather(segment_ids), positions=gather(positions),
        sliding_window=sliding_window, scale=scale, block_q=block_q, block_k=block_k,
        return_lse=return_lse)
    if not return_lse:
        return _heads_to_seq(result, axis_name)
    out, lse = result
    lse = lax.all_to_all(lse, axis_name, split_axis=1, concat_axis=2, tiled=True)
    return _heads_to_seq(out, axis_name), lse


register(AttentionImpl(
    "ulysses", options=("block_q", "block_k"), sequence_parallel=True, whole_sequence=True,
    heads_ok=ulysses_heads_ok,
    build=lambda plan: lambda q, k, v, pos, seg: ulysses_attention(
        q, k, v, axis_name=plan.seq_axis, positions=pos, segment_ids=seg,
        **plan.mask_options, **plan.blocks)))
