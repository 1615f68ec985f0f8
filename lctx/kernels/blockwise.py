"""Blockwise exact attention (FlashAttention / BPT) in plain JAX, and the block seam.

The seam is a pair of functions over one query block and one key/value block:

  block_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg) -> (o, lse)
  block_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do) -> (dq, dk, dv)

`lse` in the backward may be the *global* log-sum-exp of the query rows (what a ring
needs), in which case the returned gradients are this key block's share of the full
gradients. Internally both work in a head-major layout (`q` as
`[batch, kv_heads, groups, seq, head_dim]`, `k`/`v` as `[batch, kv_heads, seq, head_dim]`)
so that every block product is one batched matmul and GQA shares K/V without copies;
strategies (blockwise, ring, Ulysses) transpose once and call the `*_hm` functions.

Within a call the work is tiled into `block_q x block_k` tiles with an online
softmax. A tile the mask hides completely is skipped by a `lax.switch` (not computed
and then masked); a tile the mask leaves fully visible skips the mask arithmetic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lctx.kernels.masking import block_ranges, blocks_may_interact, pair_mask
from lctx.kernels.reference import default_positions
from lctx.kernels.registry import AttentionImpl, register

# Tiles of 512 x 512 keep each score tile (1 MiB fp32 per head) in cache on CPU
# while amortising the per-iteration loop overhead; measured by lctx.bench.attention.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512

_SKIP, _FULL, _MASKED = 0, 1, 2


class MaskSpec(NamedTuple):
    """Static masking options shared by every kernel."""

    causal: bool = False
    sliding_window: int | None = None

    def any_position_mask(self) -> bool:
        return self.causal or self.sliding_window is not None


# ----------------------------------------------------------------------------- layout


def q_to_head_major(q: jax.Array, kv_heads: int) -> jax.Array:
    """`[b, s, h, d]` -> `[b, kv_heads, h // kv_heads, s, d]`."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def q_from_head_major(qh: jax.Array) -> jax.Array:
    """`[b, kv_heads, groups, s, d]` -> `[b, s, kv_heads * groups, d]`."""
    b, hkv, g, s, d = qh.shape
    return qh.transpose(0, 3, 1, 2, 4).reshape(b, s, hkv * g, d)


def kv_to_head_major(k: jax.Array) -> jax.Array:
    """`[b, s, h_kv, d]` -> `[b, h_kv, s, d]`."""
    return k.transpose(0, 2, 1, 3)


def kv_from_head_major(kh: jax.Array) -> jax.Array:
    """`[b, h_kv, s, d]` -> `[b, s, h_kv, d]`."""
    return kh.transpose(0, 2, 1, 3)


def lse_from_head_major(lse_h: jax.Array) -> jax.Array:
    """`[b, kv_heads, groups, s]` -> `[b, s, heads]`."""
    b, hkv, g, s = lse_h.shape
    return lse_h.transpose(0, 3, 1, 2).reshape(b, s, hkv * g)


def lse_to_head_major(lse: jax.Array, kv_heads: int) -> jax.Array:
    """`[b, s, heads]` -> `[b, kv_heads, heads // kv_heads, s]`."""
    b, s, h = lse.shape
    return lse.reshape(b, s, kv_heads, h // kv_heads).transpose(0, 2, 3, 1)


def effective_block(block: int | None, seq: int, default: int) -> int:
    """The tile size used for a sequence: the requested one capped at the sequence, or
    by default the largest divisor of the sequence not above `default`."""
    if block is not None:
        return min(block, seq)
    block = min(default, seq)
    while seq % block:
        block -= 1
    return block


# ----------------------------------------------------------------------------- tiles


def _tile_kind(q_ranges, k_ranges, mask: MaskSpec) -> jax.Array:
    """int32 scalar: _SKIP (fully masked), _FULL (fully visible) or _MASKED."""
    qp, kp, qs, ks = q_ranges[:2], k_ranges[:2], q_ranges[2:], k_ranges[2:]
    has_seg = len(qs) == 2
    may = blocks_may_interact(qp, kp, qs if has_seg else None, ks if has_seg else None,
                              causal=mask.causal, sliding_window=mask.sliding_window)
    full = jnp.ones(qp[0].shape, dtype=bool)
    if has_seg:
        full &= (qs[0] == qs[1]) & (ks[0] == ks[1]) & (qs[0] == ks[0])
    if mask.causal:
        full &= kp[1] <= qp[0]
    if mask.sliding_window is not None:
        full &= kp[0] > qp[1] - mask.sliding_window
    return jnp.where(may, jnp.where(jnp.all(full), _FULL, _MASKED), _SKIP).astype(jnp.int32)


def _tile_logits(q_tile, kt_tile, q_pos, k_pos, q_seg, k_seg, mask: MaskSpec, masked: bool):
    """Scaled logits `[b, hkv, rows, bk]` in float32, -inf where masked.

    `q_tile` is `[b, hkv, rows, d]` with rows = (group, query) and `q_pos`/`q_seg`
    `[b, rows]`; `kt_tile` is K transposed, `[b, hkv, d, bk]`: the matmul's right
    operand as [contracting, columns], so XLA:CPU needs no per-tile copy of it.
    """
    s = jnp.einsum("bhrd,bhdk->bhrk", q_tile, kt_tile, preferred_element_type=jnp.float32)
    if masked:
        m = pair_mask(q_pos, k_pos, q_seg, k_seg, causal=mask.causal,
                      sliding_window=mask.sliding_window)
        s = jnp.where(m[:, None], s, -jnp.inf)
    return s


def _split(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Splits `axis` into (n, block) and moves n to the front: a scan over tiles."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of `_split`: tiles at the front back into `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _t(x: jax.Array) -> jax.Array:
    """Swaps the last two axes (`[..., s, d]` <-> `[..., d, s]`)."""
    return jnp.swapaxes(x, -1, -2)


def _q_tiles(x: jax.Array, block: int) -> jax.Array:
    """`[b, hkv, g, sq, ...]` -> `[n, b, hkv, g * block, ...]`: query tiles as rows.

    A tile's rows are (group, query) pairs, so every product in a tile is one matmul
    per K/V head with plain 2-D operands (GQA groups share K/V without copies).
    """
    t = _split(x, 3, block)
    return t.reshape(t.shape[:3] + (t.shape[3] * t.shape[4],) + t.shape[5:])


def _q_untile(t: jax.Array, groups: int) -> jax.Array:
    """Inverse of `_q_tiles`."""
    t = t.reshape(t.shape[:3] + (groups, t.shape[3] // groups) + t.shape[4:])
    return _merge(t, 3)


def _ids_tiles(ids, block, groups: int = 1):
    """Int ids `[b, s]` -> tiles `[n, b, groups * block]` (repeated per group) and
    their (min, max) ranges `[n, b]`."""
    if ids is None:
        return None, ()
    t = _split(ids, 1, block)
    if groups > 1:
        n, b, _ = t.shape
        t = jnp.broadcast_to(t[:, :, None], (n, b, groups, block)).reshape(n, b, groups * block)
    return t, block_ranges(ids, block)


# ----------------------------------------------------------------------------- tile lists


def _visible_tiles(q_ranges, k_ranges, mask: MaskSpec, nq: int, nk: int):
    """The tiles to compute, as a flat list in query-major order.

    Returns (tile `[nq * nk]` int32: flat index i * nk + j of each tile the mask does
    not hide completely, first `count` entries valid; kind `[nq * nk]` int32 per
    flat index; count int32). Without any mask every tile is _FULL.
    """
    if not q_ranges:
        return (jnp.arange(nq * nk, dtype=jnp.int32), jnp.full((nq * nk,), _FULL, jnp.int32),
                jnp.int32(nq * nk))
    kind_of = jax.vmap(jax.vmap(lambda qr, kr: _tile_kind(qr, kr, mask), (None, 0)), (0, None))
    kind = kind_of(q_ranges, k_ranges).reshape(nq * nk)
    visible = kind != _SKIP
    (tile,) = jnp.nonzero(visible, size=nq * nk, fill_value=0)
    return tile.astype(jnp.int32), kind, visible.sum(dtype=jnp.int32)


def _at(x, i):
    """Tile `i` of tiles stacked on axis 0 (None stays None)."""
    return None if x is None else lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _add_at(x, i, tile):
    """`x` with `tile` added to its tile `i` (in place inside the loop)."""
    return lax.dynamic_update_index_in_dim(x, _at(x, i) + tile, i, 0)


def _set_at(x, i, tile):
    return lax.dynamic_update_index_in_dim(x, tile, i, 0)


def _by_kind(kind, masked_any: bool, compute):
    """`compute(masked)` for a visible tile: the mask arithmetic only where needed."""
    if not masked_any:
        return compute(False)
    return lax.cond(kind == _MASKED, lambda: compute(True), lambda: compute(False))


# ----------------------------------------------------------------------------- forward


def fwd_hm(qh, kh, vh, q_pos, k_pos, q_seg, k_seg, *, mask: MaskSpec, scale: float,
           block_q: int | None = None, block_k: int | None = None):
    """Forward over one query block and one key/value block, head-major.

    Args:
      qh: `[b, hkv, g, sq, d]`; kh, vh: `[b, hkv, sk, d]`; q_pos/q_seg `[b, sq]`,
        k_pos/k_seg `[b, sk]` (int32; segments may be None).
    Returns:
      o float32 `[b, hkv, g, sq, d]` (normalised by this block's own softmax),
      lse float32 `[b, hkv, g, sq]` (-inf where no key is visible, o 0 there),
      and the int32 number of tiles actually computed.

    One loop runs over the visible tiles only (a flat list from the position and
    segment ranges), updating its query tile's online-softmax state in place.
    """
    b, hkv, g, sq, d = qh.shape
    sk = kh.shape[2]
    bq = effective_block(block_q, sq, DEFAULT_BLOCK_Q)
    bk = effective_block(block_k, sk, DEFAULT_BLOCK_K)
    nq, nk, rows = sq // bq, sk // bk, g * bq
    masked_any = mask.any_position_mask() or q_seg is not None
    qh = qh * jnp.asarray(scale, qh.dtype)

    q_tiles, kt_tiles, v_tiles = _q_tiles(qh, bq), _split(_t(kh), 3, bk), _split(vh, 2, bk)
    qp_t, qp_r = _ids_tiles(q_pos, bq, g)
    kp_t, kp_r = _ids_tiles(k_pos, bk)
    qs_t, qs_r = _ids_tiles(q_seg, bq, g)
    ks_t, ks_r = _ids_tiles(k_seg, bk)
    tiles, kinds, count = _visible_tiles(
        _zip_ranges(qp_r, qs_r) if masked_any else (),
        _zip_ranges(kp_r, ks_r) if masked_any else (), mask, nq, nk)

    def body(t, state):
        m_all, l_all, acc_all, n = state
        i, j = tiles[t] // nk, tiles[t] % nk
        q_tile, kt_tile, v_tile = _at(q_tiles, i), _at(kt_tiles, j), _at(v_tiles, j)
        m, l, acc = _at(m_all, i), _at(l_all, i), _at(acc_all, i)

        def update(masked):
            s = _tile_logits(q_tile, kt_tile, _at(qp_t, i), _at(kp_t, j), _at(qs_t, i),
                             _at(ks_t, j), mask, masked)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bhrk,bhkd->bhrd", p.astype(v_tile.dtype), v_tile,
                            preferred_element_type=jnp.float32)
            return m_new, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv

        m, l, acc = _by_kind(kinds[tiles[t]], masked_any, update)
        return _set_at(m_all, i, m), _set_at(l_all, i, l), _set_at(acc_all, i, acc), n + 1

    state = (jnp.full((nq, b, hkv, rows), -jnp.inf, jnp.float32),
             jnp.zeros((nq, b, hkv, rows), jnp.float32),
             jnp.zeros((nq, b, hkv, rows, d), jnp.float32), jnp.int32(0))
    # `computed` is counted by the loop body itself: the tiles that actually ran.
    m, l, acc, computed = lax.fori_loop(0, count, body, state)
    seen = l > 0.0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return _q_untile(o, g), _q_untile(lse, g), computed


def _zip_ranges(pos_r, seg_r):
    """(min, max) position ranges followed by segment ranges, as one tuple."""
    return tuple(pos_r) + tuple(seg_r)


# ----------------------------------------------------------------------------- backward


def bwd_hm(qh, kh, vh, q_pos, k_pos, q_seg, k_seg, do_h, lse_h, delta_h, *, mask: MaskSpec,
           scale: float, block_q: int | None = None, block_k: int | None = None):
    """FlashAttention-2 backward over one query block and one key/value block, head-major.

    Recomputes p = exp(s - lse) tile by tile from the (possibly global) `lse_h`
    `[b, hkv, g, sq]`; `delta_h` = rowsum(dO * O) of the *full* output (minus any
    cotangent of lse), `[b, hkv, g, sq]`; `do_h` `[b, hkv, g, sq, d]`.
    Returns float32 (dq `[b, hkv, g, sq, d]`, dk, dv `[b, hkv, sk, d]`): this key
    block's contribution. Like the forward, one loop over the visible tiles only;
    dQ, dK and dV (float32, O(seq)) are accumulated in place tile by tile.
    """
    b, hkv, g, sq, d = qh.shape
    sk = kh.shape[2]
    bq = effective_block(block_q, sq, DEFAULT_BLOCK_Q)
    bk = effective_block(block_k, sk, DEFAULT_BLOCK_K)
    nq, nk = sq // bq, sk // bk
    masked_any = mask.any_position_mask() or q_seg is not None
    qh = qh * jnp.asarray(scale, qh.dtype)
    # Rows that saw no key have lse = -inf; +inf makes their p exactly 0.
    lse_h = jnp.where(jnp.isneginf(lse_h), jnp.inf, lse_h)

    # Every product keeps the [rows, bk] operand where XLA:CPU's matmul takes it as
    # is (left with bk contracted last, or right with rows contracted first), so only
    # [*, d] operands are transposed (once, here), and dK, dV are built transposed.
    q_tiles, do_tiles = _q_tiles(qh, bq), _q_tiles(do_h, bq)
    qt_tiles, dot_tiles = _t(q_tiles), _t(do_tiles)
    lse_tiles, delta_tiles = _q_tiles(lse_h, bq), _q_tiles(delta_h, bq)
    k_tiles, kt_tiles, vt_tiles = _split(kh, 2, bk), _split(_t(kh), 3, bk), _split(_t(vh), 3, bk)
    qp_t, qp_r = _ids_tiles(q_pos, bq, g)
    kp_t, kp_r = _ids_tiles(k_pos, bk)
    qs_t, qs_r = _ids_tiles(q_seg, bq, g)
    ks_t, ks_r = _ids_tiles(k_seg, bk)
    tiles, kinds, count = _visible_tiles(
        _zip_ranges(qp_r, qs_r) if masked_any else (),
        _zip_ranges(kp_r, ks_r) if masked_any else (), mask, nq, nk)

    def body(t, grads):
        dq_all, dkt_all, dvt_all = grads
        i, j = tiles[t] // nk, tiles[t] % nk
        q_tile, do_tile, lse_t, delta_t = (_at(x, i) for x in (q_tiles, do_tiles, lse_tiles,
                                                                delta_tiles))
        k_tile, kt_tile, vt_tile = _at(k_tiles, j), _at(kt_tiles, j), _at(vt_tiles, j)

        def tile_grads(masked):
            s = _tile_logits(q_tile, kt_tile, _at(qp_t, i), _at(kp_t, j), _at(qs_t, i),
                             _at(ks_t, j), mask, masked)
            p = jnp.exp(s - lse_t[..., None])
            dvt = jnp.einsum("bhdr,bhrk->bhdk", _at(dot_tiles, i), p.astype(do_tile.dtype),
                             preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhrd,bhdk->bhrk", do_tile, vt_tile,
                            preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_t[..., None])).astype(q_tile.dtype)
            dq = jnp.einsum("bhrk,bhkd->bhrd", ds, k_tile, preferred_element_type=jnp.float32)
            dkt = jnp.einsum("bhdr,bhrk->bhdk", _at(qt_tiles, i), ds,
                             preferred_element_type=jnp.float32)
            return dq, dkt, dvt

        dq, dkt, dvt = _by_kind(kinds[tiles[t]], masked_any, tile_grads)
        return _add_at(dq_all, i, dq), _add_at(dkt_all, j, dkt), _add_at(dvt_all, j, dvt)

    grads = (jnp.zeros(q_tiles.shape, jnp.float32), jnp.zeros(kt_tiles.shape, jnp.float32),
             jnp.zeros(vt_tiles.shape, jnp.float32))
    dq_tiles, dk_tiles, dv_tiles = lax.fori_loop(0, count, body, grads)
    # dq was taken against the scaled q: d(loss)/d(q) = scale * d(loss)/d(q * scale).
    dq = _q_untile(dq_tiles, g) * scale
    dk = _t(_merge(dk_tiles, 3))
    dv = _t(_merge(dv_tiles, 3))
    return dq, dk, dv


def delta_hm(o_h: jax.Array, do_h: jax.Array) -> jax.Array:
    """rowsum(dO * O) in float32, `[b, hkv, g, s]`."""
    return jnp.einsum("bhgqd,bhgqd->bhgq", do_h.astype(jnp.float32), o_h.astype(jnp.float32))


# ----------------------------------------------------------------------------- the seam


def block_fwd(q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, causal=False,
              sliding_window=None, scale=None, block_q=None, block_k=None):
    """Attention of one query block against one key/value block.

    Args: q `[b, sq, h, d]`, k/v `[b, sk, h_kv, d]`, positions and segment ids int32
    `[b, sq]` / `[b, sk]` (segments may be None).
    Returns: (o float32 `[b, sq, h, d]`, lse float32 `[b, sq, h]`); partial results over
    disjoint key blocks merge by `merge_partials`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o_h, lse_h, _ = fwd_hm(q_to_head_major(q, k.shape[2]), kv_to_head_major(k),
                           kv_to_head_major(v), q_pos, k_pos, q_seg, k_seg,
                           mask=MaskSpec(causal, sliding_window), scale=scale,
                           block_q=block_q, block_k=block_k)
    return q_from_head_major(o_h), lse_from_head_major(lse_h)


def block_bwd(q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do, *, causal=False,
              sliding_window=None, scale=None, block_q=None, block_k=None):
    """Gradients of one query block / key-value block pair, given the output `o`
    `[b, sq, h, d]` and log-sum-exp `lse` `[b, sq, h]` of the rows (global ones for a
    ring). Returns float32 (dq `[b, sq, h, d]`, dk, dv `[b, sk, h_kv, d]`).
    """
    kv_heads = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o_h, do_h = q_to_head_major(o, kv_heads), q_to_head_major(do, kv_heads)
    dq, dk, dv = bwd_hm(q_to_head_major(q, kv_heads), kv_to_head_major(k), kv_to_head_major(v),
                        q_pos, k_pos, q_seg, k_seg, do_h.astype(q.dtype),
                        lse_to_head_major(lse, kv_heads), delta_hm(o_h, do_h),
                        mask=MaskSpec(causal, sliding_window), scale=scale,
                        block_q=block_q, block_k=block_k)
    return q_from_head_major(dq), kv_from_head_major(dk), kv_from_head_major(dv)


def merge_partials(o1, lse1, o2, lse2):
    """Combines two partial attentions over disjoint keys; -inf rows stay 0, never NaN.

    o: float32 `[..., d]`; lse: float32 `[...]` (matching leading dims).
    """
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    o = o1 * jnp.exp(lse1 - safe)[..., None] + o2 * jnp.exp(lse2 - safe)[..., None]
    return o, lse


# ----------------------------------------------------------------------------- blockwise


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise_hm(qh, kh, vh, pos, seg, mask, scale, block_q, block_k):
    o, lse, _ = fwd_hm(qh, kh, vh, pos, pos, seg, seg, mask=mask, scale=scale,
                       block_q=block_q, block_k=block_k)
    return o.astype(qh.dtype), lse


def _blockwise_hm_fwd(qh, kh, vh, pos, seg, mask, scale, block_q, block_k):
    o, lse = _blockwise_hm(qh, kh, vh, pos, seg, mask, scale, block_q, block_k)
    return (o, lse), (qh, kh, vh, pos, seg, o, lse)


def _blockwise_hm_bwd(mask, scale, block_q, block_k, res, cotangents):
    qh, kh, vh, pos, seg, o, lse = res
    do, dlse = cotangents
    # d lse / d s = p, so an lse cotangent enters exactly like -delta.
    delta = delta_hm(o, do) - dlse
    dq, dk, dv = bwd_hm(qh, kh, vh, pos, pos, seg, seg, do.astype(qh.dtype), lse, delta,
                        mask=mask, scale=scale, block_q=block_q, block_k=block_k)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_blockwise_hm.defvjp(_blockwise_hm_fwd, _blockwise_hm_bwd)


def blockwise_attention(q, k, v, *, causal=False, segment_ids=None, positions=None,
                        sliding_window=None, scale=None, block_q=None, block_k=None,
                        return_lse=False):
    """Exact attention in O(seq) memory: tiles with an online softmax, custom VJP.

    Args:
      q `[b, s, h, d]`; k, v `[b, s, h_kv, d]` (h % h_kv == 0); segment_ids, positions
      int32 `[b, s]`; block_q / block_k tile sizes dividing s (default 512, capped at s).
    Returns:
      out `[b, s, h, d]` in q's dtype (and float32 lse `[b, s, h]` with `return_lse`).
      The backward recomputes scores tile by tile from the saved output and lse.
    """
    b, s, _, _ = q.shape
    kv_heads = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    positions = default_positions(b, s) if positions is None else positions
    o_h, lse_h = _blockwise_hm(q_to_head_major(q, kv_heads), kv_to_head_major(k),
                               kv_to_head_major(v), positions, segment_ids,
                               MaskSpec(causal, sliding_window), scale, block_q, block_k)
    out = q_from_head_major(o_h)
    return (out, lse_from_head_major(lse_h)) if return_lse else out


register(AttentionImpl(
    "blockwise", options=("block_q", "block_k"),
    build=lambda plan: lambda q, k, v, pos, seg: blockwise_attention(
        q, k, v, positions=pos, segment_ids=seg, **plan.mask_options, **plan.blocks)))
