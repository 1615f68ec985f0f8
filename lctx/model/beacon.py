"""Activation beacons (Zhang et al., arXiv 2401.03462) around an lctx LLaMA model.

    beacon = init_beacon(config, params)                        # the trainable part
    hidden = beacon_hidden(config, params, beacon, tokens, chunk=1024, ratio=8)
    loss = beacon_loss(config, params, beacon, tokens, chunk=1024, ratio=8)

The input runs chunk by chunk (`chunk` raw tokens per step). Each chunk's raw tokens
are split into units of `ratio` and one beacon token (a learned embedding) follows
each unit, so a step sees the chunk interleaved as [u_1, b_1, u_2, b_2, ...]
(chunk + chunk / ratio tokens). Who attends to whom (`chunk_mask`):

    raw token    causally to the chunk's raw tokens, and to every past chunk's beacons
    beacon b_u   to its unit's raw tokens, to b_1 .. b_u of its chunk, and to past beacons

After a step only its beacons' keys and values (every layer) are kept: the next chunk
reads the past as chunk / ratio beacons per chunk instead of `chunk` tokens, so the
KV memory is cut by `ratio`. ratio=None turns the beacon path off (no beacons: raw
tokens attend causally within their chunk only; with one chunk that is the base model).

Parameters: the base model's stay frozen (`stop_gradient`: gradients reach only the
beacon module). The module is a beacon embedding `[D]` and, per layer, its own
q/k/v/o projections, initialised from the layer's, which beacon tokens use in place
of the base attention weights (the paper's separate beacon attention); norms and the
MLP are shared.

Positions (RoPE), the paper's choice of numbering within the window a step sees: the m
past beacons at positions 0 .. m-1, the chunk's interleaved tokens right after (m,
m+1, ...). Past beacons' keys are stored before RoPE and rotated again at each step,
so no query-key distance exceeds m + chunk + chunk / ratio, however long the input.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lctx.model.api import head_of, logits_of
from lctx.model.config import ModelConfig
from lctx.model.loss import chunked_cross_entropy, default_chunk
from lctx.model.rope import apply_rotary, inverse_frequencies, rope_cos_sin
from lctx.model.transformer import mlp_sublayer, rms_norm

Params = dict[str, Any]


def chunk_layout(chunk: int, ratio: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The interleaved order of one step: is_beacon bool `[n]` and unit int `[n]`
    (n = chunk + chunk // ratio; ratio None: n = chunk, no beacons)."""
    if ratio is None:
        return np.zeros(chunk, bool), np.arange(chunk) // 1
    if ratio < 1 or chunk % ratio:
        raise ValueError(f"ratio={ratio}: must be a positive divisor of chunk={chunk}")
    t = np.arange(chunk + chunk // ratio)
    return t % (ratio + 1) == ratio, t // (ratio + 1)


def chunk_mask(is_beacon: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """bool `[n, n]`: which of the step's tokens (keys, columns) each (query, row) sees."""
    i, j = np.arange(len(unit))[:, None], np.arange(len(unit))[None, :]
    raw_q, raw_k = ~is_beacon[:, None], ~is_beacon[None, :]
    raw_sees = raw_q & raw_k & (j <= i)
    beacon_sees = ~raw_q & ((raw_k & (unit[None, :] == unit[:, None])) | (~raw_k & (j <= i)))
    return raw_sees | beacon_sees


def init_beacon(config: ModelConfig, params: Params) -> Params:
    """The beacon module: embedding `[D]` (the mean token embedding) and per-layer
    attention kernels copied from the base model's (`[L, ...]` like params['layers'])."""
    attn = params["layers"]["attn"]
    return {"embedding": jnp.mean(params["embed"]["embedding"].astype(jnp.float32), axis=0),
            "attn": jax.tree.map(jnp.array, attn)}


def masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array
                     ) -> jax.Array:
    """Dense float32 GQA attention: q `[b, n, H, hd]`, keys/values `[b, S, Hkv, hd]`
    (rotated), visible bool `[n, S]`; every row must see at least one key."""
    b, n, heads, hd = q.shape
    kv_heads = keys.shape[2]
    qg = q.astype(jnp.float32).reshape(b, n, kv_heads, heads // kv_heads, hd)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, keys.astype(jnp.float32)) * hd**-0.5
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, values.astype(jnp.float32))
    return out.reshape(b, n, heads, hd).astype(q.dtype)


def beacon_attention(q: jax.Array, k: jax.Array, v: jax.Array, past_k: jax.Array,
                     past_v: jax.Array, past_count: jax.Array, mask: jax.Array) -> jax.Array:
    """A step's queries over past beacons and the step itself.

    q `[b, n, H, hd]`; k, v `[b, n, Hkv, hd]` (rotated); past_k, past_v `[b, M, Hkv, hd]`
    (rotated), of which the first `past_count` are real; mask bool `[n, n]` within the
    step. Every query sees itself, so no row is empty. Returns `[b, n, H, hd]`.
    """
    n, m = k.shape[1], past_k.shape[1]
    visible = jnp.concatenate([jnp.broadcast_to(jnp.arange(m) < past_count, (n, m)), mask], 1)
    return masked_attention(q, jnp.concatenate([past_k, k], 1), jnp.concatenate([past_v, v], 1),
                            visible)


def _project(h: jax.Array, base: Params, beacon: Params, is_beacon: jax.Array, name: str):
    """rms-normed h `[b, n, D]` through the base or the beacon kernel, per token."""
    base_out = jnp.einsum("bsd,dhk->bshk", h, base[name]["kernel"])
    beacon_out = jnp.einsum("bsd,dhk->bshk", h, beacon[name]["kernel"].astype(h.dtype))
    return jnp.where(is_beacon[None, :, None, None], beacon_out, base_out)


def layer_stacks(params: Params, beacon: Params) -> tuple[Params, Params]:
    """The base layers (MLP kernels flat, as mlp_sublayer takes them) and the beacon
    attention, both stacked `[L, ...]` for a scan over layers."""
    layers = params["layers"]
    mlp = {name: layers["mlp"][name]["kernel"] for name in ("gate", "up", "down")}
    return {**layers, "mlp": mlp}, beacon["attn"]


def window_layer(cfg: ModelConfig, x: jax.Array, w: Params, bw: Params, is_beacon: jax.Array,
                 cos: jax.Array, sin: jax.Array, context_k: jax.Array, context_v: jax.Array,
                 visible: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """One decoder layer over a window's tokens x `[b, n, D]`.

    Beacon tokens (is_beacon `[n]`) project q/k/v/o with the beacon kernels `bw`, raw
    tokens with the layer's `w`; norms and the MLP are shared. The tokens attend to
    `context_k/v` `[b, S, Hkv, hd]` (rotated: past beacons, cached raw tokens) and to
    themselves, as visible bool `[n, S + n]` allows; cos/sin `[1, n, rot/2]` are the
    tokens' RoPE tables. Returns (x, (keys before RoPE, rotated keys, values) of the
    window's tokens, each `[b, n, Hkv, hd]`).
    """
    h = rms_norm(x, w["attn_norm"]["scale"], cfg.norm_eps).astype(cfg.compute_dtype)
    q = apply_rotary(_project(h, w["attn"], bw, is_beacon, "q"), cos, sin)
    k = _project(h, w["attn"], bw, is_beacon, "k")
    v = _project(h, w["attn"], bw, is_beacon, "v")
    k_rot = apply_rotary(k, cos, sin)
    out = masked_attention(q, jnp.concatenate([context_k, k_rot], 1),
                           jnp.concatenate([context_v, v], 1), visible)
    o = jnp.where(is_beacon[None, :, None],
                  jnp.einsum("bshk,hkd->bsd", out, bw["o"]["kernel"].astype(out.dtype)),
                  jnp.einsum("bshk,hkd->bsd", out, w["attn"]["o"]["kernel"]))
    x = mlp_sublayer(x + o, w["mlp_norm"]["scale"], w["mlp"], cfg=cfg, mesh=None)
    return x, (k, k_rot, v)


def _ratio_choices(ratio: int | None | Sequence[int]) -> tuple[int | None, ...]:
    return tuple(ratio) if isinstance(ratio, (tuple, list)) else (ratio,)


def beacon_hidden(config: ModelConfig, params: Params, beacon: Params, tokens: jax.Array, *,
                  chunk: int, ratio: int | None | Sequence[int],
                  picks: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states `[b, N, D]` of raw tokens int `[b, N]` (N a multiple
    of `chunk`), read chunk by chunk through the beacons (see the module docstring):
    each step runs the chunk interleaved with its beacons in one pass (`chunk_mask`).

    ratio: one ratio for every chunk, None (beacons off), or a tuple of ratios of which
    int `picks` `[N // chunk]` chooses each chunk's (the paper's per-chunk sampling in
    training; a `lax.switch` over one compiled step per ratio, the past held in
    slots for the most beacons any pick could leave).
    """
    batch, total = tokens.shape
    if total % chunk:
        raise ValueError(f"tokens: length {total} must be a multiple of chunk={chunk}")
    choices = _ratio_choices(ratio)
    steps = total // chunk
    if picks is None:
        if len(choices) > 1:
            raise ValueError(f"ratio={choices}: several ratios need `picks`, one per chunk")
        picks = jnp.zeros(steps, jnp.int32)
    cfg = config.replace(ffn_chunk=None)
    base = jax.lax.stop_gradient(params)
    layouts = [chunk_layout(chunk, r) for r in choices]
    most = max(int(is_beacon.sum()) for is_beacon, _ in layouts)
    past_slots = max(1, steps * most)  # one spare slot keeps shapes non-empty when off
    layers, kv_heads, hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
    inv_freq, factor = inverse_frequencies(cfg.rope, hd, past_slots + chunk + most)
    table = base["embed"]["embedding"]
    beacon_x = beacon["embedding"].astype(cfg.compute_dtype)
    past_cos, past_sin = rope_cos_sin(jnp.arange(past_slots)[None], inv_freq, factor)
    stacks = layer_stacks(base, beacon)
    broadcast = lambda a: jnp.broadcast_to(a, (layers, *a.shape))

    def chunk_step(layout, carry, ids):
        """One chunk at one ratio: `layout` = chunk_layout(chunk, ratio)."""
        is_beacon_np, unit = layout
        is_beacon = jnp.asarray(is_beacon_np)
        raw_slots = jnp.asarray(np.flatnonzero(~is_beacon_np))
        beacon_slots = jnp.asarray(np.flatnonzero(is_beacon_np))
        n, units = len(unit), len(beacon_slots)
        mask = jnp.asarray(chunk_mask(is_beacon_np, unit))
        past_k, past_v, count = carry

        def layer(x, weights):
            w, bw, past_k, past_v, cos, sin = weights
            visible = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(past_slots) < count, (n, past_slots)), mask], 1)
            x, (k, _, v) = window_layer(cfg, x, w, bw, is_beacon, cos, sin,
                                        apply_rotary(past_k, past_cos, past_sin), past_v, visible)
            return x, (k[:, beacon_slots], v[:, beacon_slots])  # the beacons' keys before RoPE

        layer = jax.checkpoint(layer, prevent_cse=False)  # one layer's probabilities at a time
        x = jnp.zeros((batch, n, cfg.d_model), cfg.compute_dtype)
        x = x.at[:, raw_slots].set(jnp.take(table, ids, axis=0).astype(cfg.compute_dtype))
        x = x.at[:, beacon_slots].set(beacon_x)
        cos, sin = rope_cos_sin((count + jnp.arange(n))[None], inv_freq, factor)
        x, (new_k, new_v) = jax.lax.scan(
            layer, x, (*stacks, past_k, past_v, broadcast(cos), broadcast(sin)))
        if units:
            past_k = jax.lax.dynamic_update_slice_in_dim(past_k, new_k, count, axis=2)
            past_v = jax.lax.dynamic_update_slice_in_dim(past_v, new_v, count, axis=2)
        hidden = rms_norm(x[:, raw_slots], base["final_norm"]["scale"], cfg.norm_eps)
        return (past_k, past_v, count + units), hidden.astype(cfg.compute_dtype)

    branches = [functools.partial(chunk_step, layout) for layout in layouts]

    def step(carry, inputs):
        ids, pick = inputs
        if len(branches) == 1:
            return branches[0](carry, ids)
        return jax.lax.switch(pick, branches, carry, ids)

    empty = jnp.zeros((layers, batch, past_slots, kv_heads, hd), cfg.compute_dtype)
    ids = jnp.swapaxes(tokens.reshape(batch, steps, chunk), 0, 1)
    _, hidden = jax.lax.scan(step, (empty, empty, jnp.int32(0)), (ids, jnp.asarray(picks, jnp.int32)))
    return jnp.swapaxes(hidden, 0, 1).reshape(batch, total, cfg.d_model)


def beacon_logits(config: ModelConfig, params: Params, beacon: Params, tokens: jax.Array, *,
                  chunk: int, ratio: int | None | Sequence[int],
                  picks: jax.Array | None = None) -> jax.Array:
    """float32 logits `[b, N, V]` of the raw tokens read through the beacons."""
    hidden = beacon_hidden(config, params, beacon, tokens, chunk=chunk, ratio=ratio, picks=picks)
    return logits_of(config, jax.lax.stop_gradient(params), hidden)


def beacon_nll(config: ModelConfig, params: Params, beacon: Params, tokens: jax.Array, *,
               chunk: int, ratio: int | None | Sequence[int],
               picks: jax.Array | None = None) -> jax.Array:
    """float32 `[b, N - 1]`: -log p(token t+1 | tokens <= t, read through the beacons)."""
    logits = beacon_logits(config, params, beacon, tokens, chunk=chunk, ratio=ratio, picks=picks)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def beacon_loss(config: ModelConfig, params: Params, beacon: Params, tokens: jax.Array, *,
                chunk: int, ratio: int | None | Sequence[int],
                picks: jax.Array | None = None) -> jax.Array:
    """Mean next-token loss; its gradient reaches only `beacon`."""
    return jnp.mean(beacon_nll(config, params, beacon, tokens, chunk=chunk, ratio=ratio,
                               picks=picks))


def beacon_lm_loss(config: ModelConfig, params: Params, beacon: Params, tokens: jax.Array,
                   targets: jax.Array, loss_mask: jax.Array, *, chunk: int,
                   ratio: int | None | Sequence[int], picks: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """lctx.model.loss read through the beacons: mean cross-entropy of int `targets`
    `[b, N]` over `loss_mask` `[b, N]`, and {"loss", "tokens", "accuracy"}; the logits
    are formed a piece at a time (chunked_cross_entropy), never `[b, N, V]` at once."""
    hidden = beacon_hidden(config, params, beacon, tokens, chunk=chunk, ratio=ratio, picks=picks)
    head = head_of(config, jax.lax.stop_gradient(params))
    rows, seq = tokens.shape
    nll, correct = chunked_cross_entropy(hidden, head, targets, loss_mask,
                                         tied=config.tie_embeddings,
                                         chunk=default_chunk(rows, seq, config.vocab_size))
    n_tokens = jnp.sum(loss_mask.astype(jnp.float32))
    mean = nll / jnp.maximum(n_tokens, 1.0)
    return mean, {"loss": mean, "tokens": n_tokens, "accuracy": correct / jnp.maximum(n_tokens, 1.0)}
