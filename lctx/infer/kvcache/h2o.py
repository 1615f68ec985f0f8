"""`h2o`: heavy hitters plus recent tokens (H2O, Zhang et al. 2023).

    h2o:budget=1024,recent=256    # per layer and KV head

Every key accumulates the attention it receives: after each attend (prefill chunk or
decode step) the probability each query put on it, summed over the chunk's real
queries and the query heads of its KV group (cache_attention's blocked score pass, no
`[C, T]` matrix). Eviction keeps the `recent` most recent keys and, of the rest, the
`budget - recent` with the highest running sum. The sum lives in an extra float32 array
`acc [b, Hkv, T]` that `keep_top` moves along with the keys. Kept keys keep their
original positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lctx.infer.kvcache.base import Data, append, keep_top
from lctx.infer.kvcache.registry import register
from lctx.infer.kvcache.evicting import Evicting, ranked


@register
@dataclasses.dataclass(frozen=True)
class H2O(Evicting):
    name = "h2o"
    scores = "all"

    budget: int = 1024
    recent: int = 256

    def problems(self) -> list[str]:
        out = [f"recent={self.recent}: must be >= 0"] if self.recent < 0 else []
        if self.budget < 1:
            out.append(f"budget={self.budget}: must be >= 1")
        elif self.budget <= self.recent:  # at least one slot for a heavy hitter
            out.append(f"budget={self.budget}: must be above recent={self.recent}")
        return out

    def init(self, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: Any) -> Data:
        return {**super().init(batch, kv_heads, head_dim, slots, dtype),
                "acc": jnp.zeros((batch, kv_heads, slots), jnp.float32)}

    def write(self, data: Data, k: jax.Array, v: jax.Array, pos: jax.Array) -> Data:
        # New keys start from zero (the slot may hold an evicted key's sum).
        acc = append(data["acc"], jnp.zeros(pos.shape, jnp.float32), data["filled"])
        return {**super().write(data, k, v, pos), "acc": acc}

    def evict(self, data: Data, scores: jax.Array | None, chunk_pos: jax.Array) -> Data:
        data = {**data, "acc": data["acc"] + scores}
        keep = jnp.where(ranked(data["pos"], self.recent), jnp.inf, data["acc"])
        return keep_top(data, keep, self.budget)

    def bytes_per_slot(self, head_dim: int, dtype_bytes: int) -> float:
        return super().bytes_per_slot(head_dim, dtype_bytes) + 4  # + the float32 sum
