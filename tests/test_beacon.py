"""Activation beacons (lctx.model.beacon) against references built from the rule itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lctx import model
from lctx.model import beacon as bc


def rule_mask(chunk: int, ratio: int) -> tuple[np.ndarray, np.ndarray]:
    """The step's order and visibility written out token by token from the rule:
    units of `ratio` raw tokens, each followed by its beacon; a raw token sees the raw
    tokens before it (and itself), a beacon its unit's raw tokens and the beacons up to it."""
    kinds = []  # (is_beacon, unit)
    for u in range(chunk // ratio):
        kinds += [(False, u)] * ratio + [(True, u)]
    n = len(kinds)
    mask = np.zeros((n, n), bool)
    for i, (qb, qu) in enumerate(kinds):
        for j, (kb, ku) in enumerate(kinds):
            if not qb:
                mask[i, j] = (not kb) and j <= i
            else:
                mask[i, j] = (not kb and ku == qu) or (kb and j <= i)
    return np.array([b for b, _ in kinds]), mask


@pytest.mark.parametrize("chunk,ratio", [(8, 2), (12, 4), (8, 8), (6, 1)])
def test_chunk_mask_follows_the_rule(chunk, ratio):
    is_beacon, unit = bc.chunk_layout(chunk, ratio)
    expected_beacon, expected = rule_mask(chunk, ratio)
    np.testing.assert_array_equal(is_beacon, expected_beacon)
    np.testing.assert_array_equal(bc.chunk_mask(is_beacon, unit), expected)


def test_beacon_attention_matches_float64_softmax():
    rng = np.random.default_rng(0)
    chunk, ratio, b, heads, kv_heads, hd, past, count = 8, 2, 2, 4, 2, 8, 6, 4
    is_beacon, mask = rule_mask(chunk, ratio)
    n = len(is_beacon)
    q = rng.standard_normal((b, n, heads, hd))
    k, v = (rng.standard_normal((b, n, kv_heads, hd)) for _ in range(2))
    pk, pv = (rng.standard_normal((b, past, kv_heads, hd)) for _ in range(2))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    out = bc.beacon_attention(f32(q), f32(k), f32(v), f32(pk), f32(pv), jnp.int32(count),
                              jnp.asarray(mask))
    keys, values = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
    visible = np.concatenate([np.broadcast_to(np.arange(past) < count, (n, past)), mask], 1)
    expected = np.zeros_like(q)
    for h in range(heads):
        g = h // (heads // kv_heads)
        logits = np.einsum("bqd,bkd->bqk", q[:, :, h], keys[:, :, g]) / np.sqrt(hd)
        logits = np.where(visible, logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        expected[:, :, h] = np.einsum("bqk,bkd->bqd", w / w.sum(-1, keepdims=True), values[:, :, g])
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5)


@pytest.fixture(scope="module")
def tiny():
    config = model.preset("tiny")
    params = model.init(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, config.vocab_size)
    return config, params, tokens


def test_beacon_path_off_in_one_chunk_is_the_base_model(tiny):
    config, params, tokens = tiny
    beacon = bc.init_beacon(config, params)
    got = bc.beacon_logits(config, params, beacon, tokens, chunk=32, ratio=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.forward(config, params, tokens)),
                               atol=1e-5)


def test_beacon_path_off_forgets_past_chunks_and_restarts_positions(tiny):
    """Without beacons nothing of a past chunk is kept: the second chunk reads as if alone,
    from position 0 (positions are numbered within the window)."""
    config, params, tokens = tiny
    beacon = bc.init_beacon(config, params)
    got = bc.beacon_logits(config, params, beacon, tokens, chunk=16, ratio=None)
    alone = model.forward(config, params, tokens[:, 16:])
    np.testing.assert_allclose(np.asarray(got[:, 16:]), np.asarray(alone), atol=1e-5)


def test_second_chunk_reads_the_first_through_its_beacons_only(tiny):
    """Chunk 1 reaches chunk 2 only through its beacons: a change to one of its raw
    tokens moves chunk 2's logits (with ratio None it cannot, see above) and leaves the
    tokens before the change alone."""
    config, params, tokens = tiny
    beacon = bc.init_beacon(config, params)
    base = bc.beacon_logits(config, params, beacon, tokens, chunk=16, ratio=4)
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % config.vocab_size)
    other = bc.beacon_logits(config, params, beacon, changed, chunk=16, ratio=4)
    assert float(jnp.max(jnp.abs(base[:, 16:] - other[:, 16:]))) > 1e-4
    np.testing.assert_allclose(np.asarray(base[:, :3]), np.asarray(other[:, :3]), atol=1e-6)


def test_gradients_reach_only_the_beacon_module(tiny):
    config, params, tokens = tiny
    beacon = bc.init_beacon(config, params)
    grads = jax.grad(lambda p, b: bc.beacon_loss(config, p, b, tokens, chunk=16, ratio=4),
                     argnums=(0, 1))(params, beacon)
    base_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads[0]))
    assert base_norm == 0.0
    for path, g in jax.tree_util.tree_leaves_with_path(grads[1]):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.max(jnp.abs(g))) > 0, path


def test_bad_ratio_is_one_line():
    with pytest.raises(ValueError, match=r"ratio=3: must be a positive divisor of chunk=16"):
        bc.chunk_layout(16, 3)


def _perturbed(config, params):
    """A beacon module unlike the base weights, so using the wrong ones shows."""
    beacon = bc.init_beacon(config, params)
    keys = iter(jax.random.split(jax.random.key(7), 16))
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), beacon)


@pytest.mark.parametrize("prompt_len", [21, pytest.param(16, marks=pytest.mark.slow)])
def test_generation_through_beacons_equals_the_one_pass_forward(tiny, prompt_len, tmp_path):
    """Reading token by token, compressing each chunk as it fills (kv_cache="beacon:...",
    lctx.infer.beacon), gives the logits of the interleaved one-pass forward (the
    training path) at every step; the module comes from its file."""
    import flax.serialization

    from lctx.infer import generate

    config, params, tokens = tiny
    beacon = _perturbed(config, params)
    path = tmp_path / "beacon.msgpack"
    path.write_bytes(flax.serialization.to_bytes(beacon))
    prompt, new, chunk, ratio = np.asarray(tokens[0, :prompt_len]), 12, 8, 2
    out, logits = generate(config, params, [prompt], max_new_tokens=new, return_logits=True,
                           kv_cache=f"beacon:ratio={ratio},chunk={chunk},params={path}")
    seq = np.concatenate([prompt, out[0]])
    padded = np.pad(seq, (0, -len(seq) % chunk))  # later tokens never reach earlier ones
    ref = np.asarray(bc.beacon_logits(config, params, beacon, jnp.asarray(padded[None]),
                                      chunk=chunk, ratio=ratio)[0, prompt_len - 1:][:new])
    np.testing.assert_allclose(logits[0], ref, atol=1e-4)
    np.testing.assert_array_equal(out[0], np.argmax(ref, -1))


def test_per_chunk_ratios_equal_reading_each_chunk_at_its_ratio(tiny):
    """Training samples the ratio per chunk (`picks`, one lax.switch branch per ratio):
    the one-pass forward equals the inference path reading chunk 1 at ratio 2, chunk 2
    at ratio 8, chunk 3 at ratio 4 (read_raw, then compress, at each chunk's ratio)."""
    from lctx.infer import beacon as path

    config, params, tokens = tiny
    beacon = _perturbed(config, params)
    chunk, choices, picks = 8, (2, 4, 8), (0, 2, 1)
    ids = tokens[:1, :24]  # three chunks
    got = bc.beacon_logits(config, params, beacon, ids, chunk=chunk, ratio=choices,
                           picks=jnp.asarray(picks))
    state = path.BeaconState.create(config, tokens=24, chunk=chunk, ratio=2)  # the most slots
    expected = []
    for c, pick in enumerate(picks):
        ratio = choices[pick]
        hidden, state = path.read_raw(config, params, beacon, state,
                                      ids[:, c * chunk:(c + 1) * chunk], chunk=chunk, ratio=ratio)
        expected.append(model.logits_of(config, params, hidden))
        state = path.compress(config, params, beacon, state, chunk=chunk, ratio=ratio)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.concatenate(expected, 1)),
                               atol=1e-4)
    # one choice everywhere is that ratio's forward (the spare past slots stay masked)
    same = bc.beacon_logits(config, params, beacon, ids, chunk=chunk, ratio=choices,
                            picks=jnp.ones(3, jnp.int32))
    np.testing.assert_allclose(np.asarray(same), np.asarray(
        bc.beacon_logits(config, params, beacon, ids, chunk=chunk, ratio=4)), atol=1e-5)


def test_beacon_lm_loss_is_the_masked_mean_of_the_token_nll(tiny):
    """The training loss (targets and a loss mask, chunked cross-entropy) against the
    log-softmax of the full logits, in float64."""
    config, params, tokens = tiny
    beacon = _perturbed(config, params)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = (jax.random.uniform(jax.random.key(3), tokens.shape) > 0.3).astype(jnp.float32)
    loss, metrics = bc.beacon_lm_loss(config, params, beacon, tokens, targets, mask, chunk=16,
                                      ratio=(2, 4), picks=jnp.asarray([1, 0]))
    logits = np.asarray(bc.beacon_logits(config, params, beacon, tokens, chunk=16, ratio=(2, 4),
                                         picks=jnp.asarray([1, 0])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    np.testing.assert_allclose(float(loss), (nll * m).sum() / m.sum(), rtol=1e-5)
    assert float(metrics["tokens"]) == m.sum()


def test_perplexity_through_a_beacon_spec_scores_the_beacon_forward(tiny, tmp_path):
    """lctx.eval's perplexity with kv_cache="beacon:..." reads each window through the
    module (padded to whole chunks): one 40-token window of a 41-token document against
    exp of the mean beacon nll of that window."""
    import flax.serialization

    from lctx.data.tokenizer import ByteTokenizer, encode_document
    from lctx.eval.perplexity import perplexity_by_length
    from lctx.infer.kvcache import parse

    config, params, _ = tiny
    beacon = _perturbed(config, params)
    path = tmp_path / "beacon.msgpack"
    path.write_bytes(flax.serialization.to_bytes(beacon))
    text = "def f(x):\n    return x * 2  # doubled!!"
    tok = ByteTokenizer()
    ids = encode_document(tok, text)
    assert len(ids) == 41
    scorer = parse(f"beacon:ratio=4,chunk=16,params={path}").window_nll(config, params)
    got = perplexity_by_length(config, params, [{"text": text}], tok, lengths=(40,), stride=40,
                               max_tokens=40, batch_size=1, window_nll=scorer)["40"]
    nll = np.asarray(bc.beacon_nll(config, params, beacon, jnp.asarray(np.pad(ids, (0, 7))[None]),
                                   chunk=16, ratio=4), np.float64)[0, :40]
    assert got["tokens"] == 40
    np.testing.assert_allclose(got["ppl"], np.exp(nll.mean()), rtol=1e-5)
    full = perplexity_by_length(config, params, [{"text": text}], tok, lengths=(40,), stride=40,
                                max_tokens=40, batch_size=1)["40"]
    assert abs(full["ppl"] - got["ppl"]) > 1e-3  # the beacons change what the model reads


def test_beacon_cache_bytes_match_the_calculator(tiny):
    """The state a generation holds is what `python -m lctx.kvcache memory
    --kv_cache=beacon:...` predicts: past beacons plus one open chunk, per layer."""
    from lctx.infer.beacon import BeaconState
    from lctx.infer.kvcache import parse

    config = tiny[0]
    for tokens in (8, 40, 100):
        policy = parse("beacon:ratio=4,chunk=16")
        state = BeaconState.create(config, tokens=tokens, chunk=16, ratio=4)
        predicted = config.n_layers * policy.nbytes(1, config.n_kv_heads, config.head_dim,
                                                    tokens, 2048, 4)
        assert state.nbytes() == predicted
        # past beacons: 4 per full chunk (at least one slot), plus the 16-token chunk
        assert predicted == config.n_layers * 2 * config.n_kv_heads * config.head_dim * 4 * (
            max(1, tokens // 16 * 4) + 16)


@pytest.mark.parametrize("spec,message", [
    ("beacon:ratio=3,chunk=16", r"ratio=3: must be a positive divisor of chunk=16"),
    ("beacon:params=/no/such.msgpack", r"params='/no/such.msgpack': no such file"),
])
def test_bad_beacon_spec_is_one_line(spec, message):
    from lctx.infer.kvcache import parse

    with pytest.raises(ValueError, match=message):
        parse(spec)
