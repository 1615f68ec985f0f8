"""`sink_window`: attention sinks plus a sliding window (StreamingLLM, Xiao et al. 2023).

    sink_window:sinks=4,window=1020    # budget = sinks + window tokens per layer and KV head

Keeps, per (row, KV head), the `sinks` lowest positions (the first tokens, which soak up
attention mass) and the `window` most recent; every other key is dropped for good.

Positions: kept keys keep the positions (and RoPE rotation) they were written with, so
a query at position p sees the sinks at distance ~p. StreamingLLM instead renumbers
positions within the cache (sinks at 0.., window right after) so no distance exceeds
the cache size; that needs keys stored before RoPE and re-rotated at every read, which
this cache (keys rotated at write) does not do.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from lctx.infer.kvcache.base import Data, keep_top
from lctx.infer.kvcache.evicting import Evicting, ranked
from lctx.infer.kvcache.registry import register


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
