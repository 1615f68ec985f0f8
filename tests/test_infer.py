"""KV-cache decoding against full recomputation with the dense reference attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx.model as lm
from lctx.infer import generate

NEW = 5


def _model(rope_scaling=None, **overrides):
    config = lm.preset("tiny", rope_scaling=rope_scaling, max_position_embeddings=32,
                       attention_impl="blockwise",
                       attention_options={"block_q": 16, "block_k": 16}, **overrides)
    return config, lm.init(config, jax.random.key(3))


def _full_logits(config, params, prompt, continuation, rope_seq_len):
    """Logits that predicted each continuation token, by recomputing the whole sequence."""
    seq = np.concatenate([prompt, continuation])[None, :-1]
    dense = config.replace(attention_impl="reference", attention_options={})
    logits = lm.forward(dense, params, jnp.asarray(seq), rope_seq_len=rope_seq_len)[0]
    return np.asarray(logits[len(prompt) - 1:])


PROMPTS = [np.random.default_rng(0).integers(0, 256, n) for n in (40, 27)]  # padded to 48


@pytest.mark.parametrize("scaling", [
    None,
    pytest.param({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                 marks=pytest.mark.slow),
    {"rope_type": "dynamic", "factor": 2.0},  # frequencies depend on the length (40 + 5 > 32)
], ids=["default", "yarn", "dynamic"])
def test_greedy_cache_equals_full_recomputation(scaling):
    config, params = _model(scaling)
    tokens, logits = generate(config, params, PROMPTS, max_new_tokens=NEW, return_logits=True)
    assert tokens.shape == (2, NEW) and logits.shape == (2, NEW, config.vocab_size)
    rope_seq_len = max(map(len, PROMPTS)) + NEW  # fixed for the whole generation
    for row, prompt in enumerate(PROMPTS):
        full = _full_logits(config, params, prompt, tokens[row], rope_seq_len)
        np.testing.assert_allclose(logits[row], full, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(tokens[row], full.argmax(-1))
    if scaling and scaling["rope_type"] == "dynamic":
        # The test can tell: the model's default (the recomputed length) rotates differently.
        stale = _full_logits(config, params, PROMPTS[0], tokens[0], len(PROMPTS[0]) + NEW - 1)
        assert np.abs(stale - logits[0]).max() > 1e-3


def test_sliding_window_cache():
    config, params = _model(sliding_window=8)
    tokens, logits = generate(config, params, PROMPTS[:1], max_new_tokens=NEW, return_logits=True)
    full = _full_logits(config, params, PROMPTS[0], tokens[0], None)
    np.testing.assert_allclose(logits[0], full, atol=2e-5, rtol=1e-5)


def test_sampling_follows_the_model():
    config, params = _model()
    a, logits = generate(config, params, PROMPTS, max_new_tokens=NEW, temperature=1.0,
                         rng=jax.random.key(1), return_logits=True)
    b = generate(config, params, PROMPTS, max_new_tokens=NEW, temperature=1.0,
                 rng=jax.random.key(2))
    assert not np.array_equal(a, b)  # different keys, different samples (random weights)
    for row, prompt in enumerate(PROMPTS):  # each sampled prefix is scored as the model would
        np.testing.assert_allclose(logits[row], _full_logits(config, params, prompt, a[row], None),
                                   atol=2e-5, rtol=1e-5)
    cold = generate(config, params, PROMPTS, max_new_tokens=NEW, temperature=1e-6,
                    rng=jax.random.key(1))
    np.testing.assert_array_equal(cold, generate(config, params, PROMPTS, max_new_tokens=NEW))


def test_bad_arguments():
    config, params = _model()
    for kwargs, match in (({"max_new_tokens": 0}, "max_new_tokens=0"),
                          ({"max_new_tokens": 2, "temperature": -1.0}, "temperature=-1.0")):
        with pytest.raises(ValueError, match=match):
            generate(config, params, PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="prompts"):
        generate(config, params, [], max_new_tokens=2)
