"""Attention of a chunk of queries over a KV cache whose slots carry their own positions.

A cache slot holds a key and value and the position it was written at (-1: empty or
padding). Query i at position p sees slot t iff 0 <= pos[t] <= p (and
pos[t] > p - sliding_window): causal by position, not by slot index, so a cache may
keep any subset of keys in any slot order (eviction) and the chunk's own keys may be
written before attending. Keys are read in blocks with an online softmax, so no
`[C, T]` matrix exists beyond one `[C, block]` tile per head.

Evicting policies also need how much attention each cached key received: with
`score_weights` a second blocked pass sums each key's softmax probability over the
(weighted) queries and the query heads of its group, `[b, kv_heads, T]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEFAULT_CACHE_BLOCK = 512


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
    """`[b, Hkv, T, ...]` -> `[n, b, Hkv, block, ...]`, T padded with `fill` to n * block."""
    b, h, t = x.shape[:3]
    n = -(-t // block)
    pad = [(0, 0), (0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(b, h, n, block, *x.shape[3:]), 2, 0)


def _visible(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """q_pos `[b, C]`, k_pos `[b, Hkv, blk]` -> bool `[b, Hkv, 1, C, blk]`."""
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, :, None, None, :]
    seen = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        seen &= kp > qp - sliding_window
    return seen


def cache_attention(q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array,
                    k_pos: jax.Array, *, sliding_window: int | None = None,
                    score_weights: jax.Array | None = None, block: int = DEFAULT_CACHE_BLOCK
                    ) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention of queries over cache slots, masked by position.

    Args:
      q: `[b, C, H, hd]`; q_pos: int `[b, C]` (a query that sees no slot gets zeros).
      k, v: `[b, Hkv, T, hd]` with H % Hkv == 0; k_pos: int `[b, Hkv, T]`, -1 = empty.
      score_weights: optional float `[b, C]`, each query's weight in the key scores.
    Returns:
      out `[b, C, H, hd]` in q's dtype; key scores float32 `[b, Hkv, T]` (the sum over
      queries and the group's heads of weight * probability) or None.
    """
    b, c, heads, hd = q.shape
    kv_heads, t = k.shape[1], k.shape[2]
    block = min(block, t)
    group = heads // kv_heads
    # [b, Hkv, g, C, hd], scaled once
    qg = jnp.moveaxis(q.reshape(b, c, kv_heads, group, hd), 1, 3).astype(jnp.float32)
    qg = qg / math.sqrt(hd)
    kb, vb = _blocks(k, block, 0), _blocks(v, block, 0)
    pb = _blocks(k_pos.astype(jnp.int32), block, -1)

    def tile(kt, pt):
        s = jnp.einsum("bkgcd,bktd->bkgct", qg, kt.astype(jnp.float32))
        seen = _visible(q_pos, pt, sliding_window)
        return jnp.where(seen, s, -jnp.inf), seen

    def update(carry, blk):
        m, l, acc = carry
        kt, vt, pt = blk
        s, seen = tile(kt, pt)
        m_new = jnp.maximum(m, s.max(axis=-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that saw nothing yet
        p = jnp.where(seen, jnp.exp(s - safe[..., None]), 0.0)
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
        l = l * corr + p.sum(axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgct,bktd->bkgcd", p, vt.astype(jnp.float32))
        return m_new, l, acc

    def online(carry, blk):
        # A block no query sees (the future of a causal chunk, empty slots) is skipped.
        anyone = jnp.any(_visible(q_pos, blk[2], sliding_window))
        return jax.lax.cond(anyone, update, lambda c, _: c, carry, blk), None

    shape = (b, kv_heads, group, c)
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, hd)))
    (m, l, acc), _ = jax.lax.scan(online, init, (kb, vb, pb))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.moveaxis(out, 3, 1).reshape(b, c, heads, hd).astype(q.dtype)
    if score_weights is None:
        return out, None

    lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(l > 0, l, 1.0)),
                    jnp.inf)  # exp(s - inf) = 0 for queries that saw nothing
    weights = score_weights.astype(jnp.float32)[:, None, None, :, None]

    def scores(_, blk):
        kt, pt = blk
        s, _ = tile(kt, pt)
        p = jnp.exp(s - lse[..., None]) * weights
        return None, p.sum(axis=(2, 3))  # [b, Hkv, blk]

    _, per_block = jax.lax.scan(scores, None, (kb, pb))
    key_scores = jnp.moveaxis(per_block, 0, 2).reshape(b, kv_heads, -1)[:, :, :t]
    return out, key_scores
