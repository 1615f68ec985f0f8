"""The KV cache the model owns: cache attention against float64 NumPy, decode through
the cache against the full forward, chunked prefill against one-shot prefill, and
prefill memory that follows the chunk rather than the prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx.model as lm
from lctx.infer import generate
from lctx.infer.generate import new_cache, pad_prompts, prefill, prefill_jit
from lctx.infer.kvcache import parse
from lctx.kernels.cache_attention import cache_attention


def numpy_cache_attention(q, q_pos, k, v, k_pos, window, weights):
    """float64 dense reference: q [b,C,H,hd], k/v [b,Hkv,T,hd], k_pos [b,Hkv,T]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, c, heads, hd = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = np.zeros_like(q)
    scores = np.zeros(k.shape[:3])
    for row in range(b):
        for h in range(heads):
            kh = h // group
            s = q[row, :, h] @ k[row, kh].T / np.sqrt(hd)  # [C, T]
            qp, kp = q_pos[row][:, None], k_pos[row, kh][None, :]
            seen = (kp >= 0) & (kp <= qp)
            if window is not None:
                seen &= kp > qp - window
            s = np.where(seen, s, -np.inf)
            top = np.max(s, axis=1, keepdims=True)
            p = np.where(seen, np.exp(s - np.where(np.isfinite(top), top, 0)), 0)
            total = p.sum(axis=1, keepdims=True)
            p = p / np.where(total > 0, total, 1)
            out[row, :, h] = p @ v[row, kh]
            scores[row, kh] += (p * weights[row][:, None]).sum(axis=0)
    return out, scores


@pytest.mark.parametrize("window", [None, 5])
def test_cache_attention_matches_float64_numpy(window):
    rng = np.random.default_rng(0)
    b, c, heads, kv_heads, t, hd = 2, 7, 6, 2, 37, 16
    q = rng.normal(size=(b, c, heads, hd)).astype(np.float32)
    k = rng.normal(size=(b, kv_heads, t, hd)).astype(np.float32)
    v = rng.normal(size=(b, kv_heads, t, hd)).astype(np.float32)
    # Slots in any order with gaps and empties, as eviction leaves them.
    k_pos = np.stack([np.stack([rng.permutation(60)[:t] for _ in range(kv_heads)])
                      for _ in range(b)]).astype(np.int32)
    k_pos[:, :, -6:] = -1
    q_pos = np.sort(rng.choice(60, size=(b, c), replace=False), axis=1).astype(np.int32)
    q_pos[0, 0] = -5  # a query that sees nothing gets zeros
    weights = rng.uniform(size=(b, c)).astype(np.float32)
    out, scores = cache_attention(jnp.asarray(q), jnp.asarray(q_pos), jnp.asarray(k),
                                  jnp.asarray(v), jnp.asarray(k_pos), sliding_window=window,
                                  score_weights=jnp.asarray(weights), block=8,
                                  block_q=3)
    want_out, want_scores = numpy_cache_attention(q, q_pos, k, v, k_pos, window, weights)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-6)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=2e-6)
    assert np.all(np.asarray(out)[0, 0] == 0)


@pytest.fixture(scope="module")
def tiny():
    config = lm.preset("tiny")
    return config, lm.init(config, jax.random.key(0))


def test_full_cache_decode_equals_the_full_forward(tiny):
    """Greedy tokens and every step's logits, prompts of different lengths in one batch."""
    config, params = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, n) for n in (37, 20, 5)]
    new = 6
    tokens, logits = generate(config, params, prompts, max_new_tokens=new, chunk=16,
                              return_logits=True)
    for row, prompt in enumerate(prompts):
        seq = np.concatenate([prompt, tokens[row]])
        full = np.asarray(lm.forward(config, params, jnp.asarray(seq[None])))[0]
        want = full[len(prompt) - 1:len(prompt) - 1 + new]
        np.testing.assert_allclose(logits[row], want, atol=2e-5)
        np.testing.assert_array_equal(tokens[row], want.argmax(-1))


def test_chunked_prefill_equals_one_shot(tiny):
    config, params = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, config.vocab_size, n) for n in (64, 41)]
    tokens, lengths = pad_prompts(prompts, 0, 16)

    def run(chunk):
        cache = new_cache(config, "full", batch=2, tokens=tokens.shape[1], chunk=chunk)
        return prefill(config, params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                       chunk=chunk, rope_seq_len=64)

    one_logits, one_cache = run(64)
    for chunk in (16, 32):
        logits, cache = run(chunk)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(one_logits), atol=2e-5)
        for name in ("k", "v", "pos", "filled"):
            np.testing.assert_allclose(np.asarray(cache.data[name]),
                                       np.asarray(one_cache.data[name]), atol=2e-5)
    # Padding is written with position -1: the 41-token row's slots 41.. are never seen.
    pos = np.asarray(one_cache.data["pos"])[:, 1, 0]
    assert np.all(pos[:, :41] == np.arange(41)) and np.all(pos[:, 41:] == -1)


def _prefill_temp_bytes(config, seq: int, chunk: int) -> tuple[int, int]:
    """(compiled temporary bytes, cache bytes) of prefill_jit at `seq` tokens."""
    params = jax.eval_shape(lambda: lm.init(config, jax.random.key(0)))
    cache = jax.eval_shape(lambda: new_cache(config, "full", batch=1, tokens=seq, chunk=chunk))
    tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    compiled = prefill_jit.lower(config, params, tokens, lengths, cache, chunk=chunk,
                                 rope_seq_len=seq).compile()
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return compiled.memory_analysis().temp_size_in_bytes, cache_bytes


def test_chunked_prefill_memory_follows_the_chunk_not_the_prompt():
    """On `small`, 4K -> 64K tokens (16x) with 2048-token chunks, the compiled temporaries
    (everything but the donated cache and the weights) grow by at most about one layer's
    slice of the cache (the layer being read), where a one-shot prefill's activations
    grow 16x."""
    config = lm.preset("small")
    temp, cache = {}, {}
    for seq in (4096, 16384, 65536):
        temp[seq], cache[seq] = _prefill_temp_bytes(config, seq, 2048)
    layer_share = (cache[65536] - cache[4096]) / config.n_layers
    assert temp[65536] - temp[4096] < 1.5 * layer_share, (temp, cache)
    assert temp[16384] - temp[4096] < 1.5 * (cache[16384] - cache[4096]) / config.n_layers


def test_unknown_policy_and_bad_options_are_one_line():
    with pytest.raises(ValueError, match=r"kv_cache='fulll': unknown policy 'fulll' \(did you mean full"):
        parse("fulll")
    with pytest.raises(ValueError, match=r"kv_cache='full:budget=3'.*allowed keys: none"):
        parse("full:budget=3")


def test_a_prompt_longer_than_the_cache_is_refused(tiny):
    from lctx.infer.generate import check_capacity

    config, _ = tiny
    cache = new_cache(config, "full", batch=1, tokens=32, chunk=16)
    with pytest.raises(ValueError, match=r"kv_cache='full': 40 tokens .* do not fit its 32 slots"):
        check_capacity(cache, 40, 16)
