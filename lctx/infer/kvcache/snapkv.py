"""`snapkv`: keys chosen by an observation window's attention (SnapKV, Li et al. 2024).

    snapkv:budget=1024,window=32,kernel=7    # per layer and KV head

After each attend, every cached key is scored by the attention it got from the last
`window` real queries of the chunk (`scores = "last"`: cache_attention's blocked pass,
weights from `KVCache._score_weights`), summed over those queries and the query heads
of its KV group. The scores are max-pooled along the slots with width `kernel`, so a
key next to a strongly attended one survives with it (SnapKV's clustering; slots are in
position order, so neighbours in slots are neighbours among the kept keys). Eviction
keeps the `window` most recent keys (the observation window itself) and, of the rest,
the `budget - window` with the highest pooled score.

When: at the end of every prefill chunk, and at every decode step. In decode the chunk
is the one new token, so a key's score is that single query's attention (pooled), and
the `window` most recent keys (the newest tokens) are always kept. Unlike the paper
(which compresses once, after the whole prompt), every chunk is scored on its own:
a key dropped after one chunk is not seen by the next chunk's window. Kept keys keep
their original positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lctx.infer.kvcache.base import Data, keep_top
from lctx.infer.kvcache.registry import register
from lctx.infer.kvcache.evicting import Evicting, ranked


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(Evicting):
    name = "snapkv"
    scores = "last"

    budget: int = 1024
    window: int = 32
    kernel: int = 7

    def problems(self) -> list[str]:
        out = [f"window={self.window}: must be >= 1"] if self.window < 1 else []
        if self.budget <= self.window:  # at least one slot chosen by score
            out.append(f"budget={self.budget}: must be above window={self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:  # centred on the key it pools for
            out.append(f"kernel={self.kernel}: must be odd and >= 1")
        return out

    def evict(self, data: Data, scores: jax.Array | None, chunk_pos: jax.Array) -> Data:
        half = self.kernel // 2
        # Scores are >= 0 and empty slots score 0, so they never raise a neighbour's max.
        pooled = jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, (1, 1, self.kernel),
                                       (1, 1, 1), ((0, 0), (0, 0), (half, half)))
        keep = jnp.where(ranked(data["pos"], self.window), jnp.inf, pooled)
        return keep_top(data, keep, self.budget)
