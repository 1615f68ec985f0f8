"""The KV cache the model's attention reads and writes, and the policy interface.

A `KVCache` is a pytree: a static `CachePolicy` and a dict of arrays, each with the
leading axes `[layers, batch, kv_heads, slots, ...]` (the layer axis is scanned away,
so inside a layer the same class holds one layer's arrays). Every policy keeps two
bookkeeping arrays beside its storage:

    pos     int32 [.., b, Hkv, T]  the position a slot's key was written at; -1 = empty
    filled  int32 [.., b, Hkv]     slots in use; they are always slots [0, filled)

One attention step over a chunk of C tokens (prefill chunk, or C = 1 in decode) is
the same for every policy (`KVCache.attend`): write the chunk's keys and values
(padding written with position -1, never visible), read the whole cache back
(dequantized), attend by position (`lctx.kernels.cache_attention`, which also sums
the attention each key got when the policy scores keys), then let the policy evict.
Kept keys keep the positions (and RoPE rotation) they were written with: masking is
by position, so eviction never shifts anyone's position.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from lctx.kernels.cache_attention import cache_attention

Data = dict[str, jax.Array]


def append(buffer: jax.Array, new: jax.Array, filled: jax.Array) -> jax.Array:
    """Writes `new` `[b, Hkv, C, ...]` into `buffer` `[b, Hkv, T, ...]` at slots
    [filled, filled + C) of each (row, head); `filled` int `[b, Hkv]`. The caller
    guarantees filled + C <= T (dynamic_update_slice would clamp, not fail)."""
    write = lambda buf, x, f: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), f, 0)
    return jax.vmap(jax.vmap(write))(buffer, new, filled)


def gather_slots(x: jax.Array, slots: jax.Array) -> jax.Array:
    """x `[b, Hkv, T, ...]` at slot indices `[b, Hkv, K]` -> `[b, Hkv, K, ...]`."""
    index = slots.reshape(*slots.shape, *([1] * (x.ndim - 3)))
    return jnp.take_along_axis(x, index, axis=2)


def keep_top(data: Data, keep_score: jax.Array, budget: int) -> Data:
    """Keeps, per (row, KV head), the `budget` slots with the highest `keep_score`
    `[b, Hkv, T]` (+inf: always kept) in their written order at the front of every
    array in `data`; the other slots are emptied (pos -1). Empty slots never win."""
    slots = data["pos"].shape[-1]
    if slots <= budget:
        return data
    score = jnp.where(data["pos"] >= 0, keep_score, -jnp.inf)
    best, top = jax.lax.top_k(score, budget)
    order = jnp.argsort(top, axis=-1)  # written order: the used slots [0, filled) stay first
    top = jnp.take_along_axis(top, order, axis=-1)
    real = jnp.take_along_axis(best, order, axis=-1) > -jnp.inf
    out = {}
    for name, x in data.items():
        if name == "filled":
            continue
        kept = gather_slots(x, top)
        if name == "pos":
            kept = jnp.where(real, kept, -1)
        pad = [(0, 0), (0, 0), (0, slots - budget)] + [(0, 0)] * (x.ndim - 3)
        out[name] = jnp.pad(kept, pad, constant_values=-1 if name == "pos" else 0)
    out["filled"] = jnp.sum(out["pos"] >= 0, axis=-1).astype(jnp.int32)
    return out


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """How a cache stores, reads and evicts keys and values (one subclass per spec name).

    Options are the dataclass fields (ints or strings), parsed from the spec string by
    `lctx.infer.kvcache.registry.parse`; `problems()` says what is wrong with them.
    `scores`: which queries' attention the policy needs at `evict` ("all", "last" for
    the last `window` real tokens of each prefill chunk, or None).
    """

    name: ClassVar[str]
    scores: ClassVar[str | None] = None
    own_path: ClassVar[bool] = False  # reads the prompt its own way: see `stream`

    def problems(self) -> list[str]:
        """One line per invalid option ("key=value: what is allowed"); [] when valid."""
        return []

    def spec(self) -> str:
        options = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}:{options}" if options else self.name

    def slots(self, tokens: int, chunk: int) -> int:
        """Slots per (row, KV head) for `tokens` tokens in total written `chunk` at a time."""
        raise NotImplementedError

    def evicts(self) -> bool:
        """Whether the cache can take more tokens than it has slots."""
        return False

    def init(self, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: Any) -> Data:
        """One layer's empty storage (without `pos` / `filled`, which `KVCache` adds)."""
        raise NotImplementedError

    def write(self, data: Data, k: jax.Array, v: jax.Array, pos: jax.Array) -> Data:
        """Stores a chunk: k, v `[b, Hkv, C, hd]`, pos int `[b, Hkv, C]` (-1 = padding).
        Must update `pos` and `filled` (see `append`)."""
        raise NotImplementedError

    def read(self, data: Data, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[b, Hkv, T, hd]` in `dtype` (dequantized) for every slot."""
        raise NotImplementedError

    def evict(self, data: Data, scores: jax.Array | None, chunk_pos: jax.Array) -> Data:
        """After attending: drop slots down to the policy's budget. scores float32
        `[b, Hkv, T]` (per `self.scores`) or None; chunk_pos `[b, C]` the chunk's positions."""
        return data

    def stream(self, config: Any, params: Any, prompt: Any, *, max_new_tokens: int,
               temperature: float = 0.0, rng: jax.Array | None = None):
        """For a policy with `own_path` (beacon: the model reads the prompt through it):
        an iterator of (token, logits `[V]`) per decode step."""
        raise NotImplementedError

    def window_nll(self, config: Any, params: Any):
        """For a policy with `own_path`: `(tokens, targets, mask) -> summed nll` (int
        `[b, s]` twice, float `[b, s]`) scoring perplexity windows read through it; None
        for the others, whose perplexity is the model's own forward."""
        return None

    def nbytes(self, batch: int, kv_heads: int, head_dim: int, tokens: int, chunk: int,
               dtype_bytes: int) -> int:
        """Predicted bytes of one layer's cache (storage and bookkeeping)."""
        slots = self.slots(tokens, chunk)
        return batch * kv_heads * (slots * (self.bytes_per_slot(head_dim, dtype_bytes) + 4) + 4)

    def bytes_per_slot(self, head_dim: int, dtype_bytes: int) -> float:
        """Storage bytes of one slot's key and value for one KV head (no bookkeeping)."""
        raise NotImplementedError


@flax.struct.dataclass
class KVCache:
    """A model's KV cache: `policy` (static) and its arrays, `[layers, b, Hkv, T, ...]`."""

    policy: CachePolicy = flax.struct.field(pytree_node=False)
    data: Data

    @classmethod
    def create(cls, policy: CachePolicy, *, layers: int, batch: int, kv_heads: int,
               head_dim: int, tokens: int, chunk: int, dtype: Any) -> KVCache:
        """An empty cache for `tokens` tokens in total, written up to `chunk` at a time."""
        slots = policy.slots(tokens, chunk)
        layer = dict(policy.init(batch, kv_heads, head_dim, slots, dtype))
        layer["pos"] = jnp.full((batch, kv_heads, slots), -1, jnp.int32)
        layer["filled"] = jnp.zeros((batch, kv_heads), jnp.int32)
        return cls(policy, jax.tree.map(lambda a: jnp.broadcast_to(a, (layers, *a.shape)), layer))

    @property
    def slots(self) -> int:
        return self.data["pos"].shape[-1]

    def nbytes(self) -> int:
        """Bytes the cache's arrays hold (what `policy.nbytes` predicts, times layers)."""
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(self.data))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
               valid: jax.Array, *, sliding_window: int | None = None
               ) -> tuple[jax.Array, KVCache]:
        """One layer: write the chunk, attend over the cache, evict.

        q `[b, C, H, hd]`; k, v `[b, C, Hkv, hd]` (keys rotated); positions int `[b, C]`;
        valid bool `[b, C]` (False: padding). Returns `[b, C, H, hd]` and the layer's
        updated cache.
        """
        policy = self.policy
        heads = k.shape[2]
        pos = jnp.where(valid, positions, -1).astype(jnp.int32)
        pos = jnp.broadcast_to(pos[:, None, :], (pos.shape[0], heads, pos.shape[1]))
        data = policy.write(self.data, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos)
        keys, values = policy.read(data, q.dtype)
        out, scores = cache_attention(q, positions, keys, values, data["pos"],
                                      sliding_window=sliding_window,
                                      score_weights=self._score_weights(valid, positions))
        return out, KVCache(policy, policy.evict(data, scores, jnp.where(valid, positions, -1)))

    def _score_weights(self, valid: jax.Array, positions: jax.Array) -> jax.Array | None:
        """Which queries' attention the policy scores keys by, `[b, C]` float, or None."""
        if self.policy.scores is None:
            return None
        weights = valid.astype(jnp.float32)
        if self.policy.scores == "last":  # the last `window` real tokens of the chunk
            last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
            weights = weights * (positions > last - self.policy.window)
        return weights
