"""`full`: every key and value, unquantized, in the compute dtype (the reference policy)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lctx.infer.kvcache.base import CachePolicy, Data, append
from lctx.infer.kvcache.registry import register


@register
@dataclasses.dataclass(frozen=True)
class Full(CachePolicy):
    """One slot per token: the cache takes exactly as many tokens as it has slots."""

    name = "full"

    def slots(self, tokens: int, chunk: int) -> int:
        return tokens

    def init(self, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: Any) -> Data:
        shape = (batch, kv_heads, slots, head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def write(self, data: Data, k: jax.Array, v: jax.Array, pos: jax.Array) -> Data:
        filled = data["filled"]
        return {**data, "k": append(data["k"], k, filled), "v": append(data["v"], v, filled),
                "pos": append(data["pos"], pos, filled), "filled": filled + k.shape[2]}

    def read(self, data: Data, dtype: Any) -> tuple[jax.Array, jax.Array]:
        return data["k"].astype(dtype), data["v"].astype(dtype)

    def bytes_per_slot(self, head_dim: int, dtype_bytes: int) -> float:
        return 2 * head_dim * dtype_bytes
