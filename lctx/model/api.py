"""Functional entry points: `init`, `forward`, `loss`, and parameter metadata.

Everything takes the (hashable) ModelConfig and a plain parameter tree, so
training, evaluation, notebooks and the HF converter share one code path. `forward`
and `loss` are jitted with config, mesh and lengths static; call them inside
another jit freely.

With attention_impl="ring" (balanced layout), tokens, positions, segment ids,
targets and the loss mask are permuted once here into the load-balanced order;
logits come back in natural order, and the loss (a sum over tokens) needs no
un-permuting.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lctx import compat, kernels, parallel
from lctx.kernels.registry import IMPLS, sequence_problems
from lctx.model.config import ModelConfig
from lctx.model.loss import chunked_cross_entropy, default_chunk
from lctx.model.transformer import Llama, head_logits, length_shards

Params = dict[str, Any]


# ----------------------------------------------------------------------------- params


def _init_config(config: ModelConfig) -> ModelConfig:
    # Parameters do not depend on the attention impl, remat or chunking; initialise
    # through the plain single-device path so init needs no mesh.
    return config.replace(attention_impl="reference", attention_options={}, remat="none",
                          ffn_chunk=None)


def _boxed_init(config: ModelConfig, rng: jax.Array) -> Any:
    """Parameters boxed in nn.LogicallyPartitioned (one-token dummy forward)."""
    model = Llama(_init_config(config))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, tokens, tokens, None, 1)["params"]


def abstract_params(config: ModelConfig) -> Any:
    """ShapeDtypeStructs of the parameters boxed with their logical axis names (no allocation)."""
    config.validate()
    return jax.eval_shape(functools.partial(_boxed_init, config), jax.random.key(0))


def param_axes(config: ModelConfig) -> Any:
    """The parameter tree with each leaf replaced by its tuple of logical axis names."""
    boxed = abstract_params(config)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda b: tuple(b.names), boxed, is_leaf=is_box)


def param_count(config: ModelConfig) -> int:
    """Number of parameters, from shapes alone."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(config)))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def param_shardings(config: ModelConfig, mesh: Mesh) -> Any:
    """NamedShardings for `init`'s parameters on `mesh`: FSDP over fsdp x sequence, TP over tensor."""
    return parallel.param_shardings(abstract_params(config), mesh)


def init(config: ModelConfig, rng: jax.Array, *, mesh: Mesh | None = None) -> Params:
    """Fresh parameters (plain arrays in param_dtype), created sharded when `mesh` is given."""
    config.validate()
    fn = lambda key: nn.meta.unbox(_boxed_init(config, key))
    shardings = None if mesh is None else param_shardings(config, mesh)
    return jax.jit(fn, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------- inputs


def _ring_layout(config: ModelConfig) -> tuple[str, bool]:
    """(placement, whether the model permutes tokens once) for the configured attention."""
    options = config.attention_options
    placement = IMPLS["ring"].placement(options, causal=True)  # the kernels' default
    permute = config.attention_impl == "ring" and options.get("layout", "balanced") == "balanced"
    return placement, permute


def _check_inputs(config: ModelConfig, tokens: jax.Array, mesh: Mesh | None,
                  named: dict[str, jax.Array | None]) -> None:
    """One ValueError naming the argument, its value and what is allowed."""
    problems = []
    if mesh is not None and compat.is_explicit(mesh):
        # Explicit axes put sharding in the types: every gather and matmul would need
        # out_sharding annotations. The model relies on the compiler's propagation.
        problems.append(f"mesh axis_types={tuple(mesh.axis_types)}: the model needs Auto axes "
                        "(lctx.parallel.make_mesh's default)")
    if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        problems.append(f"tokens: shape {getattr(tokens, 'shape', None)}, dtype "
                        f"{getattr(tokens, 'dtype', None)}: must be int [batch, seq]")
    else:
        for name, value in named.items():
            if value is not None and value.shape != tokens.shape:
                problems.append(f"{name}.shape={value.shape}: must equal tokens.shape "
                                f"{tokens.shape}")
        seq = tokens.shape[1]
        shards = length_shards((tokens.shape[0], seq, config.d_model), mesh)
        chunk = config.ffn_chunk
        if chunk is not None and chunk < seq and (seq % chunk or chunk % shards):
            problems.append(f"ffn_chunk={chunk}: must divide the sequence length {seq} and be "
                            f"a multiple of the {shards} sequence shards")
        impl = config.attention_impl
        if IMPLS[impl].sequence_parallel and (mesh is None or "sequence" not in mesh.shape):
            problems.append(f"mesh={mesh}: attention_impl={impl!r} needs a mesh with a "
                            "'sequence' axis (lctx.parallel.make_mesh)")
        elif IMPLS[impl].sequence_parallel:
            # Natural: the model's tokens still need placing, once (layout "balanced")
            # or by every attention call (layout "natural"); either needs the same multiple.
            found = sequence_problems(impl, config.attention_options, seq=seq,
                                      shards=mesh.shape["sequence"])
            problems += [f"seq_len={value}: {allowed}" for _, value, allowed in found[:1]]
    if problems:
        raise ValueError("invalid model inputs:\n  " + "\n  ".join(problems))


def _prepare(config: ModelConfig, tokens: jax.Array, positions: jax.Array | None,
             segment_ids: jax.Array | None, mesh: Mesh | None, extra: dict[str, jax.Array]):
    """Validates, fills default positions, and permutes everything once for a balanced ring.

    Returns (tokens, positions, segment_ids, extra, unpermute), each int32 / as given,
    in the order the model computes in; `unpermute` maps `[b, s, ...]` back to natural.
    """
    config.validate()
    _check_inputs(config, tokens, mesh, {"positions": positions, "segment_ids": segment_ids,
                                         **extra})
    batch, seq = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    tokens, positions = tokens.astype(jnp.int32), positions.astype(jnp.int32)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    placement, permute = _ring_layout(config)
    if not permute:
        return tokens, positions, segment_ids, extra, lambda x: x
    shards = mesh.shape["sequence"]
    place = lambda x: None if x is None else kernels.to_balanced(x, shards, placement)
    extra = {k: place(v) for k, v in extra.items()}
    return (place(tokens), place(positions), place(segment_ids), extra,
            lambda x: kernels.to_natural(x, shards, placement))


# ----------------------------------------------------------------------------- entry points


@functools.partial(jax.jit, static_argnames=("config", "mesh", "rope_seq_len"))
def forward(config: ModelConfig, params: Params, tokens: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            mesh: Mesh | None = None, rope_seq_len: int | None = None) -> jax.Array:
    """float32 logits `[batch, seq, vocab]` of int tokens `[batch, seq]`.

    positions (default 0..seq-1) and segment_ids (packed documents; None: one
    document per row) are int `[batch, seq]`. rope_seq_len (static) is the length
    `dynamic` / `longrope` RoPE scale for; default seq.
    """
    tokens, positions, segment_ids, _, unpermute = _prepare(
        config, tokens, positions, segment_ids, mesh, {})
    logits = Llama(config, mesh).apply({"params": params}, tokens, positions, segment_ids,
                                       rope_seq_len or tokens.shape[1])
    return unpermute(logits)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "rope_seq_len", "chunk"))
def loss(config: ModelConfig, params: Params, tokens: jax.Array, targets: jax.Array, *,
         loss_mask: jax.Array | None = None, positions: jax.Array | None = None,
         segment_ids: jax.Array | None = None, mesh: Mesh | None = None,
         rope_seq_len: int | None = None, chunk: int | None = None
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over the masked tokens, and metrics.

    tokens, targets int `[batch, seq]`; loss_mask `[batch, seq]` (default all ones).
    chunk: sequence positions whose logits exist at once, split over the sequence
    shards (default: the largest keeping one chunk of float32 logits under 64 MiB
    per device).
    Returns (loss, {"loss", "tokens": mask sum, "accuracy": argmax hit rate}).
    """
    if loss_mask is None:
        loss_mask = jnp.ones(tokens.shape, jnp.float32)
    tokens, positions, segment_ids, extra, _ = _prepare(
        config, tokens, positions, segment_ids, mesh, {"targets": targets, "loss_mask": loss_mask})
    batch, seq = tokens.shape
    model = Llama(config, mesh)
    variables = {"params": params}
    hidden = model.apply(variables, tokens, positions, segment_ids, rope_seq_len or seq,
                         method=Llama.hidden)
    head = model.apply(variables, method=Llama.head)
    shards = length_shards(hidden.shape, mesh)
    rows = batch // parallel.dim_shards(("batch",), (batch,), 0, mesh)  # per device
    chunk = chunk or shards * default_chunk(rows, seq // shards, config.vocab_size)
    nll, correct = chunked_cross_entropy(hidden, head, extra["targets"], extra["loss_mask"],
                                         tied=config.tie_embeddings, chunk=chunk, shards=shards)
    n_tokens = jnp.sum(extra["loss_mask"].astype(jnp.float32))
    denom = jnp.maximum(n_tokens, 1.0)
    mean = nll / denom
    return mean, {"loss": mean, "tokens": n_tokens, "accuracy": correct / denom}


def extend(config: ModelConfig, params: Params, tokens: jax.Array, cache: Any, *,
           positions: jax.Array, valid: jax.Array, rope_seq_len: int) -> tuple[jax.Array, Any]:
    """Runs a chunk of tokens int `[b, C]` through the model, appended to a KV cache.

    The same layers as `forward`, with attention over the cache (`lctx.infer.kvcache`;
    one device). positions int `[b, C]`; valid bool `[b, C]` (False: padding, never
    attended). Returns (final-normed hidden `[b, C, D]`, updated cache); `logits_of`
    turns hidden states into logits. Not jitted: call it inside a jit.
    """
    return Llama(config).apply({"params": params}, tokens.astype(jnp.int32),
                               positions.astype(jnp.int32), valid, rope_seq_len, cache,
                               method=Llama.hidden_cached)


def head_of(config: ModelConfig, params: Params) -> jax.Array:
    """The output head: lm_head `[D, V]`, or the embedding `[V, D]` when tied."""
    return Llama(config).apply({"params": params}, method=Llama.head)


def logits_of(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits `[..., V]` of final-normed hidden states `[..., D]`."""
    return head_logits(hidden, head_of(config, params), config.tie_embeddings)
