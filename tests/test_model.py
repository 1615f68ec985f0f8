"""The LLaMA-style model: parameter tree, presets, numerics against float64 NumPy,
attention impls, meshes, chunked loss, remat, blockwise feed-forward, config errors.

The float64 forward and the closed-form parameter counts are written here from the
architecture's definition, not from lctx.model's code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx.model as model
from lctx import kernels
from lctx.model import RopeConfig
from lctx.compat import AxisType
from lctx.model.loss import chunked_cross_entropy
from lctx.parallel import make_mesh

BATCH, SEQ = 2, 64


def packed_inputs(batch: int = BATCH, seq: int = SEQ, vocab: int = 384, seed: int = 0):
    """Random tokens in packed documents: segment ids and positions restarting per document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq))
    segments = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        for cut in sorted(rng.choice(np.arange(1, seq), size=2, replace=False)):
            segments[row, cut:] += 1
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        for i in range(1, seq):
            same = segments[row, i] == segments[row, i - 1]
            positions[row, i] = positions[row, i - 1] + 1 if same else 0
    return (jnp.asarray(tokens, jnp.int32), jnp.asarray(positions), jnp.asarray(segments))


def max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))


# --- parameter tree and presets ----------------------------------------------------------


def expected_tree(V, D, L, H, K, hd, F, tied):
    tree = {
        "embed": {"embedding": (V, D)},
        "layers": {
            "attn_norm": {"scale": (L, D)},
            "attn": {"q": {"kernel": (L, D, H, hd)}, "k": {"kernel": (L, D, K, hd)},
                     "v": {"kernel": (L, D, K, hd)}, "o": {"kernel": (L, H, hd, D)}},
            "mlp_norm": {"scale": (L, D)},
            "mlp": {"gate": {"kernel": (L, D, F)}, "up": {"kernel": (L, D, F)},
                    "down": {"kernel": (L, F, D)}},
        },
        "final_norm": {"scale": (D,)},
    }
    if not tied:
        tree["lm_head"] = {"kernel": (D, V)}
    return tree


@pytest.mark.parametrize("tied", [False, True])
def test_param_tree_is_exactly_the_documented_one(tied):
    config = model.preset("tiny", tie_embeddings=tied)
    params = model.init(config, jax.random.key(0))
    shapes = jax.tree.map(lambda x: tuple(x.shape), params)
    assert shapes == expected_tree(384, 64, 2, 4, 2, 16, 128, tied)
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32"}
    # Norm scales start at one; distinct layers get distinct weights.
    np.testing.assert_array_equal(params["layers"]["attn_norm"]["scale"], 1.0)
    q = params["layers"]["attn"]["q"]["kernel"]
    assert not np.allclose(q[0], q[1])


def test_param_logical_axes():
    axes = model.param_axes(model.preset("tiny"))
    assert axes["layers"]["attn"]["q"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["layers"]["attn"]["k"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes["layers"]["mlp"]["down"]["kernel"] == ("layers", "mlp", "embed")
    assert axes["embed"]["embedding"] == ("vocab", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")


def closed_form_count(V, D, L, H, K, F, tied, hd=None):
    hd = hd or D // H
    attention = D * H * hd * 2 + D * K * hd * 2
    return V * D * (1 if tied else 2) + L * (attention + 3 * D * F + 2 * D) + D


@pytest.mark.parametrize("name, shape, approx", [
    ("tiny", (384, 64, 2, 4, 2, 128, False), None),
    ("small", (384, 256, 4, 4, 2, 768, True), None),
    ("llama3_1b", (128256, 2048, 16, 32, 8, 8192, True), 1.24e9),
    ("llama3_8b", (128256, 4096, 32, 32, 8, 14336, False), 8.03e9),
    ("llama2_7b", (32000, 4096, 32, 32, 32, 11008, False), 6.74e9),
])
def test_preset_parameter_counts(name, shape, approx):
    count = model.param_count(model.preset(name))  # eval_shape: nothing allocated
    assert count == closed_form_count(*shape)
    if approx:
        assert abs(count - approx) / approx < 0.005
    if name == "small":
        assert 2e6 < count < 8e6


def test_head_dim_apart_from_d_model():
    """Qwen3-style: 4 heads of 32 on d_model 64. q and o project between 64 and 128."""
    config = model.preset("tiny", head_dim=32)
    shapes = jax.tree.map(lambda a: a.shape, jax.eval_shape(functools.partial(model.init, config),
                                                            jax.random.key(0)))
    assert shapes["layers"]["attn"]["q"]["kernel"] == (2, 64, 4, 32)
    assert shapes["layers"]["attn"]["k"]["kernel"] == (2, 64, 2, 32)
    assert shapes["layers"]["attn"]["o"]["kernel"] == (2, 4, 32, 64)
    assert model.param_count(config) == closed_form_count(384, 64, 2, 4, 2, 128, False, hd=32)


def test_llama_presets_rope_and_dtypes():
    c = model.preset("llama3_1b")
    assert (c.rope.rope_type, c.rope.factor, c.rope.low_freq_factor, c.rope.high_freq_factor,
            c.rope.original_max_position_embeddings, c.rope.rope_theta) == (
                "llama3", 32.0, 1.0, 4.0, 8192, 500000.0)
    assert model.preset("llama3_8b").rope.factor == 8.0
    assert model.preset("llama2_7b").rope == RopeConfig(rope_theta=10000.0)
    assert c.dtype == "bfloat16" and c.param_dtype == "float32" and c.tie_embeddings


def test_preset_overrides():
    c = model.preset("tiny", attention_impl="ring", remat="full", dtype=jnp.bfloat16,
                     rope_scaling={"type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 64})
    assert (c.attention_impl, c.remat, c.dtype) == ("ring", "full", "bfloat16")
    assert (c.rope.rope_type, c.rope.factor, c.rope.original_max_position_embeddings,
            c.rope.max_position_embeddings) == ("yarn", 4.0, 64, 256)
    assert model.preset("tiny", rope_scaling=RopeConfig(rope_type="linear", factor=2.0)).rope \
        == RopeConfig(rope_type="linear", factor=2.0)
    assert model.preset("llama3_8b", rope_scaling=None).rope.rope_type == "default"
    # Changing d_model re-derives head_dim.
    assert model.preset("tiny", d_model=128).head_dim == 32
    hash(c)  # a static jit argument


# --- numerics against an independent float64 forward ------------------------------------


def numpy_forward(params, tokens, positions, segments, *, n_heads, n_kv_heads, theta, eps,
                  tied):
    """The LLaMA forward in float64 NumPy from its definition (HF LlamaModel semantics)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens, positions, segments = (np.asarray(a) for a in (tokens, positions, segments))
    E = p["embed"]["embedding"]
    x = E[tokens]
    hd = p["layers"]["attn"]["q"]["kernel"].shape[-1]  # n_heads * hd may differ from d_model

    def rms(t, scale):
        return t / np.sqrt(np.mean(t * t, axis=-1, keepdims=True) + eps) * scale

    inv = theta ** (-np.arange(0, hd, 2) / hd)
    angle = positions[..., None] * inv  # [b, s, hd/2]
    cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]

    def rope(t):  # rotate half: pairs (i, i + hd/2)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], axis=-1)

    visible = (segments[:, :, None] == segments[:, None, :]) & (
        positions[:, None, :] <= positions[:, :, None])  # [b, q, k]
    layers = p["layers"]
    for l in range(layers["attn_norm"]["scale"].shape[0]):
        h = rms(x, layers["attn_norm"]["scale"][l])
        a = layers["attn"]
        q = rope(np.einsum("bsd,dhk->bshk", h, a["q"]["kernel"][l]))
        k = rope(np.einsum("bsd,dhk->bshk", h, a["k"]["kernel"][l]))
        v = np.einsum("bsd,dhk->bshk", h, a["v"]["kernel"][l])
        out = np.zeros_like(q)
        for head in range(n_heads):
            kv = head // (n_heads // n_kv_heads)
            scores = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / np.sqrt(hd)
            scores = np.where(visible, scores, -np.inf)
            w = np.exp(scores - scores.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, :, head] = np.einsum("bqk,bkd->bqd", w, v[:, :, kv])
        x = x + np.einsum("bshk,hkd->bsd", out, a["o"]["kernel"][l])
        h = rms(x, layers["mlp_norm"]["scale"][l])
        m = layers["mlp"]
        g = h @ m["gate"]["kernel"][l]
        x = x + (g / (1 + np.exp(-g)) * (h @ m["up"]["kernel"][l])) @ m["down"]["kernel"][l]
    x = rms(x, p["final_norm"]["scale"])
    return x @ (E.T if tied else p["lm_head"]["kernel"])


@pytest.mark.parametrize("tied, head_dim", [(False, None), (True, None), (False, 32)])
def test_logits_equal_float64_numpy(tied, head_dim):
    config = model.preset("tiny", tie_embeddings=tied, rope=RopeConfig(rope_theta=500.0),
                          attention_options={"block_q": 16, "block_k": 16}, head_dim=head_dim)
    params = model.init(config, jax.random.key(1))
    tokens, positions, segments = packed_inputs(seq=32, seed=1)
    logits = model.forward(config, params, tokens, positions=positions, segment_ids=segments)
    assert logits.shape == (BATCH, 32, 384) and logits.dtype == jnp.float32
    expected = numpy_forward(params, tokens, positions, segments, n_heads=4, n_kv_heads=2,
                             theta=500.0, eps=config.norm_eps, tied=tied)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    config = model.preset("tiny")
    params = model.init(config, jax.random.key(7))
    tokens, positions, segments = packed_inputs(seed=7)
    expected = model.forward(config, params, tokens, positions=positions, segment_ids=segments)
    logits = model.forward(config.replace(dtype="bfloat16"), params, tokens, positions=positions,
                           segment_ids=segments)
    assert logits.dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits: logits of magnitude ~4 agree to a few 1e-2.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=0.15)


# --- attention impls and meshes -------------------------------------------------------------

# Eight heads (two KV heads) so Ulysses can split heads over an 8-way sequence axis.
MULTI_HEAD = dict(d_model=128, n_heads=8, n_kv_heads=2, ffn_chunk=32)


@functools.lru_cache(maxsize=None)
def multi_head_setup():
    config = model.preset("tiny", attention_impl="reference", **MULTI_HEAD)
    params = model.init(config, jax.random.key(2))
    inputs = packed_inputs(seed=2)
    tokens, positions, segments = inputs
    logits = model.forward(config, params, tokens, positions=positions, segment_ids=segments)
    return config, params, inputs, logits


@pytest.mark.parametrize("impl, options, mesh_shape", [
    ("blockwise", {"block_q": 16, "block_k": 8}, None),
    ("ring", {"block_q": 4, "block_k": 4}, (1, 1, 8, 1)),
    ("ulysses", {}, (1, 1, 8, 1)),
    pytest.param("ring", {"layout": "natural", "placement": "striped"}, (1, 1, 8, 1),
                 marks=pytest.mark.slow),
    pytest.param("blockwise", {}, (2, 1, 2, 2), marks=pytest.mark.slow),
])
def test_logits_equal_across_impls(impl, options, mesh_shape):
    config, params, (tokens, positions, segments), expected = multi_head_setup()
    config = config.replace(attention_impl=impl, attention_options=options)
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    logits = model.forward(config, params, tokens, positions=positions, segment_ids=segments,
                           mesh=mesh)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-4, rtol=0)


def loss_and_grads(config, params, inputs, mesh=None):
    tokens, positions, segments = inputs
    targets = jnp.roll(tokens, -1, axis=1)
    mask = (jnp.arange(tokens.shape[1]) % 5 != 0).astype(jnp.float32)[None].repeat(
        tokens.shape[0], 0)

    def loss(p):
        return model.loss(config, p, tokens, targets, loss_mask=mask, positions=positions,
                          segment_ids=segments, mesh=mesh)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@functools.lru_cache(maxsize=None)
def single_device_loss():
    config = model.preset("tiny", attention_impl="reference")
    params = model.init(config, jax.random.key(3))
    inputs = packed_inputs(batch=4, seed=3)
    return config, params, inputs, loss_and_grads(config, params, inputs)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8, 1), pytest.param((2, 1, 4, 1), marks=pytest.mark.slow),
                                        pytest.param((1, 2, 2, 2), marks=pytest.mark.slow)])
def test_loss_and_grads_on_meshes_equal_single_device(mesh_shape):
    config, params, inputs, ((loss, metrics), grads) = single_device_loss()
    mesh = make_mesh(*mesh_shape)
    config = config.replace(attention_impl="ring", ffn_chunk=16)
    params = jax.device_put(params, model.param_shardings(config, mesh))
    (mesh_loss, mesh_metrics), mesh_grads = loss_and_grads(config, params, inputs, mesh)
    assert abs(float(mesh_loss) - float(loss)) < 1e-5
    assert float(mesh_metrics["tokens"]) == float(metrics["tokens"])
    assert max_abs_diff(mesh_grads, grads) < 1e-5


def test_init_on_a_mesh_creates_sharded_params():
    mesh = make_mesh(fsdp=2, sequence=2, tensor=2)
    config = model.preset("tiny")
    params = model.init(config, jax.random.key(0), mesh=mesh)
    embedding = params["embed"]["embedding"]
    assert embedding.addressable_shards[0].data.shape == (384 // 2, 64 // 4)
    np.testing.assert_array_equal(np.asarray(embedding),
                                  np.asarray(model.init(config, jax.random.key(0))["embed"]
                                             ["embedding"]))


# --- loss, remat, blockwise feed-forward ----------------------------------------------------


def dense_cross_entropy(logits, targets, mask):
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    return (nll * mask).sum(), ((np.argmax(logits, -1) == targets) * mask).sum()


@pytest.mark.parametrize("tied, chunk, shards", [(False, 8, 1), (True, 16, 1), (False, 16, 4),
                                                 (True, 64, 2)])
def test_chunked_cross_entropy_equals_dense(tied, chunk, shards):
    keys = jax.random.split(jax.random.key(4), 3)
    hidden = jax.random.normal(keys[0], (2, 64, 32))
    head = jax.random.normal(keys[1], (50, 32) if tied else (32, 50)) * 0.3
    targets = jax.random.randint(keys[2], (2, 64), 0, 50)
    mask = (jnp.arange(64) % 3 != 0).astype(jnp.float32)[None].repeat(2, 0)
    logits = hidden @ (head.T if tied else head)
    nll, correct = chunked_cross_entropy(hidden, head, targets, mask, tied=tied, chunk=chunk,
                                         shards=shards)
    want_nll, want_correct = dense_cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(float(nll), want_nll, rtol=1e-5)
    assert float(correct) == want_correct
    # Gradients too: the chunks are rematerialised, not approximated.
    dense = lambda h, w: jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(
        h @ (w.T if tied else w)), targets[..., None], -1)[..., 0] * mask)
    chunked = lambda h, w: chunked_cross_entropy(h, w, targets, mask, tied=tied, chunk=chunk,
                                                 shards=shards)[0]
    np.testing.assert_allclose(jax.grad(chunked, (0, 1))(hidden, head)[1],
                               jax.grad(dense, (0, 1))(hidden, head)[1], atol=1e-4)


def test_model_loss_equals_dense_loss_of_forward_logits():
    config, params, inputs, ((loss, metrics), _) = single_device_loss()
    tokens, positions, segments = inputs
    logits = model.forward(config, params, tokens, positions=positions, segment_ids=segments)
    mask = (np.arange(SEQ) % 5 != 0).astype(np.float32)[None].repeat(4, 0)
    nll, correct = dense_cross_entropy(logits, np.roll(np.asarray(tokens), -1, 1), mask)
    np.testing.assert_allclose(float(loss), nll / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), correct / mask.sum(), rtol=1e-6)
    assert float(metrics["tokens"]) == mask.sum()


@functools.lru_cache(maxsize=None)
def remat_grads(remat: str, ffn_chunk: int | None = None):
    """((loss, metrics), grads) and the number of while loops in the compiled gradient."""
    config = model.preset("tiny", remat=remat, ffn_chunk=ffn_chunk,
                          attention_options={"block_q": 16, "block_k": 16})
    params = model.init(config, jax.random.key(5))
    tokens, positions, segments = packed_inputs(seed=5)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(p):
        return model.loss(config, p, tokens, targets, positions=positions, segment_ids=segments)

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
    return compiled(params), compiled.as_text().count(" while(")


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow), "save_attention"])
def test_remat_policies_give_identical_gradients(remat):
    ((loss, _), grads), _ = remat_grads("none")
    ((remat_loss, _), remat_grads_), _ = remat_grads(remat)
    assert float(remat_loss) == pytest.approx(float(loss), abs=1e-6)
    assert max_abs_diff(remat_grads_, grads) < 1e-6


def attention_forward_loops() -> int:
    """While loops in the compiled blockwise attention forward at the shapes of remat_grads."""
    config = model.preset("tiny")
    _, positions, segments = packed_inputs(seed=5)
    q = jnp.zeros((BATCH, SEQ, config.n_heads, config.head_dim), jnp.float32)
    kv = jnp.zeros((BATCH, SEQ, config.n_kv_heads, config.head_dim), jnp.float32)
    fwd = functools.partial(kernels.blockwise_attention, causal=True, segment_ids=segments,
                            positions=positions, block_q=16, block_k=16)
    return jax.jit(fwd).lower(q, kv, kv).compile().as_text().count(" while(")


def test_save_attention_does_not_recompute_attention():
    loops = {remat: remat_grads(remat)[1] for remat in ("none", "full", "save_attention")}
    # Full remat runs the attention forward (its loops) once more in the backward pass;
    # save_attention keeps its residuals and does not.
    forward_loops = attention_forward_loops()
    assert forward_loops >= 1
    assert loops["full"] == loops["none"] + forward_loops
    assert loops["save_attention"] == loops["none"]


def test_blockwise_feed_forward_equals_plain():
    ((loss, _), grads), _ = remat_grads("full")
    ((chunked_loss, _), chunked_grads), _ = remat_grads("full", ffn_chunk=16)
    assert float(chunked_loss) == pytest.approx(float(loss), abs=1e-6)
    assert max_abs_diff(chunked_grads, grads) < 1e-6


def test_dynamic_rope_scales_for_the_static_length():
    config = model.preset("tiny", max_position_embeddings=16,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    params = model.init(config, jax.random.key(6))
    tokens, _, _ = packed_inputs(seq=32, seed=6)
    short = model.forward(config, params, tokens[:, :16])
    long = model.forward(config, params, tokens)
    # Within L the base is unchanged; at 32 > L it grows, so the first 16 logits move.
    np.testing.assert_allclose(short, model.forward(config.replace(rope=RopeConfig()), params,
                                                    tokens[:, :16]), atol=1e-5)
    assert float(jnp.max(jnp.abs(long[:, :16] - short))) > 1e-3
    np.testing.assert_allclose(long[:, :16], model.forward(config, params, tokens[:, :16],
                                                           rope_seq_len=32), atol=1e-5)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(n_kv_heads=3), r"n_kv_heads=3: must divide n_heads=4"),
    (dict(d_model=66), r"d_model=66: must be divisible by n_heads=4"),
    (dict(head_dim=15, d_model=60), r"head_dim=15: must be a positive even int"),
    (dict(attention_impl="flash"), r"attention_impl='flash': must be one of "
                                   r"blockwise, pallas, reference, ring, ulysses"),
    (dict(remat="some"), r"remat='some': must be one of none, full, save_attention"),
    (dict(attention_options={"block_q": 0}), r"attention_options.block_q=0: must be a positive"),
    (dict(attention_impl="blockwise", attention_options={"placement": "zigzag"}),
     r"attention_options.placement='zigzag': impl 'blockwise' accepts block_q"),
    (dict(attention_impl="ring", attention_options={"layout": "diagonal"}),
     r"attention_options.layout='diagonal': must be one of balanced, natural"),
    (dict(ffn_chunk=0), r"ffn_chunk=0: must be None or a positive int"),
    (dict(dtype="float8"), r"dtype='float8': must be one of float32, bfloat16, float16"),
    (dict(norm_eps=0.0), r"norm_eps=0.0: must be a positive float"),
    (dict(vocab_size=0), r"vocab_size=0: must be a positive int"),
    (dict(rope_scaling={"rope_type": "yarnn"}), r"rope_type='yarnn': must be one of"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}),
     r"rope_scaling.factor=0.5: must be >= 1"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0}),
     r"original_max_position_embeddings=None: required for rope_type 'llama3'"),
    (dict(rope=RopeConfig(max_position_embeddings=512)),
     r"rope.max_position_embeddings=512: must equal max_position_embeddings=256"),
    (dict(n_layer=2), r"n_layer=2: not a model field"),
])
def test_config_errors_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        model.preset("tiny", **overrides)


def test_config_error_lists_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        model.preset("tiny", n_kv_heads=3, remat="x", ffn_chunk=-1)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid model config:" and len(lines) == 4


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"preset='huge': must be one of tiny, small"):
        model.preset("huge")


def test_yarn_falls_back_to_max_position_embeddings():
    config = model.preset("tiny", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert config.rope.context_length == config.max_position_embeddings == 256


@pytest.mark.parametrize("config_overrides, seq, mesh_shape, message", [
    (dict(attention_impl="ring"), 32, None, r"attention_impl='ring' needs a mesh with a "
                                             r"'sequence' axis"),
    (dict(attention_impl="ring"), 40, (1, 1, 8, 1), r"seq_len=40: impl 'ring' with "
                                                     r"placement 'zigzag' over 8 'sequence' "
                                                     r"shards needs a multiple of 16"),
    (dict(attention_impl="ulysses", n_heads=8), 34, (1, 1, 4, 2),
     r"seq_len=34: impl 'ulysses' over 4 'sequence' shards needs a multiple of 4"),
    (dict(ffn_chunk=12), 32, None, r"ffn_chunk=12: must divide the sequence length 32"),
])
def test_input_errors_before_compiling(config_overrides, seq, mesh_shape, message):
    config = model.preset("tiny", **config_overrides)
    params = jax.eval_shape(lambda: model.init(config, jax.random.key(0)))
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    forward = functools.partial(model.forward, config, mesh=mesh)
    with pytest.raises(ValueError, match=message):  # raised while tracing: nothing compiles
        jax.eval_shape(forward, params, jax.ShapeDtypeStruct((1, seq), jnp.int32))


def test_explicit_mesh_is_refused_up_front():
    config = model.preset("tiny")
    params = jax.eval_shape(lambda: model.init(config, jax.random.key(0)))
    mesh = make_mesh(sequence=8, axis_types=AxisType.Explicit)
    forward = functools.partial(model.forward, config, mesh=mesh)
    with pytest.raises(ValueError, match=r"the model needs Auto axes"):
        jax.eval_shape(forward, params, jax.ShapeDtypeStruct((1, 64), jnp.int32))


def test_mismatched_positions_shape():
    config = model.preset("tiny")
    params = jax.eval_shape(lambda: model.init(config, jax.random.key(0)))
    forward = lambda p, t, pos: model.forward(config, p, t, positions=pos)
    with pytest.raises(ValueError, match=r"positions.shape=\(1, 8\): must equal tokens.shape"):
        jax.eval_shape(forward, params, jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 8), jnp.int32))
