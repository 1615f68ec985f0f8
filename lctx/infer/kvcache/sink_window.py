"""`sink_window`: attention sinks plus a sliding window (StreamingLLM, Xiao et al. 2023).

    sink_window:sinks=4,window=1020    # budget = sinks + window tokens per layer and KV head

Keeps, per (row, KV head), the `sinks` lowest positions (the first tokens, which soak up
attention mass) and the `window` most recent; every other key is dropped for good.

Positions: kept keys keep the positions (and RoPE rotation) they were written with, so
a query at position p sees the sinks at distance ~p. StreamingLLM instead renumbers
positions within the cache (sinks at 0.., window right after) so no distance exceeds
the cache size; that needs keys stored before RoPE and re-rotated at every read, which
this cache (keys rotated at write) does not do.

This module also holds what the evicting policies share (`Evicting`, `ranked`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from lctx.infer.kvcache.base import Data, keep_top
from lctx.infer.kvcache.full import Full
from lctx.infer.kvcache.registry import register


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


@register
@dataclasses.dataclass(frozen=True)
class SinkWindow(Evicting):
    name = "sink_window"
    budget = property(lambda self: self.sinks + self.window)  # not an option: no field

    sinks: int = 4
    window: int = 1020

    def problems(self) -> list[str]:
        out = [f"sinks={self.sinks}: must be >= 0"] if self.sinks < 0 else []
        return out + ([f"window={self.window}: must be >= 1"] if self.window < 1 else [])

    def evict(self, data: Data, scores: jax.Array | None, chunk_pos: jax.Array) -> Data:
        pos = data["pos"]
        # Rank by position (newest highest); sinks always win.
        keep = jnp.where(ranked(pos, self.sinks, lowest=True), jnp.inf, pos.astype(jnp.float32))
        return keep_top(data, keep, self.budget)
