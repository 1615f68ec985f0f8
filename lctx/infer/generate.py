"""Autoregressive decoding with a KV cache.

`generate` runs the prompt once through the model with the configured attention
impl (prefill), keeping every layer's rotated keys and values in a cache, then
decodes one token at a time: each step projects one token, writes its key and
value at its position and attends over the cache (dense, one query per row).

Prompts of different lengths share a batch: they are right-padded to a common
prefill length. Causal attention keeps real tokens from seeing the padding; row b's
generated tokens are written at positions lengths[b], lengths[b] + 1, ..., over the
padding, and a decode query at position p only sees cache slots <= p, so padding
is never attended.

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
from jax.sharding import Mesh

from lctx.kernels.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from lctx.model.config import ModelConfig
from lctx.model.rope import apply_rotary, inverse_frequencies, rope_cos_sin
from lctx.model.transformer import attention_fn, head_logits, mlp_sublayer, rms_norm

Params = dict[str, Any]
CPU_BLOCK = 256  # prefill tile size for blockwise attention on CPU when none is configured


def rope_length(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int:
    """The static length RoPE scales for during one generation: prompt + new tokens."""
    del config  # the same rule for every variant; only dynamic / longrope read it
    return prompt_len + max_new_tokens


def prefill_length(config: ModelConfig, prompt_len: int) -> int:
    """The padded prefill length: tile sizes of a blockwise-family impl must divide it."""
    if config.attention_impl == "reference":
        return prompt_len
    options = config.attention_options
    block = max(options.get("block_q", DEFAULT_BLOCK_Q), options.get("block_k", DEFAULT_BLOCK_K))
    if prompt_len <= min(options.get("block_q", DEFAULT_BLOCK_Q),
                         options.get("block_k", DEFAULT_BLOCK_K)):
        return prompt_len
    return math.ceil(prompt_len / block) * block


def _weights(config: ModelConfig, layer: Params) -> dict[str, Any]:
    cast = lambda tree: jax.tree.map(lambda w: w.astype(config.compute_dtype), tree)
    attn = {name: layer["attn"][name]["kernel"] for name in ("q", "k", "v", "o")}
    mlp = {name: layer["mlp"][name]["kernel"] for name in ("gate", "up", "down")}
    return {"attn_norm": layer["attn_norm"]["scale"], "attn": cast(attn),
            "mlp_norm": layer["mlp_norm"]["scale"], "mlp": cast(mlp)}


def _embed(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"]["embedding"], tokens, axis=0).astype(config.compute_dtype)


def _logits(config: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    hidden = rms_norm(x, params["final_norm"]["scale"], config.norm_eps).astype(config.compute_dtype)
    head = params["embed"]["embedding"] if config.tie_embeddings else params["lm_head"]["kernel"]
    return head_logits(hidden, head, config.tie_embeddings)


def _qkv(config: ModelConfig, x: jax.Array, w: dict[str, Any], cos: jax.Array, sin: jax.Array):
    h = rms_norm(x, w["attn_norm"], config.norm_eps).astype(config.compute_dtype)
    q = apply_rotary(jnp.einsum("bsd,dhk->bshk", h, w["attn"]["q"]), cos, sin)
    k = apply_rotary(jnp.einsum("bsd,dhk->bshk", h, w["attn"]["k"]), cos, sin)
    v = jnp.einsum("bsd,dhk->bshk", h, w["attn"]["v"])
    return q, k, v


def _prefill_config(config: ModelConfig, seq: int) -> ModelConfig:
    # The prefill sees tokens in natural order (no model-level ring permutation), and
    # no backward pass runs, so remat is moot.
    options = dict(config.attention_options)
    if config.attention_impl == "ring":
        options["layout"] = "natural"
    if (config.attention_impl == "blockwise" and not {"block_q", "block_k"} & set(options)
            and jax.default_backend() == "cpu" and seq % CPU_BLOCK == 0):
        # Measured on a 2-core CPU: 256-token tiles beat the 512 default by ~10% at 2K-8K.
        options.update(block_q=CPU_BLOCK, block_k=CPU_BLOCK)
    chunk = config.ffn_chunk if config.ffn_chunk and seq % config.ffn_chunk == 0 else None
    return config.replace(attention_options=options, remat="none", ffn_chunk=chunk)


def prefill(config: ModelConfig, params: Params, tokens: jax.Array, lengths: jax.Array, *,
            cache_len: int, rope_seq_len: int, mesh: Mesh | None = None):
    """Runs right-padded prompts int32 `[b, S]` (real lengths `[b]`) through the model.

    Returns (float32 logits `[b, V]` at each row's last real token, cache) where the
    cache is {"k", "v"}: `[layers, b, cache_len, kv_heads, head_dim]` (keys rotated).
    """
    batch, seq = tokens.shape
    cfg = _prefill_config(config, seq)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    inv_freq, factor = inverse_frequencies(cfg.rope, cfg.head_dim, rope_seq_len)
    cos, sin = rope_cos_sin(positions, inv_freq, factor)
    attend = attention_fn(cfg, mesh)

    def layer(x, layer_params):
        w = _weights(cfg, layer_params)
        q, k, v = _qkv(cfg, x, w, cos, sin)
        x = x + jnp.einsum("bshk,hkd->bsd", attend(q, k, v, positions, None), w["attn"]["o"])
        x = mlp_sublayer(x, w["mlp_norm"], w["mlp"], cfg=cfg, mesh=mesh)
        return x, (k, v)

    x, (keys, values) = jax.lax.scan(layer, _embed(cfg, params, tokens), params["layers"])
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    pad = [(0, 0), (0, 0), (0, cache_len - seq), (0, 0), (0, 0)]
    cache = {"k": jnp.pad(keys, pad), "v": jnp.pad(values, pad)}
    return _logits(cfg, params, last), cache


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array, *,
                     sliding_window: int | None) -> jax.Array:
    """One query per row over the cache: q `[b, H, hd]`, caches `[b, T, Hkv, hd]`, pos `[b]`.

    Slot t is visible iff t <= pos (and t > pos - sliding_window). Float32 softmax;
    GQA by grouping query heads, K/V never repeated. Returns `[b, H, hd]` in q's dtype.
    """
    b, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.reshape(b, kv_heads, heads // kv_heads, hd).astype(jnp.float32)
    scores = jnp.einsum("bkgd,btkd->bkgt", qg, k_cache.astype(jnp.float32)) / math.sqrt(hd)
    slots = jnp.arange(k_cache.shape[1])[None, :]
    visible = slots <= pos[:, None]
    if sliding_window is not None:
        visible &= slots > pos[:, None] - sliding_window
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgt,btkd->bkgd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, heads, hd).astype(q.dtype)


def cache_and_self_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                             k_new: jax.Array, v_new: jax.Array, pos: jax.Array, *,
                             sliding_window: int | None) -> jax.Array:
    """`cached_attention` with the row's own key/value passed beside a cache without it.

    q `[b, H, hd]`, caches `[b, T, Hkv, hd]` (slot pos not yet written), k_new / v_new
    `[b, Hkv, hd]`, pos `[b]`: slots t < pos (and t > pos - sliding_window) plus the new
    token itself. The cache is only read, so one step can write every layer's new
    key and value into a donated cache afterwards, in place.
    """
    b, heads, hd = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.reshape(b, kv_heads, heads // kv_heads, hd).astype(jnp.float32) / math.sqrt(hd)
    scores = jnp.einsum("bkgd,btkd->bkgt", qg, k_cache.astype(jnp.float32))
    slots = jnp.arange(k_cache.shape[1])[None, :]
    visible = slots < pos[:, None]
    if sliding_window is not None:
        visible &= slots > pos[:, None] - sliding_window
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    own = jnp.einsum("bkgd,bkd->bkg", qg, k_new.astype(jnp.float32))
    top = jnp.maximum(scores.max(axis=-1), own)  # finite: the own score always counts
    probs, own_prob = jnp.exp(scores - top[..., None]), jnp.exp(own - top)
    out = jnp.einsum("bkgt,btkd->bkgd", probs, v_cache.astype(jnp.float32))
    out = out + own_prob[..., None] * v_new.astype(jnp.float32)[:, :, None]
    out = out / (probs.sum(axis=-1) + own_prob)[..., None]
    return out.reshape(b, heads, hd).astype(q.dtype)


def decode_step(config: ModelConfig, params: Params, cache: dict[str, jax.Array],
                token: jax.Array, pos: jax.Array, *, rope_seq_len: int):
    """One token per row (int32 `[b]`) at positions `[b]`: (float32 logits `[b, V]`, cache).

    The layer scan only reads the cache (each layer attends over its cached slots plus
    the new token's own key/value); the new keys and values of all layers are written
    with one scatter after it. Under jit with the cache donated (or carried by a loop)
    that write is in place: no per-step copy of the cache.
    """
    inv_freq, factor = inverse_frequencies(config.rope, config.head_dim, rope_seq_len)
    cos, sin = rope_cos_sin(pos[:, None], inv_freq, factor)
    rows = jnp.arange(token.shape[0])
    mlp_cfg = config.replace(ffn_chunk=None)

    def layer(x, inputs):
        layer_params, k_cache, v_cache = inputs
        w = _weights(config, layer_params)
        q, k, v = _qkv(config, x, w, cos, sin)
        k, v = k[:, 0].astype(k_cache.dtype), v[:, 0].astype(v_cache.dtype)
        out = cache_and_self_attention(q[:, 0], k_cache, v_cache, k, v, pos,
                                       sliding_window=config.sliding_window)
        x = x + jnp.einsum("bhk,hkd->bd", out, w["attn"]["o"])[:, None]
        x = mlp_sublayer(x, w["mlp_norm"], w["mlp"], cfg=mlp_cfg, mesh=None)
        return x, (k, v)

    x = _embed(config, params, token[:, None])
    x, (keys, values) = jax.lax.scan(layer, x, (params["layers"], cache["k"], cache["v"]))
    cache = {"k": cache["k"].at[:, rows, pos].set(keys), "v": cache["v"].at[:, rows, pos].set(values)}
    return _logits(config, params, x[:, 0]), cache


def _choose(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def decode(config: ModelConfig, params: Params, cache: dict[str, jax.Array], logits: jax.Array,
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


# The two compiled halves of `generate`: a prefill, then one decode loop that owns (is
# donated) the cache. Benchmarks time them apart through these same functions.
prefill_jit = jax.jit(prefill, static_argnums=(0,),
                      static_argnames=("cache_len", "rope_seq_len", "mesh"))
decode_jit = jax.jit(decode, static_argnums=(0,), donate_argnums=(2,),
                     static_argnames=("steps", "temperature", "rope_seq_len", "return_logits"))


def pad_prompts(config: ModelConfig, prompts: Sequence[Sequence[int] | np.ndarray], pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 `[b, S]` (S from `prefill_length`) and the lengths `[b]`."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError(f"prompts: {len(prompts)} prompts with lengths {lengths.tolist()}: "
                         "need at least one prompt, each at least one token long")
    seq = prefill_length(config, int(lengths.max()))
    tokens = np.full((len(prompts), seq), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = np.asarray(prompt, np.int32)
    return tokens, lengths


def generate(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int] | np.ndarray],
             *, max_new_tokens: int, temperature: float = 0.0, rng: jax.Array | None = None,
             pad_id: int = 0, mesh: Mesh | None = None, return_logits: bool = False):
    """Continues each prompt (a list of int token ids) by `max_new_tokens` tokens.

    temperature 0: greedy (argmax); > 0: sampling from softmax(logits / temperature)
    with `rng` (default key 0). Returns int32 `[b, max_new_tokens]` and, with
    return_logits, also the float32 logits `[b, max_new_tokens, V]` each token was
    chosen from. No early stop at EOS: callers cut the continuation where they like.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r}: must be >= 0 (0 is greedy)")
    tokens, lengths = pad_prompts(config, prompts, pad_id)
    rope_seq_len = rope_length(config, int(lengths.max()), max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    lengths = jnp.asarray(lengths)
    logits, cache = prefill_jit(config, params, jnp.asarray(tokens), lengths,
                                cache_len=tokens.shape[1] + max_new_tokens,
                                rope_seq_len=rope_seq_len, mesh=mesh)
    new_tokens, logits, _ = decode_jit(config, params, cache, logits, lengths, rng,
                                       steps=max_new_tokens, temperature=float(temperature),
                                       rope_seq_len=rope_seq_len, return_logits=return_logits)
    new_tokens = np.asarray(new_tokens)
    return (new_tokens, np.asarray(logits)) if return_logits else new_tokens
