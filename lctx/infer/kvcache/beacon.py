"""`beacon`: activation beacons (lctx.model.beacon) as a cache policy.

    beacon:ratio=8,chunk=1024                            # the untrained module
    beacon:ratio=8,chunk=1024,params=ckpt/beacon.msgpack # a trained one

The cache holds the past chunks' beacons (chunk / ratio per chunk and layer) and the
open chunk's raw tokens: `slots` = past_slots(tokens) + chunk, float keys and values,
no position bookkeeping (positions follow from the counts). Beacons change how the
model reads, not only what the cache keeps, so this policy runs its own prefill and
decode (`lctx.infer.beacon`) through `stream`; lctx.generate, lctx.eval and
lctx.infer.generate call it in place of the KVCache path.

params: a beacon module written by `flax.serialization.to_bytes` (experiments/beacons
writes one); "" uses the module as initialised (the base model's attention copied),
i.e. before training.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp

from lctx.infer import beacon as beacon_path
from lctx.infer.kvcache.base import CachePolicy, Data
from lctx.infer.kvcache.registry import register
from lctx.model.beacon import beacon_lm_loss, init_beacon


@register
@dataclasses.dataclass(frozen=True)
class Beacon(CachePolicy):
    name = "beacon"
    own_path = True

    ratio: int = 8
    chunk: int = 1024
    params: str = ""

    def problems(self) -> list[str]:
        out = [] if self.chunk >= 1 else [f"chunk={self.chunk}: must be >= 1"]
        if self.ratio < 1 or (self.chunk >= 1 and self.chunk % self.ratio):
            out.append(f"ratio={self.ratio}: must be a positive divisor of chunk={self.chunk}")
        if self.params and not os.path.isfile(self.params):
            out.append(f"params={self.params!r}: no such file (a beacon module; '' for the "
                       "untrained one)")
        return out

    def evicts(self) -> bool:
        return True  # any number of tokens: full chunks leave only their beacons

    def slots(self, tokens: int, chunk: int) -> int:
        return beacon_path.past_slots(tokens, self.chunk, self.ratio) + self.chunk

    def bytes_per_slot(self, head_dim: int, dtype_bytes: int) -> float:
        return 2 * head_dim * dtype_bytes

    def nbytes(self, batch: int, kv_heads: int, head_dim: int, tokens: int, chunk: int,
               dtype_bytes: int) -> int:
        return int(batch * kv_heads * self.slots(tokens, chunk)
                   * self.bytes_per_slot(head_dim, dtype_bytes))

    def init(self, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: Any) -> Data:
        raise NotImplementedError("kv_cache='beacon' reads through lctx.infer.beacon (its "
                                  "`stream`), not through a KVCache")

    def new_state(self, config, *, tokens: int) -> beacon_path.BeaconState:
        """The empty state one sequence of `tokens` tokens in all reads into."""
        return beacon_path.BeaconState.create(config, tokens=tokens, chunk=self.chunk,
                                              ratio=self.ratio)

    def module(self, config, params) -> dict:
        """The beacon module: loaded from `params`, or initialised from the base model."""
        fresh = init_beacon(config, params)
        if not self.params:
            return fresh
        with open(self.params, "rb") as f:
            return flax.serialization.from_bytes(fresh, f.read())

    def window_nll(self, config, params):
        module = self.module(config, params)
        return lambda tokens, targets, mask: _window_nll(config, params, module, tokens, targets,
                                                         mask, chunk=self.chunk, ratio=self.ratio)

    def stream(self, config, params, prompt, *, max_new_tokens: int, temperature: float = 0.0,
               rng=None):
        return beacon_path.stream(config, params, self.module(config, params), prompt,
                                  max_new_tokens=max_new_tokens, chunk=self.chunk,
                                  ratio=self.ratio, temperature=temperature, rng=rng)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk", "ratio"))
def _window_nll(config, params, module, tokens, targets, mask, *, chunk: int, ratio: int):
    """Summed nll of a window batch read through the beacons. The window is padded at the
    end to whole chunks: later tokens never reach earlier ones, so the scores are exact."""
    widen = lambda a: jnp.pad(a, ((0, 0), (0, -a.shape[1] % chunk)))
    mean, metrics = beacon_lm_loss(config, params, module, widen(tokens), widen(targets),
                                   widen(mask), chunk=chunk, ratio=ratio)
    return mean * metrics["tokens"]
