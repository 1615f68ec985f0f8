"""`int8`: every key and value as int8 codes, one float32 scale per token and KV head.

Symmetric absmax quantization of each slot's head_dim vector x:

    scale = max|x| / 127,   code = round(x / scale) in [-127, 127],   x ~ code * scale

K and V have their own scales. Every token is kept (one slot per token, as `full`),
at 2 * head_dim + 8 bytes per slot instead of 2 * head_dim * dtype bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lctx.infer.kvcache.base import CachePolicy, Data, append
from lctx.infer.kvcache.registry import register

LEVELS = 127  # symmetric: -128 is never used, so +x and -x get codes of the same size


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x `[..., hd]` -> (int8 codes `[..., hd]`, float32 scales `[...]`)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / LEVELS
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero vector: codes 0, scale 0
    codes = jnp.clip(jnp.round(x / safe[..., None]), -LEVELS, LEVELS).astype(jnp.int8)
    return codes, scale


def dequantize(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 codes `[..., hd]`, scales `[...]` -> float32 `[..., hd]`."""
    return codes.astype(jnp.float32) * scale[..., None]


@register
@dataclasses.dataclass(frozen=True)
class Int8(CachePolicy):
    """One slot per token; K and V codes int8 `[b, Hkv, T, hd]`, scales f32 `[b, Hkv, T]`."""

    name = "int8"

    def slots(self, tokens: int, chunk: int) -> int:
        return tokens

    def init(self, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: Any) -> Data:
        codes, scale = (batch, kv_heads, slots, head_dim), (batch, kv_heads, slots)
        return {"k": jnp.zeros(codes, jnp.int8), "k_scale": jnp.zeros(scale, jnp.float32),
                "v": jnp.zeros(codes, jnp.int8), "v_scale": jnp.zeros(scale, jnp.float32)}

    def write(self, data: Data, k: jax.Array, v: jax.Array, pos: jax.Array) -> Data:
        filled = data["filled"]
        out = dict(data)
        for name, x in (("k", k), ("v", v)):
            codes, scale = quantize(x)
            out[name] = append(data[name], codes, filled)
            out[f"{name}_scale"] = append(data[f"{name}_scale"], scale, filled)
        out["pos"] = append(data["pos"], pos, filled)
        out["filled"] = filled + k.shape[2]
        return out

    def read(self, data: Data, dtype: Any) -> tuple[jax.Array, jax.Array]:
        return (dequantize(data["k"], data["k_scale"]).astype(dtype),
                dequantize(data["v"], data["v_scale"]).astype(dtype))

    def bytes_per_slot(self, head_dim: int, dtype_bytes: int) -> float:
        return 2 * (head_dim + 4)  # K and V: head_dim int8 codes and one float32 scale
