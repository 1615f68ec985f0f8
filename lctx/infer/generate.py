"""Autoregressive decoding through the model's own layers and a `KVCache`.

`prefill` runs right-padded prompts through `lctx.model.extend` in chunks of `chunk`
tokens (peak activation memory follows the chunk, not the prompt), each chunk
appended to the cache; `decode` then feeds one token per row per step, in one
`lax.scan`. Both are the model's layer code (`cached_block_fn`): attention reads
and writes the cache, whose policy (`lctx.infer.kvcache`, a spec string such as
"full" or "h2o:budget=1024,recent=256") decides what it stores and keeps.

Prompts of different lengths share a batch: padding tokens are written with
position -1, which no query ever sees, and each row decodes from its own length.

RoPE variants whose frequencies depend on the sequence length (`dynamic`,
`longrope`) use one length for the whole generation, max(lengths) + max_new_tokens,
so the cached keys and the new queries are rotated by the same frequencies
(recomputing the full sequence with that `rope_seq_len` gives the same logits).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lctx.infer.kvcache import CachePolicy, KVCache, parse
from lctx.model.api import extend, logits_of
from lctx.model.config import ModelConfig

Params = dict[str, Any]
DEFAULT_CHUNK = 2048  # prefill tokens per step


def rope_length(prompt_len: int, max_new_tokens: int) -> int:
    """The static length RoPE scales for during one generation: prompt + new tokens."""
    return prompt_len + max_new_tokens


def prefill_length(prompt_len: int, chunk: int) -> int:
    """The padded prefill length: the prompt itself when it fits one chunk, else a
    multiple of the chunk."""
    return prompt_len if prompt_len <= chunk else math.ceil(prompt_len / chunk) * chunk


def inference_config(config: ModelConfig, chunk: int) -> ModelConfig:
    """The config the cached layers run with: no remat (no backward pass), and the
    blockwise feed-forward only where its chunk divides the prefill chunk."""
    ffn = config.ffn_chunk if config.ffn_chunk and chunk % config.ffn_chunk == 0 else None
    return config.replace(remat="none", ffn_chunk=ffn)


def new_cache(config: ModelConfig, policy: CachePolicy | str, *, batch: int, tokens: int,
              chunk: int) -> KVCache:
    """An empty cache for `tokens` tokens per row (prompt padding included)."""
    policy = parse(policy) if isinstance(policy, str) else policy
    return KVCache.create(policy, layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                          head_dim=config.head_dim, tokens=tokens, chunk=chunk,
                          dtype=config.compute_dtype)


def check_capacity(cache: KVCache, tokens: int, chunk: int) -> None:
    """ValueError (one line) when a non-evicting cache cannot take `tokens` tokens."""
    if not cache.policy.evicts() and tokens > cache.slots:
        raise ValueError(f"kv_cache={cache.policy.spec()!r}: {tokens} tokens (prompt padded to "
                         f"the {chunk}-token chunk, plus new tokens) do not fit its "
                         f"{cache.slots} slots, and it does not evict")


def prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array,
            cache: KVCache, *, chunk: int, rope_seq_len: int) -> tuple[jax.Array, KVCache]:
    """Right-padded prompts int32 `[b, S]` (real lengths `[b]`; S a multiple of `chunk`
    or at most one chunk) through the model, `chunk` tokens per step.

    Returns (float32 logits `[b, V]` at each row's last real token, the cache).
    """
    batch, seq = tokens.shape
    chunk = min(chunk, seq)
    cfg = inference_config(config, chunk)
    steps = seq // chunk
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    as_steps = lambda x: jnp.swapaxes(x.reshape(batch, steps, chunk, *x.shape[2:]), 0, 1)
    last = (lengths - 1).astype(jnp.int32)

    def step(carry, inputs):
        cache, final = carry
        ids, pos = inputs
        hidden, cache = extend(cfg, params, ids, cache, positions=pos,
                               valid=pos < lengths[:, None], rope_seq_len=rope_seq_len)
        here = (last >= pos[:, 0]) & (last < pos[:, 0] + chunk)
        at = jnp.clip(last - pos[:, 0], 0, chunk - 1)
        mine = jnp.take_along_axis(hidden, at[:, None, None], axis=1)[:, 0]
        return (cache, jnp.where(here[:, None], mine, final)), None

    final = jnp.zeros((batch, config.d_model), cfg.compute_dtype)
    (cache, final), _ = jax.lax.scan(step, (cache, final), (as_steps(tokens), as_steps(positions)))
    return logits_of(cfg, params, final), cache


def decode_step(config: ModelConfig, params: Params, cache: KVCache, token: jax.Array,
                pos: jax.Array, *, rope_seq_len: int) -> tuple[jax.Array, KVCache]:
    """One token per row (int32 `[b]`) at positions `[b]`: (float32 logits `[b, V]`, cache)."""
    cfg = inference_config(config, 1)
    valid = jnp.ones((token.shape[0], 1), bool)
    hidden, cache = extend(cfg, params, token[:, None], cache, positions=pos[:, None],
                           valid=valid, rope_seq_len=rope_seq_len)
    return logits_of(cfg, params, hidden[:, 0]), cache


def _choose(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def decode(config: ModelConfig, params: Params, cache: KVCache, logits: jax.Array,
           pos: jax.Array, rng: jax.Array, *, steps: int, temperature: float, rope_seq_len: int,
           return_logits: bool = False):
    """`steps` tokens per row from the prefill's last logits `[b, V]` and cache, rows at
    positions `pos` `[b]`: one `lax.scan` over `decode_step` (no host round trip per token).

    Returns (int32 tokens `[b, steps]`, the float32 logits each was chosen from
    `[b, steps, V]` or None, the cache).
    """

    def step(carry, key):
        logits, cache, pos = carry
        token = _choose(logits, key, temperature)
        next_logits, cache = decode_step(config, params, cache, token, pos,
                                         rope_seq_len=rope_seq_len)
        return (next_logits, cache, pos + 1), (token, logits if return_logits else None)

    keys = jax.random.split(rng, steps)
    (_, cache, _), (tokens, step_logits) = jax.lax.scan(
        step, (logits, cache, pos.astype(jnp.int32)), keys)
    step_logits = None if step_logits is None else jnp.swapaxes(step_logits, 0, 1)
    return tokens.T, step_logits, cache


# The two compiled halves of `generate`: a prefill that fills the (donated) cache, then
# one decode loop that owns it. Benchmarks time them apart through these same functions.
prefill_jit = jax.jit(prefill, static_argnums=(0,), donate_argnums=(4,),
                      static_argnames=("chunk", "rope_seq_len"))
decode_jit = jax.jit(decode, static_argnums=(0,), donate_argnums=(2,),
                     static_argnames=("steps", "temperature", "rope_seq_len", "return_logits"))


def pad_prompts(prompts: Sequence[Sequence[int] | np.ndarray], pad_id: int, chunk: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 `[b, S]` (S from `prefill_length`) and the lengths `[b]`."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError(f"prompts: {len(prompts)} prompts with lengths {lengths.tolist()}: "
                         "need at least one prompt, each at least one token long")
    seq = prefill_length(int(lengths.max()), chunk)
    tokens = np.full((len(prompts), seq), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = np.asarray(prompt, np.int32)
    return tokens, lengths


def generate(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int] | np.ndarray],
             *, max_new_tokens: int, temperature: float = 0.0, rng: jax.Array | None = None,
             pad_id: int = 0, kv_cache: CachePolicy | str = "full", chunk: int = DEFAULT_CHUNK,
             return_logits: bool = False):
    """Continues each prompt (a list of int token ids) by `max_new_tokens` tokens.

    temperature 0: greedy (argmax); > 0: sampling from softmax(logits / temperature)
    with `rng` (default key 0). kv_cache: a policy or spec string (lctx.infer.kvcache).
    chunk: prefill tokens per step. Returns int32 `[b, max_new_tokens]` and, with
    return_logits, also the float32 logits `[b, max_new_tokens, V]` each token was
    chosen from. No early stop at EOS: callers cut the continuation where they like.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 is greedy)")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}: must be an int >= 1")
    policy = parse(kv_cache) if isinstance(kv_cache, str) else kv_cache
    if policy.own_path:
        return _generate_own_path(config, params, prompts, policy, max_new_tokens=max_new_tokens,
                                  temperature=temperature, rng=rng, return_logits=return_logits)
    tokens, lengths = pad_prompts(prompts, pad_id, chunk)
    total = tokens.shape[1] + max_new_tokens
    cache = new_cache(config, policy, batch=len(prompts), tokens=total,
                      chunk=min(chunk, tokens.shape[1]))
    check_capacity(cache, total, chunk)
    rope_seq_len = rope_length(int(lengths.max()), max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    lengths = jnp.asarray(lengths)
    logits, cache = prefill_jit(config, params, jnp.asarray(tokens), lengths, cache,
                                chunk=chunk, rope_seq_len=rope_seq_len)
    new_tokens, logits, _ = decode_jit(config, params, cache, logits, lengths, rng,
                                       steps=max_new_tokens, temperature=float(temperature),
                                       rope_seq_len=rope_seq_len, return_logits=return_logits)
    new_tokens = np.asarray(new_tokens)
    return (new_tokens, np.asarray(logits)) if return_logits else new_tokens


def _generate_own_path(config, params, prompts, policy: CachePolicy, *, max_new_tokens: int,
                       temperature: float, rng, return_logits: bool):
    """`generate` for a policy with its own reading path (`CachePolicy.stream`), row by row."""
    rows = [list(policy.stream(config, params, np.asarray(p), max_new_tokens=max_new_tokens,
                               temperature=temperature, rng=rng)) for p in prompts]
    tokens = np.asarray([[t for t, _ in row] for row in rows], np.int32)
    if not return_logits:
        return tokens
    return tokens, np.asarray([[l for _, l in row] for row in rows], np.float32)
