"""What the Pallas kernels share: the block schedule and the position/segment mask.

The schedule is computed in XLA before a kernel runs. For every batch element and
query block it lists the key blocks the mask leaves (partly) visible, compacted to the
front and padded by repeating the last visible one; the kernel's index maps read
this list, so a hidden block is never even loaded (a repeated block index makes the
pipeline skip the copy). The transposed list (query blocks per key block) drives the
dK/dV pass. Each entry also says whether its tile needs the mask at all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lctx.kernels.blockwise import MaskSpec

SKIP, FULL, MASKED = 0, 1, 2


class Schedule(NamedTuple):
    """int32 arrays `[batch, rows, cols]`: for each row block, the visible column blocks
    in order (`index`) and their kind (`kind`, SKIP for the padding), and `count`
    `[batch, rows]` (how many entries are real)."""

    index: jax.Array
    kind: jax.Array
    count: jax.Array


def _ranges(ids: jax.Array, block: int):
    """(min, max) of int ids `[b, s]` per block -> two `[b, s // block]` arrays."""
    b, s = ids.shape
    tiles = ids.reshape(b, s // block, block)
    return tiles.min(-1), tiles.max(-1)


def tile_kinds(q_pos, k_pos, q_seg, k_seg, mask: MaskSpec, block_q: int, block_k: int):
    """int32 `[b, nq, nk]`: SKIP where the mask hides the whole tile, FULL where it hides
    nothing, MASKED otherwise. Conservative like `masking.blocks_may_interact`: a tile
    with any visible pair is never SKIP."""
    (qlo, qhi), (klo, khi) = _ranges(q_pos, block_q), _ranges(k_pos, block_k)
    qlo, qhi, klo, khi = qlo[:, :, None], qhi[:, :, None], klo[:, None, :], khi[:, None, :]
    may = jnp.ones(jnp.broadcast_shapes(qlo.shape, klo.shape), bool)
    full = may
    if q_seg is not None:
        (qslo, qshi), (kslo, kshi) = _ranges(q_seg, block_q), _ranges(k_seg, block_k)
        qslo, qshi, kslo, kshi = qslo[:, :, None], qshi[:, :, None], kslo[:, None], kshi[:, None]
        may = may & (qslo <= kshi) & (kslo <= qshi)
        full = full & (qslo == qshi) & (kslo == kshi) & (qslo == kslo)
    if mask.causal:
        may = may & (klo <= qhi)
        full = full & (khi <= qlo)
    if mask.sliding_window is not None:
        may = may & (khi > qlo - mask.sliding_window)
        full = full & (klo > qhi - mask.sliding_window)
    if not (mask.any_position_mask() or q_seg is not None):
        return jnp.full(may.shape, FULL, jnp.int32)
    return jnp.where(may, jnp.where(full, FULL, MASKED), SKIP).astype(jnp.int32)


def compact(kinds: jax.Array) -> Schedule:
    """Moves the non-SKIP columns of every row of `kinds` `[b, rows, cols]` to the front."""
    cols = kinds.shape[-1]
    visible = kinds != SKIP
    order = jnp.argsort(~visible, axis=-1, stable=True).astype(jnp.int32)
    count = visible.sum(-1).astype(jnp.int32)
    t = jnp.arange(cols, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    real = t < count[..., None]
    index = jnp.where(real, order, last)
    kind = jnp.where(real, jnp.take_along_axis(kinds, order, axis=-1), SKIP)
    return Schedule(index, kind.astype(jnp.int32), count)


def schedules(q_pos, k_pos, q_seg, k_seg, mask: MaskSpec, block_q: int, block_k: int):
    """(by query block, by key block) schedules and the int32 number of tiles with any
    visible pair in some batch element (the counterpart of `blockwise.fwd_hm`'s count)."""
    kinds = tile_kinds(q_pos, k_pos, q_seg, k_seg, mask, block_q, block_k)
    tiles = jnp.any(kinds != SKIP, axis=0).sum().astype(jnp.int32)
    return compact(kinds), compact(kinds.transpose(0, 2, 1)), tiles


def visible(q_pos, k_pos, q_seg, k_seg, mask: MaskSpec):
    """Boolean tile mask from broadcastable id tiles (`[bq, 1]` or `[bq, n]` against
    `[1, bk]`); None when nothing is masked. Used inside kernels."""
    out = None

    def both(a, b):
        return b if a is None else a & b

    if q_seg is not None:
        out = both(out, q_seg == k_seg)
    if mask.causal:
        out = both(out, k_pos <= q_pos)
    if mask.sliding_window is not None:
        out = both(out, k_pos > q_pos - mask.sliding_window)
    return out
