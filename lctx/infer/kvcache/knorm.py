"""`knorm`: keep the keys with the lowest L2 norm (Devoto et al. 2024).

    knorm:budget=1024    # per layer and KV head

A low key norm goes with high attention (Devoto et al., "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression"), so eviction needs no attention scores
at all. The norm is of the stored (RoPE-rotated) key: a rotation keeps the norm, so it
is the pre-RoPE norm too. The newest token is always kept as well (budget - 1 by norm),
so a decode step's own key is there for the next query even when its norm is high.
Kept keys keep their original positions.
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
class KNorm(Evicting):
    name = "knorm"

    budget: int = 1024

    def problems(self) -> list[str]:
        return [f"budget={self.budget}: must be >= 1"] if self.budget < 1 else []

    def evict(self, data: Data, scores: jax.Array | None, chunk_pos: jax.Array) -> Data:
        norm = jnp.linalg.norm(data["k"].astype(jnp.float32), axis=-1)  # [b, Hkv, T]
        keep = jnp.where(ranked(data["pos"], 1), jnp.inf, -norm)
        return keep_top(data, keep, self.budget)
