"""Attention of a chunk of queries over a KV cache whose slots carry their own positions.

A cache slot holds a key and value and the position it was written at (-1: empty or
padding). Query i at position p sees slot t iff 0 <= pos[t] <= p (and
pos[t] > p - sliding_window): causal by position, not by slot index, so a cache may
keep any subset of keys in any slot order (eviction) and the chunk's own keys may be
written before attending. Keys are read in blocks with an online softmax, so no
`[C, T]` matrix exists beyond one `[block_q, block]` tile per head.

Evicting policies also need how much attention each cached key received: with
`score_weights` a second blocked pass sums each key's softmax probability over the
(weighted) queries and the query heads of its group, `[b, kv_heads, T]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEFAULT_CACHE_BLOCK = 512  # keys per tile
DEFAULT_CACHE_BLOCK_Q = 256  # queries per tile: a tile small enough to stay in cache


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
    """`[b, Hkv, T, ...]` -> `[n, b, Hkv, block, ...]`, T padded with `fill` to n * block."""
    b, h, t = x.shape[:3]
    n = -(-t // block)
    pad = [(0, 0), (0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 3)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.moveaxis(x.reshape(b, h, n, block, *x.shape[3:]), 2, 0)


def _pad_slots(x: jax.Array, block: int, fill) -> jax.Array:
    """`[b, Hkv, T, ...]` padded with `fill` along T to a multiple of `block` (a copy only
    when T is not one already)."""
    extra = -x.shape[2] % block
    if not extra:
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)


def _visible(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """q_pos `[b, C]`, k_pos `[b, Hkv, blk]` -> bool `[b, Hkv, 1, C, blk]`."""
    qp, kp = q_pos[:, None, None, :, None], k_pos[:, :, None, None, :]
    seen = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        seen &= kp > qp - sliding_window
    return seen


def cache_attention(q: jax.Array, q_pos: jax.Array, k: jax.Array, v: jax.Array,
                    k_pos: jax.Array, *, sliding_window: int | None = None,
                    score_weights: jax.Array | None = None, block: int = DEFAULT_CACHE_BLOCK,
                    block_q: int = DEFAULT_CACHE_BLOCK_Q) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention of queries over cache slots, masked by position.

    Args:
      q: `[b, C, H, hd]`; q_pos: int `[b, C]` (a query that sees no slot gets zeros).
      k, v: `[b, Hkv, T, hd]` with H % Hkv == 0; k_pos: int `[b, Hkv, T]`, -1 = empty.
      score_weights: optional float `[b, C]`, each query's weight in the key scores.
      block, block_q: key and query tile sizes (a `[block_q, block]` tile per head).
    Returns:
      out `[b, C, H, hd]` in q's dtype; key scores float32 `[b, Hkv, T]` (the sum over
      queries and the group's heads of weight * probability) or None.
    """
    b, c, heads, hd = q.shape
    kv_heads, t = k.shape[1], k.shape[2]
    block, block_q = min(block, t), min(block_q, c)
    group = heads // kv_heads
    k, v, k_pos = _pad_slots(k, block, 0), _pad_slots(v, block, 0), _pad_slots(k_pos, block, -1)
    starts = jnp.arange(k.shape[2] // block) * block  # key tiles are sliced, not copied out
    key_tile = lambda i: tuple(jax.lax.dynamic_slice_in_dim(x, i, block, axis=2)
                               for x in (k, v, k_pos))
    # Query tiles [n, b, Hkv, g, block_q, hd], scaled once; padded queries (position -1)
    # see nothing.
    qg = jnp.swapaxes(q.reshape(b, c, kv_heads, group, hd), 1, 2).astype(jnp.float32)
    qg = jnp.swapaxes(_blocks(qg, block_q, 0), 3, 4) / math.sqrt(hd)
    rows = lambda x, fill: _blocks(x[:, None, :], block_q, fill)[:, :, 0]  # [b, C] -> [n, b, bq]
    qp = rows(q_pos.astype(jnp.int32), -1)

    def tile(qt, qpt, kt, pt):
        s = jnp.einsum("bkgcd,bktd->bkgct", qt, kt.astype(jnp.float32))
        seen = _visible(qpt, pt, sliding_window)
        return jnp.where(seen, s, -jnp.inf), seen

    def attend_rows(qt, qpt):
        """One query tile against every key block: (m, l, acc) of the online softmax."""

        def update(carry, blk):
            m, l, acc = carry
            kt, vt, pt = key_tile(blk)
            s, seen = tile(qt, qpt, kt, pt)
            m_new = jnp.maximum(m, s.max(axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that saw nothing yet
            p = jnp.where(seen, jnp.exp(s - safe[..., None]), 0.0)
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            l = l * corr + p.sum(axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgct,bktd->bkgcd", p,
                                                     vt.astype(jnp.float32))
            return m_new, l, acc

        def online(carry, blk):
            # A tile no query sees (the future of a causal chunk, empty slots) is skipped.
            pt = jax.lax.dynamic_slice_in_dim(k_pos, blk, block, axis=2)
            anyone = jnp.any(_visible(qpt, pt, sliding_window))
            return jax.lax.cond(anyone, update, lambda c, _: c, carry, blk), None

        shape = qt.shape[:-1]
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(qt.shape))
        return jax.lax.scan(online, init, starts)[0]

    m, l, acc = jax.lax.map(lambda x: attend_rows(*x), (qg, qp))  # [n, b, Hkv, g, bq(, hd)]
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, group, -1, hd)[:, :, :, :c]
    out = jnp.moveaxis(out, 3, 1).reshape(b, c, heads, hd).astype(q.dtype)
    if score_weights is None:
        return out, None

    lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(l > 0, l, 1.0)),
                    jnp.inf)  # exp(s - inf) = 0 for queries that saw nothing
    wb = rows(score_weights.astype(jnp.float32), 0)

    def key_scores(rows):
        qt, qpt, lse_t, w = rows
        weights = w[:, None, None, :, None]

        def per_block(_, blk):
            kt, _, pt = key_tile(blk)
            s, _ = tile(qt, qpt, kt, pt)
            return None, (jnp.exp(s - lse_t[..., None]) * weights).sum(axis=(2, 3))

        return jax.lax.scan(per_block, None, starts)[1]  # [nk, b, Hkv, block]

    per_tile = jax.lax.map(key_scores, (qg, qp, lse, wb)).sum(axis=0)
    return out, jnp.moveaxis(per_tile, 0, 2).reshape(b, kv_heads, -1)[:, :, :t]
