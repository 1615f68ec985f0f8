"""Generation through activation beacons (lctx.model.beacon): the prompt is read chunk
by chunk, each full chunk is compressed to its beacons, and decoding appends raw tokens
to the open chunk, compressing it when it fills.

State (`BeaconState`), for one sequence:

    past_k, past_v  [L, 1, M, Hkv, hd]      past beacons: keys before RoPE, values;
                                            the first `count` are real
    raw_k, raw_v    [L, 1, chunk, Hkv, hd]  the open chunk's raw tokens: rotated keys,
                                            values; the first `filled` are real
    count, filled   int32 scalars

Positions, as in lctx.model.beacon (numbered within the window a token sees): past
beacon j at j; the open chunk's raw token t at count + t + t // ratio and its beacon u
at count + u * (ratio + 1) + ratio (the interleaved order). Raw tokens never see their
own chunk's beacons, so reading a chunk token by token and then running its beacons
over the cached raw keys (`compress`) computes what the one-pass interleaved forward
(`beacon_hidden`, the training path) computes; tests/test_beacon.py checks the two agree.
Rows of a batch run one after another: their chunks close at different tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lctx.model.api import logits_of
from lctx.model.beacon import layer_stacks, window_layer
from lctx.model.config import ModelConfig
from lctx.model.rope import apply_rotary, inverse_frequencies, rope_cos_sin
from lctx.model.transformer import rms_norm

Params = dict[str, Any]


def past_slots(tokens: int, chunk: int, ratio: int) -> int:
    """Beacon slots for `tokens` tokens in all: one unit's beacon per full chunk's unit."""
    return max(1, (tokens // chunk) * (chunk // ratio))


@flax.struct.dataclass
class BeaconState:
    past_k: jax.Array
    past_v: jax.Array
    raw_k: jax.Array
    raw_v: jax.Array
    count: jax.Array
    filled: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, *, tokens: int, chunk: int, ratio: int) -> BeaconState:
        """Empty state for `tokens` tokens (prompt and new ones) in all."""
        layers, kv, hd = config.n_layers, config.n_kv_heads, config.head_dim
        past = jnp.zeros((layers, 1, past_slots(tokens, chunk, ratio), kv, hd), config.compute_dtype)
        raw = jnp.zeros((layers, 1, chunk, kv, hd), config.compute_dtype)
        return cls(past, past, raw, raw, jnp.int32(0), jnp.int32(0))

    def nbytes(self) -> int:
        """Bytes of the keys and values held (the two counters aside)."""
        return sum(a.nbytes for a in (self.past_k, self.past_v, self.raw_k, self.raw_v))


def _tables(config: ModelConfig, state: BeaconState, chunk: int, ratio: int):
    """(inverse frequencies, attention factor) for the largest window, and the past
    beacons' keys rotated at positions 0 .. M-1, `[L, 1, M, Hkv, hd]`."""
    slots = state.past_k.shape[2]
    inv_freq, factor = inverse_frequencies(config.rope, config.head_dim,
                                           slots + chunk + chunk // ratio)
    cos, sin = rope_cos_sin(jnp.arange(slots)[None], inv_freq, factor)
    layers = state.past_k.shape[0]
    flat = state.past_k.reshape(layers, slots, *state.past_k.shape[3:])
    return inv_freq, factor, apply_rotary(flat, cos, sin).reshape(state.past_k.shape)


def _run_layers(config, params, beacon, x, is_beacon, positions, context_k, context_v,
                visible, inv_freq, factor):
    """x `[1, n, D]` through every layer (window_layer) over per-layer context
    `[L, 1, S, Hkv, hd]`; returns (x, (keys before RoPE, rotated keys, values) `[L, 1, n, ..]`)."""
    cos, sin = rope_cos_sin(positions[None], inv_freq, factor)
    stacks = layer_stacks(params, beacon)

    def layer(x, weights):
        w, bw, ck, cv = weights
        return window_layer(config, x, w, bw, is_beacon, cos, sin, ck, cv, visible)

    return jax.lax.scan(layer, x, (*stacks, context_k, context_v))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk", "ratio"))
def read_raw(config: ModelConfig, params: Params, beacon: Params, state: BeaconState,
             ids: jax.Array, *, chunk: int, ratio: int) -> tuple[jax.Array, BeaconState]:
    """n raw tokens int `[1, n]` appended to the open chunk (filled + n <= chunk).

    Returns (final-normed hidden `[1, n, D]`, the state with their keys and values)."""
    cfg = config.replace(ffn_chunk=None)
    n = ids.shape[1]
    inv_freq, factor, past_rot = _tables(cfg, state, chunk, ratio)
    t = state.filled + jnp.arange(n)
    positions = state.count + t + t // ratio
    slots = state.past_k.shape[2]
    visible = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(slots) < state.count, (n, slots)),
        jnp.broadcast_to(jnp.arange(chunk) < state.filled, (n, chunk)),
        jnp.tril(jnp.ones((n, n), bool))], axis=1)
    x = jnp.take(params["embed"]["embedding"], ids, axis=0).astype(cfg.compute_dtype)
    x, (_, k_rot, v) = _run_layers(
        cfg, params, beacon, x, jnp.zeros(n, bool), positions,
        jnp.concatenate([past_rot, state.raw_k], 2), jnp.concatenate([state.past_v, state.raw_v], 2),
        visible, inv_freq, factor)
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, state.filled, axis=2)
    state = state.replace(raw_k=write(state.raw_k, k_rot), raw_v=write(state.raw_v, v),
                          filled=state.filled + n)
    return rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps).astype(cfg.compute_dtype), state


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk", "ratio"))
def compress(config: ModelConfig, params: Params, beacon: Params, state: BeaconState, *,
             chunk: int, ratio: int) -> BeaconState:
    """The full open chunk's beacons, run over the past beacons and the chunk's cached
    raw keys (beacon u sees its unit and beacons <= u), appended to the past; the
    chunk's raw tokens are dropped."""
    cfg = config.replace(ffn_chunk=None)
    units = chunk // ratio
    inv_freq, factor, past_rot = _tables(cfg, state, chunk, ratio)
    u = jnp.arange(units)
    slots = state.past_k.shape[2]
    visible = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(slots) < state.count, (units, slots)),
        jnp.arange(chunk)[None, :] // ratio == u[:, None],
        jnp.tril(jnp.ones((units, units), bool))], axis=1)
    x = jnp.broadcast_to(beacon["embedding"].astype(cfg.compute_dtype), (1, units, cfg.d_model))
    _, (k, _, v) = _run_layers(
        cfg, params, beacon, x, jnp.ones(units, bool), state.count + u * (ratio + 1) + ratio,
        jnp.concatenate([past_rot, state.raw_k], 2), jnp.concatenate([state.past_v, state.raw_v], 2),
        visible, inv_freq, factor)
    write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, state.count, axis=2)
    return state.replace(past_k=write(state.past_k, k), past_v=write(state.past_v, v),
                         count=state.count + units, filled=jnp.int32(0))


def read(config: ModelConfig, params: Params, beacon: Params, state: BeaconState,
         ids: np.ndarray, *, chunk: int, ratio: int) -> tuple[jax.Array, BeaconState]:
    """Raw tokens int `[n]` through the beacons, any n: fills the open chunk, compresses
    each chunk that fills. Returns (float32 logits `[1, V]` after the last token, state)."""
    filled = int(state.filled)
    start, hidden = 0, None
    while start < len(ids):
        take = min(chunk - filled, len(ids) - start)
        hidden, state = read_raw(config, params, beacon, state,
                                 jnp.asarray(ids[None, start:start + take], jnp.int32),
                                 chunk=chunk, ratio=ratio)
        start, filled = start + take, filled + take
        if filled == chunk:
            state, filled = compress(config, params, beacon, state, chunk=chunk, ratio=ratio), 0
    return logits_of(config, params, hidden[:, -1]), state


def stream(config: ModelConfig, params: Params, beacon: Params, prompt: Sequence[int] | np.ndarray,
           *, max_new_tokens: int, chunk: int, ratio: int, temperature: float = 0.0,
           rng: jax.Array | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Reads `prompt` (int ids `[n]`) through the beacons now, then yields (token, the
    float32 logits `[V]` it was chosen from) one decode step at a time. Keys as in
    `lctx.infer.generate`: `split(rng, max_new_tokens)`, one per step."""
    state = BeaconState.create(config, tokens=len(prompt) + max_new_tokens, chunk=chunk,
                               ratio=ratio)
    logits, state = read(config, params, beacon, state, np.asarray(prompt), chunk=chunk,
                         ratio=ratio)
    keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)

    def decode() -> Iterator[tuple[int, np.ndarray]]:
        nonlocal logits, state
        for step in range(max_new_tokens):
            token = (int(jnp.argmax(logits[0])) if temperature == 0.0 else
                     int(jax.random.categorical(keys[step], logits[0] / temperature)))
            yield token, np.asarray(logits[0])
            if step + 1 < max_new_tokens:  # the last token's logits are never needed
                logits, state = read(config, params, beacon, state, np.asarray([token]),
                                     chunk=chunk, ratio=ratio)

    return decode()

