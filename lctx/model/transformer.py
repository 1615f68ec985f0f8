"""The Flax (linen) LLaMA-style decoder.

Modules only declare parameters (with logical-axis annotations); the arithmetic is
in small pure functions, which keeps remat, blockwise feed-forward and the chunked
loss ordinary JAX transformations. The parameter tree (layers stacked on a leading
axis L by `nn.scan`; no biases):

    embed/embedding [V, D]
    layers/attn_norm/scale [L, D]
    layers/attn/{q,k,v}/kernel [L, D, H|Hkv, hd];  layers/attn/o/kernel [L, H, hd, D]
    layers/mlp_norm/scale [L, D]
    layers/mlp/{gate,up}/kernel [L, D, F];  layers/mlp/down/kernel [L, F, D]
    final_norm/scale [D]
    lm_head/kernel [D, V]      (absent when tied: logits = x @ embedding.T)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from lctx import kernels
from lctx.model.config import ModelConfig
from lctx.model.rope import apply_rotary, inverse_frequencies, rope_cos_sin
from lctx.parallel import constrain_logical, dim_shards

# The checkpoint name of everything attention's backward needs (its output and its
# kernel's residuals); remat="save_attention" keeps exactly these.
ATTENTION_CHECKPOINT = "attention"

ACTIVATION = ("batch", "length", "embed")
Q_AXES = ("batch", "length", "heads", "head_dim")
KV_AXES = ("batch", "length", "kv_heads", "head_dim")


# ----------------------------------------------------------------------------- pure math


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in float32 (as HF LlamaRMSNorm).

    x `[..., D]`, scale `[D]`; returns float32 `[..., D]` (callers cast).
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return normed * scale.astype(jnp.float32)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)), position-wise: x `[..., D]` -> `[..., D]`."""
    project = lambda w: jnp.einsum("...d,df->...f", x, w)
    hidden = jax.nn.silu(project(gate)) * project(up)
    return jnp.einsum("...f,fd->...d", hidden, down)


def length_shards(shape: tuple[int, ...], mesh: Mesh | None) -> int:
    """How many ways activations of `shape` `[b, s, D]` split their sequence on `mesh`."""
    return dim_shards(ACTIVATION, shape, 1, mesh)


def shard_major(x: jax.Array, shards: int) -> jax.Array:
    """`[b, s, ...]` -> `[b, s // shards, shards, ...]`: token (i, j) is token j * s/shards + i.

    Chunking axis 1 of this view (e.g. `blockwise_feedforward`) gives every sequence
    shard a contiguous run of its own tokens at each step. On each device the view
    is a free reshape (its shard axis has size 1), where plain contiguous chunks of
    a sequence-sharded array would put each whole chunk on one device.
    """
    b, s = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, shards, s // shards, *x.shape[2:]), 1, 2)


def from_shard_major(x: jax.Array) -> jax.Array:
    """Inverse of `shard_major`: `[b, s/P, P, ...]` -> `[b, s, ...]`."""
    b, local, shards = x.shape[:3]
    return jnp.swapaxes(x, 1, 2).reshape(b, local * shards, *x.shape[3:])


def head_logits(hidden: jax.Array, head: jax.Array, tied: bool) -> jax.Array:
    """float32 logits `[..., V]` of hidden `[..., D]`.

    head: the `[D, V]` lm_head, or the `[V, D]` embedding when tied.
    """
    spec = "...d,vd->...v" if tied else "...d,dv->...v"
    return jnp.einsum(spec, hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)


def saveable(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Wraps attention `fn(q, k, v, positions, segment_ids)` so remat can keep its residuals.

    A checkpoint policy only sees named values; the kernel's residuals (q, k, v, o,
    lse inside its custom VJP) have no names, so naming just the output would rerun
    the whole attention forward in the backward pass. Here the output and every
    residual of `jax.vjp(fn)` are named ATTENTION_CHECKPOINT.
    """

    @jax.custom_vjp
    def attend(q, k, v, positions, segment_ids):
        return fn(q, k, v, positions, segment_ids)

    def attend_fwd(q, k, v, positions, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, positions, segment_ids), q, k, v)
        name = lambda t: checkpoint_name(t, ATTENTION_CHECKPOINT)
        return name(out), jax.tree.map(name, vjp)

    def attend_bwd(vjp, g):
        return (*vjp(g), None, None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


# ----------------------------------------------------------------------------- modules


def _fan_in_init(in_axes: tuple[int, ...], ndim: int) -> nn.initializers.Initializer:
    """Truncated normal with variance 1/fan_in over `in_axes` (LeCun), for any kernel rank."""
    out_axes = tuple(a for a in range(ndim) if a not in in_axes)
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axes, out_axis=out_axes)


class Weight(nn.Module):
    """Holds one parameter `param_name` with logical axis `names`; calling returns it."""

    param_name: str
    shape: tuple[int, ...]
    names: tuple[str, ...]
    init_fn: Callable[..., jax.Array]
    dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.with_logical_partitioning(self.init_fn, self.names)
        return self.param(self.param_name, init, self.shape, self.dtype)


def _kernel(cfg: ModelConfig, name: str, shape: tuple[int, ...], names: tuple[str, ...],
            in_axes: tuple[int, ...] = (0,)) -> jax.Array:
    """The `name/kernel` weight, cast to the compute dtype (call inside a compact method)."""
    init = _fan_in_init(in_axes, len(shape))
    return Weight("kernel", shape, names, init, cfg.weights_dtype, name=name)().astype(
        cfg.compute_dtype)


def _norm_scale(cfg: ModelConfig, name: str) -> jax.Array:
    return Weight("scale", (cfg.d_model,), ("embed",), nn.initializers.ones, cfg.weights_dtype,
                  name=name)()


class AttentionWeights(nn.Module):
    """The q, k, v, o projection kernels (no biases), in the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        c = self.config
        D, H, K, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        return {
            "q": _kernel(c, "q", (D, H, hd), ("embed", "heads", "head_dim")),
            "k": _kernel(c, "k", (D, K, hd), ("embed", "kv_heads", "head_dim")),
            "v": _kernel(c, "v", (D, K, hd), ("embed", "kv_heads", "head_dim")),
            "o": _kernel(c, "o", (H, hd, D), ("heads", "head_dim", "embed"), in_axes=(0, 1)),
        }


class MLPWeights(nn.Module):
    """The SwiGLU gate, up and down kernels, in the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        c = self.config
        D, F = c.d_model, c.mlp_dim
        return {
            "gate": _kernel(c, "gate", (D, F), ("embed", "mlp")),
            "up": _kernel(c, "up", (D, F), ("embed", "mlp")),
            "down": _kernel(c, "down", (F, D), ("mlp", "embed")),
        }


def attention_fn(cfg: ModelConfig, mesh: Mesh | None) -> Callable[..., jax.Array]:
    """`(q, k, v, positions, segment_ids) -> out`: causal `kernels.attention` as configured.

    For ring with the (default) balanced layout the model has already permuted the
    tokens once at its input, so every layer passes layout="balanced".
    """
    options = dict(cfg.attention_options)
    layout = options.pop("layout", "balanced") if cfg.attention_impl == "ring" else "natural"
    if layout == "balanced":
        options.pop("placement", None)  # the model placed the tokens already

    def attend(q, k, v, positions, segment_ids):
        return kernels.attention(q, k, v, impl=cfg.attention_impl, causal=True,
                                 positions=positions, segment_ids=segment_ids,
                                 sliding_window=cfg.sliding_window, mesh=mesh, layout=layout,
                                 **options)

    return attend


def project_qkv(x: jax.Array, norm_scale: jax.Array, w: dict[str, jax.Array], cos: jax.Array,
                sin: jax.Array, *, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries `[b, s, H, hd]`, rotated keys and values `[b, s, Hkv, hd]` of rms_norm(x)."""
    h = rms_norm(x, norm_scale, cfg.norm_eps).astype(cfg.compute_dtype)
    q = apply_rotary(jnp.einsum("bsd,dhk->bshk", h, w["q"]), cos, sin)
    k = apply_rotary(jnp.einsum("bsd,dhk->bshk", h, w["k"]), cos, sin)
    return q, k, jnp.einsum("bsd,dhk->bshk", h, w["v"])


def attention_sublayer(x: jax.Array, norm_scale: jax.Array, w: dict[str, jax.Array],
                       cos: jax.Array, sin: jax.Array, positions: jax.Array,
                       segment_ids: jax.Array | None, *, cfg: ModelConfig,
                       mesh: Mesh | None) -> jax.Array:
    """x + attention(rms_norm(x)) with RoPE and GQA.

    x `[b, s, D]` (compute dtype); cos/sin float32 `[b, s, rot/2]`; positions and
    segment ids int32 `[b, s]`; w from AttentionWeights. Returns `[b, s, D]`.
    """
    q, k, v = project_qkv(x, norm_scale, w, cos, sin, cfg=cfg)
    q = constrain_logical(q, Q_AXES, mesh)
    k, v = (constrain_logical(t, KV_AXES, mesh) for t in (k, v))
    attend = attention_fn(cfg, mesh)
    if cfg.remat == "save_attention":
        attend = saveable(attend)
    out = attend(q, k, v, positions, segment_ids)
    x = x + jnp.einsum("bshk,hkd->bsd", out, w["o"])
    return constrain_logical(x, ACTIVATION, mesh)


def mlp_sublayer(x: jax.Array, norm_scale: jax.Array, w: dict[str, jax.Array], *,
                 cfg: ModelConfig, mesh: Mesh | None) -> jax.Array:
    """x + swiglu(rms_norm(x)); blockwise (`ffn_chunk` tokens per step) when set.

    x `[b, s, D]` -> `[b, s, D]`.
    """
    def sublayer(t: jax.Array) -> jax.Array:  # position-wise, so it may run in chunks
        h = rms_norm(t, norm_scale, cfg.norm_eps).astype(cfg.compute_dtype)
        return t + swiglu(h, w["gate"], w["up"], w["down"])

    if cfg.ffn_chunk is None or cfg.ffn_chunk >= x.shape[1]:
        out = sublayer(x)
    else:  # ffn_chunk tokens per step, ffn_chunk / shards from each sequence shard (see
        # shard_major); the norm and residual ride along, so no full-length normed copy
        # or MLP output exists
        shards = length_shards(x.shape, mesh)
        out = from_shard_major(kernels.blockwise_feedforward(sublayer, shard_major(x, shards),
                                                             cfg.ffn_chunk // shards))
    return constrain_logical(out, ACTIVATION, mesh)


def block_fn(x: jax.Array, weights: dict[str, Any], cos: jax.Array, sin: jax.Array,
             positions: jax.Array, segment_ids: jax.Array | None, *, cfg: ModelConfig,
             mesh: Mesh | None) -> jax.Array:
    """One decoder layer as a pure function: attention sub-layer, then MLP sub-layer.

    weights: {"attn_norm", "attn", "mlp_norm", "mlp"} as the Block module holds them.
    """
    x = attention_sublayer(x, weights["attn_norm"], weights["attn"], cos, sin, positions,
                           segment_ids, cfg=cfg, mesh=mesh)
    return mlp_sublayer(x, weights["mlp_norm"], weights["mlp"], cfg=cfg, mesh=mesh)


def cached_block_fn(x: jax.Array, weights: dict[str, Any], cos: jax.Array, sin: jax.Array,
                    positions: jax.Array, valid: jax.Array, cache: Any, *, cfg: ModelConfig
                    ) -> tuple[jax.Array, Any]:
    """`block_fn` for a chunk of tokens appended to one layer's KV cache (one device).

    cache: one layer of an `lctx.infer.kvcache.KVCache` (any object with its `attend`):
    it stores the chunk's keys and values, attends over everything it holds and
    evicts by its policy. valid bool `[b, s]` marks real tokens (False: padding).
    Returns (x `[b, s, D]`, the layer's updated cache).
    """
    q, k, v = project_qkv(x, weights["attn_norm"], weights["attn"], cos, sin, cfg=cfg)
    out, cache = cache.attend(q, k, v, positions, valid, sliding_window=cfg.sliding_window)
    x = x + jnp.einsum("bshk,hkd->bsd", out, weights["attn"]["o"])
    return mlp_sublayer(x, weights["mlp_norm"], weights["mlp"], cfg=cfg, mesh=None), cache


def remat_block(cfg: ModelConfig, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` (a layer) under the config's remat policy.

    "full": only the layer's input is saved; the backward pass recomputes the layer.
    "save_attention": attention's output and kernel residuals are saved as well, so
    the attention forward (the quadratic-cost part) is not recomputed.
    prevent_cse=False: under scan the recomputation cannot be merged with the
    forward anyway, and the default would only add optimisation barriers.
    """
    if cfg.remat == "none":
        return fn
    policy = None
    if cfg.remat == "save_attention":
        policy = jax.checkpoint_policies.save_only_these_names(ATTENTION_CHECKPOINT)
    return jax.checkpoint(fn, prevent_cse=False, policy=policy)


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); scanned over layers."""

    config: ModelConfig
    mesh: Mesh | None

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, Any], cos: jax.Array, sin: jax.Array,
                 positions: jax.Array, segment_ids: jax.Array | None, layer: jax.Array,
                 valid: jax.Array | None) -> tuple[tuple[jax.Array, Any], None]:
        """carry: (x, None), or (x, the whole `[layers, ...]` KV cache) of which this layer
        (index `layer`) reads and writes its own slice (cached_block_fn). The cache rides
        in the scan's carry so each layer's write is in place, not a copy of the cache."""
        x, cache = carry
        c = self.config
        weights = {"attn_norm": _norm_scale(c, "attn_norm"),
                   "attn": AttentionWeights(c, name="attn")(),
                   "mlp_norm": _norm_scale(c, "mlp_norm"),
                   "mlp": MLPWeights(c, name="mlp")()}
        if cache is not None:
            mine = jax.tree.map(lambda a: a[layer], cache)
            x, mine = cached_block_fn(x, weights, cos, sin, positions, valid, mine, cfg=c)
            cache = jax.tree.map(lambda a, new: a.at[layer].set(new), cache, mine)
            return (x, cache), None
        layer_fn = remat_block(c, functools.partial(block_fn, cfg=c, mesh=self.mesh))
        return (layer_fn(x, weights, cos, sin, positions, segment_ids), None), None


def scanned_blocks(cfg: ModelConfig) -> type[nn.Module]:
    """Block scanned over n_layers, parameters (and a KV cache) stacked on a leading axis."""
    return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast), length=cfg.n_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})


class Llama(nn.Module):
    """Token ids -> final-normed hidden states (`hidden`) or float32 logits (`__call__`).

    Tokens, positions and segment ids arrive in the order attention expects (the
    functional API permutes them once for a balanced ring layout).
    """

    config: ModelConfig
    mesh: Mesh | None = None

    def setup(self) -> None:
        c = self.config
        embed_init = nn.initializers.normal(stddev=1.0 / math.sqrt(c.d_model))
        # Unit-RMS hidden states times N(0, 1/D) rows give unit-scale logits when tied.
        self.embed = Weight("embedding", (c.vocab_size, c.d_model), ("vocab", "embed"),
                            embed_init, c.weights_dtype)
        self.layers = scanned_blocks(c)(c, self.mesh)
        self.final_norm = Weight("scale", (c.d_model,), ("embed",), nn.initializers.ones,
                                 c.weights_dtype)
        if not c.tie_embeddings:
            self.lm_head = Weight("kernel", (c.d_model, c.vocab_size), ("embed", "vocab"),
                                  _fan_in_init((0,), 2), c.weights_dtype)

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               rope_seq_len: int) -> jax.Array:
        """Final-normed hidden states `[b, s, D]` (compute dtype) of int32 tokens `[b, s]`.

        rope_seq_len: the static sequence length `dynamic` / `longrope` RoPE scale for.
        """
        return self._layers(tokens, positions, segment_ids, rope_seq_len, None, None)[0]

    def hidden_cached(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                      rope_seq_len: int, cache: Any) -> tuple[jax.Array, Any]:
        """`hidden` of a chunk appended to a KV cache `[layers, ...]` (one device).

        valid bool `[b, s]` marks real tokens. Returns (hidden `[b, s, D]`, the cache
        with the chunk written and the policy's eviction applied).
        """
        return self._layers(tokens, positions, None, rope_seq_len, cache, valid)

    def _layers(self, tokens, positions, segment_ids, rope_seq_len, cache, valid):
        c = self.config
        inv_freq, attention_factor = inverse_frequencies(c.rope, c.head_dim, rope_seq_len)
        # One cos/sin table per forward, shared by every layer (broadcast into the scan).
        cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)
        # Gather the table's embed dim first (as FSDP does for every weight): a lookup
        # into an embed-sharded table makes the partitioner replicate its output.
        table = constrain_logical(self.embed(), ("vocab", None), self.mesh)
        x = jnp.take(table, tokens, axis=0).astype(c.compute_dtype)
        x = constrain_logical(x, ACTIVATION, self.mesh)
        layer_index = jnp.arange(c.n_layers, dtype=jnp.int32)
        (x, cache), _ = self.layers((x, cache), cos, sin, positions, segment_ids, layer_index,
                                    valid)
        return rms_norm(x, self.final_norm(), c.norm_eps).astype(c.compute_dtype), cache

    def head(self) -> jax.Array:
        """The output projection: `[D, V]` lm_head, or the `[V, D]` embedding when tied."""
        return self.embed() if self.config.tie_embeddings else self.lm_head()

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 rope_seq_len: int) -> jax.Array:
        """float32 logits `[b, s, V]`."""
        hidden = self.hidden(tokens, positions, segment_ids, rope_seq_len)
        logits = head_logits(hidden, self.head(), self.config.tie_embeddings)
        return constrain_logical(logits, ("batch", "length", "vocab"), self.mesh)
