"""What the evicting policies (sink_window, h2o, snapkv, knorm) share: `Evicting`, the
storage of `full` with room for the budget plus one chunk, and `ranked`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lctx.infer.kvcache.full import Full


def ranked(pos: jax.Array, n: int, *, lowest: bool = False) -> jax.Array:
    """bool `[b, Hkv, T]`: the used slots holding the `n` highest (`lowest`: lowest)
    positions of each (row, KV head) in pos int `[b, Hkv, T]`; all of them when fewer."""
    used = pos >= 0
    if n <= 0:
        return jnp.zeros_like(used)
    if n >= pos.shape[-1]:
        return used
    key = jnp.where(used, -pos if lowest else pos, jnp.iinfo(jnp.int32).min)
    edge = jax.lax.top_k(key, n)[0][..., -1:]  # positions are unique per (row, head)
    return used & (key >= edge)


@dataclasses.dataclass(frozen=True)
class Evicting(Full):
    """Stored as `full` (k, v in the compute dtype, appended at write), with room for
    the `budget` kept tokens plus one incoming chunk; `evict` (after every attend)
    brings each (row, KV head) back to at most `budget` used slots, so the next write
    of up to `chunk` tokens never overflows. Subclasses define `budget` (tokens kept
    per layer and KV head: a field, or a property) and `evict`."""

    budget: ClassVar[int]

    def evicts(self) -> bool:
        return True

    def slots(self, tokens: int, chunk: int) -> int:
        # Fewer than budget + chunk tokens in all: one slot each and nothing is ever evicted.
        return min(tokens, self.budget + chunk)
