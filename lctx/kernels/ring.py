"""Ring attention (Liu et al. 2023) over a sequence-sharded mesh axis.

Called inside `shard_map`: each device keeps its query shard; key/value shards,
with their positions and segment ids, rotate one hop per step with `lax.ppermute`.
The local work per step is the block seam (`fwd_hm` / `bwd_hm`), and partial
results merge by log-sum-exp. The transfer for step t+1 is issued before step t's
compute so XLA can overlap them, and K/V are not sent after the last step.

Backward (custom VJP): dQ accumulates locally; dK/dV accumulators in float32
travel with their K/V shard and, after one final hop, arrive back at the owner.
Nothing of size `[seq, seq]` and no gathered K/V ever exists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lctx.kernels import blockwise as bw
from lctx.kernels.blockwise import MaskSpec
from lctx.kernels.pallas import PallasSeam
from lctx.kernels.registry import AttentionImpl, register


# Default tiles of the XLA seam in a ring. All P devices' tiles run at once on the
# host's shared cores and caches on CPU, so smaller tiles than a single device's
# (blockwise.DEFAULT_BLOCK_Q) keep each working set in cache; measured with
# `python -m lctx.bench.attention --impls ring,baseline --block_q 256,512 --block_k 256,512`.
DEFAULT_RING_BLOCK = 256


def _ring_blocks(block_q, block_k, local_seq: int, seam):
    """The tile sizes passed to `seam`: the ring default for the XLA seam when unset."""
    if seam is not bw:
        return block_q, block_k
    return tuple(bw.effective_block(b, local_seq, DEFAULT_RING_BLOCK) for b in (block_q, block_k))


def _shift(tree, axis_name: str):
    """Sends every leaf one hop around the ring: device i -> i + 1."""
    size = lax.axis_size(axis_name)
    perm = [(i, (i + 1) % size) for i in range(size)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _ring_forward(qh, kh, vh, pos, seg, *, axis_name, mask, scale, block_q, block_k,
                  seam=bw):
    """Returns (o float32 `[b, hkv, g, s, d]`, lse `[b, hkv, g, s]`, tiles computed)."""
    b, hkv, g, s, d = qh.shape
    steps = lax.axis_size(axis_name)

    def compute(state, kv):
        o, lse, count = state
        kv_cur, pos_cur, seg_cur = kv
        k_cur, v_cur = kv_cur
        o_t, lse_t, n = seam.fwd_hm(qh, k_cur, v_cur, pos, pos_cur, seg, seg_cur, mask=mask,
                                  scale=scale, block_q=block_q, block_k=block_k)
        o, lse = bw.merge_partials(o, lse, o_t, lse_t)
        return o, lse, count + n

    def step(carry, _):
        state, kv = carry
        kv_next = _shift(kv, axis_name)
        return (compute(state, kv), kv_next), None

    state = (jnp.zeros((b, hkv, g, s, d), jnp.float32),
             jnp.full((b, hkv, g, s), -jnp.inf, jnp.float32), jnp.int32(0))
    # K and V travel stacked: one transfer (and one device rendezvous) per step for both.
    kv = (jnp.stack([kh, vh]), pos, seg)
    (state, kv), _ = lax.scan(step, (state, kv), None, length=steps - 1)
    return compute(state, kv)


def _ring_backward(qh, kh, vh, pos, seg, do_h, lse, delta, *, axis_name, mask, scale,
                   block_q, block_k, seam=bw):
    """Returns float32 (dq `[b, hkv, g, s, d]`, dk, dv `[b, hkv, s, d]`) for the owner."""
    steps = lax.axis_size(axis_name)

    def compute(dq, kv, dkv):
        kv_cur, pos_cur, seg_cur = kv
        dq_t, dk_t, dv_t = seam.bwd_hm(qh, kv_cur[0], kv_cur[1], pos, pos_cur, seg, seg_cur,
                                     do_h, lse, delta, mask=mask, scale=scale,
                                     block_q=block_q, block_k=block_k)
        return dq + dq_t, dkv + jnp.stack([dk_t, dv_t])

    def step(carry, _):
        dq, kv, dkv = carry
        kv_next = _shift(kv, axis_name)
        dq, dkv = compute(dq, kv, dkv)
        return (dq, kv_next, _shift(dkv, axis_name)), None

    # K, V and their dK, dV accumulators travel stacked, one transfer per step each.
    carry = (jnp.zeros(qh.shape, jnp.float32), (jnp.stack([kh, vh]), pos, seg),
             jnp.zeros((2,) + kh.shape, jnp.float32))
    (dq, kv, dkv), _ = lax.scan(step, carry, None, length=steps - 1)
    dq, dkv = compute(dq, kv, dkv)
    dk, dv = _shift(dkv, axis_name)  # the last hop home: the accumulators reach their owner
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring_hm(qh, kh, vh, pos, seg, axis_name, mask, scale, block_q, block_k, seam):
    o, lse, _ = _ring_forward(qh, kh, vh, pos, seg, axis_name=axis_name, mask=mask,
                              scale=scale, block_q=block_q, block_k=block_k, seam=seam)
    return o.astype(qh.dtype), lse


def _ring_hm_fwd(qh, kh, vh, pos, seg, axis_name, mask, scale, block_q, block_k, seam):
    o, lse = _ring_hm(qh, kh, vh, pos, seg, axis_name, mask, scale, block_q, block_k, seam)
    return (o, lse), (qh, kh, vh, pos, seg, o, lse)


def _ring_hm_bwd(axis_name, mask, scale, block_q, block_k, seam, res, cotangents):
    qh, kh, vh, pos, seg, o, lse = res
    do, dlse = cotangents
    delta = bw.delta_hm(o, do) - dlse
    dq, dk, dv = _ring_backward(qh, kh, vh, pos, seg, do.astype(qh.dtype), lse, delta,
                                axis_name=axis_name, mask=mask, scale=scale,
                                block_q=block_q, block_k=block_k, seam=seam)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_ring_hm.defvjp(_ring_hm_fwd, _ring_hm_bwd)


def _zigzag_dest(chunk: int, shards: int) -> int:
    """The device that holds natural chunk `chunk` (of 2P) under zigzag placement."""
    return chunk if chunk < shards else 2 * shards - 1 - chunk


def _halves_swapped_if_odd(first, second, axis_name: str, axis: int):
    """(first, second) joined along `axis` on even devices, (second, first) on odd ones."""
    odd = lax.axis_index(axis_name) % 2 == 1
    return jnp.where(odd, jnp.concatenate([second, first], axis),
                     jnp.concatenate([first, second], axis))


def zigzag_to_balanced(x: jax.Array, axis_name: str, axis: int = 1) -> jax.Array:
    """A contiguous shard of natural order -> this device's zigzag shard, in `shard_map`.

    Device r holds natural chunks 2r and 2r+1 (of 2P); zigzag wants chunks r and
    2P-1-r. Two `ppermute`s of half a shard move every chunk straight to its owner
    (no gather of the sequence), each device receiving one even and one odd chunk.
    Equal to `layout.to_balanced(..., "zigzag")` on the whole sequence.
    """
    shards = lax.axis_size(axis_name)
    even, odd = jnp.split(x, 2, axis)
    recv = [lax.ppermute(half, axis_name, [(r, _zigzag_dest(2 * r + h, shards))
                                           for r in range(shards)])
            for h, half in enumerate((even, odd))]
    # Device d's first chunk is chunk d: the even one when d is even.
    return _halves_swapped_if_odd(recv[0], recv[1], axis_name, axis)


def zigzag_to_natural(x: jax.Array, axis_name: str, axis: int = 1) -> jax.Array:
    """Inverse of `zigzag_to_balanced`: a zigzag shard -> the contiguous natural shard."""
    shards = lax.axis_size(axis_name)
    first, second = jnp.split(x, 2, axis)
    # Order this device's chunks as (even, odd) so each has one permutation.
    chunks = jnp.split(_halves_swapped_if_odd(first, second, axis_name, axis), 2, axis)
    sent = []
    for parity, chunk in enumerate(chunks):
        owners = [(d, (d if d % 2 == parity else 2 * shards - 1 - d) // 2) for d in range(shards)]
        sent.append(lax.ppermute(chunk, axis_name, owners))
    return jnp.concatenate(sent, axis)


def _local_positions(batch: int, seq: int, axis_name: str) -> jax.Array:
    """Positions of a contiguous shard: this device's offset plus arange."""
    offset = lax.axis_index(axis_name) * seq
    return jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def _local_inputs(q, k, v, positions, scale, axis_name):
    """Head-major shards, positions (contiguous by default) and the resolved scale."""
    b, s, _, _ = q.shape
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    positions = _local_positions(b, s, axis_name) if positions is None else positions
    return (bw.q_to_head_major(q, k.shape[2]), bw.kv_to_head_major(k), bw.kv_to_head_major(v),
            positions, scale)


def ring_attention(q, k, v, *, axis_name: str, causal=False, segment_ids=None, positions=None,
                   sliding_window=None, scale=None, block_q=None, block_k=None,
                   return_lse=False, seam=bw):
    """Exact attention over a sequence sharded on `axis_name`; call inside `shard_map`.

    Args (this device's shards): q `[b, s_local, h, d]`; k, v `[b, s_local, h_kv, d]`;
      positions, segment_ids int32 `[b, s_local]`. Positions default to a contiguous
      split; a load-balanced layout passes the permuted positions.
    Returns:
      out `[b, s_local, h, d]` in q's dtype (and float32 lse `[b, s_local, h]`).
    `seam`: the per-step block kernels, anything with `fwd_hm`/`bwd_hm` like
    `lctx.kernels.blockwise` (default) or `lctx.kernels.pallas.PallasSeam`.
    """
    qh, kh, vh, positions, scale = _local_inputs(q, k, v, positions, scale, axis_name)
    block_q, block_k = _ring_blocks(block_q, block_k, q.shape[1], seam)
    o_h, lse_h = _ring_hm(qh, kh, vh, positions, segment_ids, axis_name,
                          MaskSpec(causal, sliding_window), scale, block_q, block_k, seam)
    out = bw.q_from_head_major(o_h)
    return (out, bw.lse_from_head_major(lse_h)) if return_lse else out


def ring_tiles_computed(q, k, v, *, axis_name: str, causal=False, segment_ids=None,
                        positions=None, sliding_window=None, scale=None, block_q=None,
                        block_k=None) -> jax.Array:
    """int32 scalar: how many `block_q x block_k` tiles this device computed in the
    ring forward (incremented inside the executed branch). A diagnostic of load
    balance for tests and benchmarks; call inside `shard_map` like `ring_attention`.
    """
    qh, kh, vh, positions, scale = _local_inputs(q, k, v, positions, scale, axis_name)
    block_q, block_k = _ring_blocks(block_q, block_k, q.shape[1], bw)
    _, _, count = _ring_forward(qh, kh, vh, positions, segment_ids,
                                axis_name=axis_name, mask=MaskSpec(causal, sliding_window),
                                scale=scale, block_q=block_q, block_k=block_k)
    return count


def _build_ring(plan):
    """The per-device ring for a plan: blockwise tiles, or the Pallas seam (ring_inner)."""
    seam = PallasSeam(plan.kernel, plan.interpret) if plan.ring_inner == "pallas" else bw
    return lambda q, k, v, pos, seg: ring_attention(
        q, k, v, axis_name=plan.seq_axis, positions=pos, segment_ids=seg, seam=seam,
        **plan.mask_options, **plan.blocks)


register(AttentionImpl(
    "ring", build=_build_ring, sequence_parallel=True, model_options=("layout",),
    options=("block_q", "block_k", "placement", "ring_inner", "kernel", "interpret"),
    uses_pallas=lambda options: options.get("ring_inner") == "pallas"))
