"""lctx's ring load balance: the attention tiles each device computes in the forward,
for the causal placement in use and for contiguous placement (the imbalance it fixes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lctx.bench import common
from lctx.bench.attention_setup import IDS_SPEC, NUM_DEVICES, SEQ_AXIS, X_SPEC, Case, Settings
from lctx.bench.attention_speed import case_problem
from lctx.kernels import balanced_permutation, ring_tiles_computed


def ring_tiles_per_device(mesh: Mesh, settings: Settings, seq: int, placement: str,
                          block_q: int | None, block_k: int | None) -> list[int]:
    """Tiles each device computes in lctx's ring forward with `placement` of the tokens."""
    order = (balanced_permutation(seq, NUM_DEVICES, placement) if placement != "contiguous"
             else np.arange(seq, dtype=np.int32))
    positions = jax.device_put(np.broadcast_to(order, (settings.batch, seq)).astype(np.int32),
                               NamedSharding(mesh, IDS_SPEC))
    shape = (settings.batch, seq, settings.heads, settings.head_dim)
    x = jax.device_put(jnp.zeros(shape, jnp.dtype(settings.dtype)), NamedSharding(mesh, X_SPEC))

    def local(q, k, v, pos):
        count = ring_tiles_computed(q, k, v, axis_name=SEQ_AXIS, causal=settings.causal,
                                    positions=pos, block_q=block_q, block_k=block_k)
        return jnp.reshape(count, (1,))

    counts = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(X_SPEC,) * 3 + (IDS_SPEC,),
                                   out_specs=P(SEQ_AXIS), check_vma=False))(x, x, x, positions)
    return [int(c) for c in np.asarray(counts)]


def ring_load_balance(settings: Settings, mesh: Mesh) -> list[dict[str, Any]]:
    """Tiles per device for every ring (length, block_q, block_k) that can run, with the
    placement timed (zigzag when causal, unless set) and contiguous."""
    used = settings.ring_placement or ("zigzag" if settings.causal else "contiguous")
    balance = []
    for seq in settings.lengths:
        for bq in settings.block_q:
            for bk in settings.block_k:
                case = Case("ring", seq, settings.heads, bq, bk)
                if case_problem(case):
                    continue
                for placement in dict.fromkeys((used, "contiguous")):
                    tiles = ring_tiles_per_device(mesh, settings, seq, placement, bq, bk)
                    balance.append({"seq": seq, "blocks": case.blocks_label(),
                                    "placement": placement, "tiles": tiles,
                                    "max_over_mean": max(tiles) / (sum(tiles) / len(tiles))})
    return balance


def format_balance(balance: list[dict[str, Any]]) -> str:
    headers = ("seq", "blocks", "placement", "tiles per device", "max/mean")
    body = [(b["seq"], b["blocks"], b["placement"], " ".join(map(str, b["tiles"])),
             f"{b['max_over_mean']:.2f}") for b in balance]
    return common.format_table(headers, body, left=(0, 2, 3))
