"""The evicting KV cache policies (sink_window, h2o, snapkv, knorm): which positions
survive a sequence of chunks against a float64 NumPy re-implementation of each rule,
kept keys at their original positions, generation equal to `full` when nothing needs
evicting, a sink+window cache that holds no middle position, predicted bytes, and
bad options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lctx.model as lm
from lctx.infer import generate
from lctx.infer.generate import decode_step, new_cache, pad_prompts, prefill_jit
from lctx.infer.kvcache import KVCache, parse

SMALL = ["sink_window:sinks=2,window=6", "h2o:budget=8,recent=3",
         "snapkv:budget=8,window=3,kernel=3", "knorm:budget=6"]
B, H, HKV, HD, C = 2, 4, 2, 8, 5
LENGTHS = (23, 12)  # prefill: 5 chunks of 5 (row 1 is padding from chunk 3 on), then decode
DECODE = 6


# ----- float64 NumPy reference: a (row, KV head) cache as {position: key state} -----

def probs(q, qpos, keys):
    """Softmax probabilities `[C', n]` of queries q `[C', hd]` at qpos over `keys`
    {pos: k}, causal by position (dense, float64)."""
    kpos = np.array(sorted(keys))
    k = np.stack([keys[p] for p in kpos])
    s = q @ k.T / np.sqrt(q.shape[-1])
    s = np.where(kpos[None] <= qpos[:, None], s, -np.inf)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return kpos, p / p.sum(axis=1, keepdims=True)


def newest(kept, n):
    return set(sorted(kept)[len(kept) - n:]) if n else set()


def attention_received(q, qpos, kept):
    """{pos: probability summed over the queries q `[C', g, hd]` (at qpos) and heads}."""
    score = dict.fromkeys(kept, 0.0)
    for head in range(q.shape[1]):
        order, p = probs(q[:, head], qpos, kept)
        for j, pos in enumerate(order):
            score[pos] += p[:, j].sum()
    return score


def reference_step(spec, kept, acc, q, k, qpos):
    """One attend + evict of the reference for one (row, KV head): kept {pos: k},
    acc {pos: float} (h2o); the chunk's real tokens: queries q `[C', g, hd]` (the
    group's heads), keys k `[C', hd]`, positions qpos `[C']`. Returns (kept, acc)."""
    policy = parse(spec)
    kept = {**kept, **{int(p): k[i] for i, p in enumerate(qpos)}}
    acc = {**acc, **{int(p): 0.0 for p in qpos}}
    if policy.name == "h2o" and len(qpos):
        score = attention_received(q, qpos, kept)
        acc = {p: acc[p] + score[p] for p in kept}
    if len(kept) <= policy.budget:
        return kept, acc
    if policy.name == "sink_window":  # rank: newest first, the sinks above everyone
        always = set(sorted(kept)[:policy.sinks]) | newest(kept, policy.window)
        rank = dict.fromkeys(kept, 0.0)
    elif policy.name == "h2o":
        always, rank = newest(kept, policy.recent), acc
    elif policy.name == "snapkv":  # the chunk's last `window` queries, max-pooled in position order
        last = np.argsort(qpos)[-policy.window:]
        score = attention_received(q[last], qpos[last], kept)
        order, half = sorted(kept), policy.kernel // 2
        rank = {p: max(score[o] for o in order[max(0, i - half):i + half + 1])
                for i, p in enumerate(order)}
        always = newest(kept, policy.window)
    else:  # knorm
        always, rank = newest(kept, 1), {p: -np.linalg.norm(kept[p]) for p in kept}
    rest = sorted(set(kept) - always, key=lambda p: (-rank[p], p))  # ties: older first
    keep = always | set(rest[:policy.budget - len(always)])
    return {p: kept[p] for p in keep}, {p: acc[p] for p in keep}


def chunks():
    """(q `[B, c, H, hd]`, k, v `[B, c, Hkv, hd]`, positions, valid `[B, c]`) for the
    prefill chunks, then the decode steps, from one seed."""
    rng = np.random.default_rng(0)
    padded = -(-max(LENGTHS) // C) * C
    lengths = np.array(LENGTHS)
    steps = [(np.arange(s, s + C)[None].repeat(B, 0), None) for s in range(0, padded, C)]
    steps += [((lengths + t)[:, None], True) for t in range(DECODE)]
    for positions, decode in steps:
        c = positions.shape[1]
        valid = np.ones((B, c), bool) if decode else positions < lengths[:, None]
        q = rng.normal(size=(B, c, H, HD)).astype(np.float32)
        k, v = (rng.normal(size=(B, c, HKV, HD)).astype(np.float32) for _ in range(2))
        yield q, k, v, positions.astype(np.int32), valid


@jax.jit
def attend(cache, q, k, v, positions, valid):
    return cache.attend(q, k, v, positions, valid)[1]


@pytest.mark.parametrize("spec", SMALL)
def test_eviction_matches_a_float64_numpy_reference(spec):
    """After every prefill chunk and decode step, each (row, KV head) holds exactly the
    positions the reference keeps, at their original positions with their own keys and
    values, in position order at slots [0, filled); h2o's running sums agree too."""
    policy = parse(spec)
    tokens = -(-max(LENGTHS) // C) * C + DECODE
    cache = KVCache.create(policy, layers=1, batch=B, kv_heads=HKV, head_dim=HD, tokens=tokens,
                           chunk=C, dtype=jnp.float32)
    cache = KVCache(policy, jax.tree.map(lambda a: a[0], cache.data))
    assert cache.slots == policy.budget + C < tokens  # evicts from the first chunk on
    ref = {(r, h): ({}, {}) for r in range(B) for h in range(HKV)}
    written = {}  # (row, head, pos) -> (k, v)
    group = H // HKV
    for q, k, v, positions, valid in chunks():
        cache = attend(cache, *map(jnp.asarray, (q, k, v, positions, valid)))
        data = {name: np.asarray(a) for name, a in cache.data.items()}
        for (r, h), (kept, acc) in ref.items():
            real = valid[r]
            for i in np.flatnonzero(real):
                written[r, h, positions[r, i]] = k[r, i, h], v[r, i, h]
            qh = q[r][real][:, h * group:(h + 1) * group]
            ref[r, h] = kept, acc = reference_step(spec, kept, acc, qh.astype(np.float64),
                                                   k[r, real, h], positions[r][real])
            filled, pos = data["filled"][r, h], data["pos"][r, h]
            assert filled <= policy.budget
            assert np.all(pos[filled:] == -1) and np.all(np.diff(pos[:filled]) > 0)
            assert set(pos[:filled].tolist()) == set(kept), (r, h, positions[r])
            for slot in range(filled):
                want_k, want_v = written[r, h, pos[slot]]
                np.testing.assert_array_equal(data["k"][r, h, slot], want_k)
                np.testing.assert_array_equal(data["v"][r, h, slot], want_v)
            if "acc" in data:
                np.testing.assert_allclose(data["acc"][r, h, :filled],
                                           [acc[p] for p in pos[:filled]], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    config = lm.preset("tiny")
    return config, lm.init(config, jax.random.key(0))


PROMPT_LENGTHS = (37, 20, 5)  # padded to 48 with 16-token chunks; + 8 new tokens = 56


def prompts(config):
    rng = np.random.default_rng(1)
    return [rng.integers(0, config.vocab_size, n) for n in PROMPT_LENGTHS]


def test_a_budget_for_every_token_generates_what_full_does(tiny):
    """Budget = all 56 tokens (the padded prompt and the new ones): nothing is evicted,
    so tokens and logits are those of `full`, exactly."""
    config, params = tiny
    run = lambda spec: generate(config, params, prompts(config), max_new_tokens=8,
                                kv_cache=spec, chunk=16, return_logits=True)
    want_tokens, want_logits = run("full")
    for spec in ("sink_window:sinks=4,window=52", "h2o:budget=56,recent=8",
                 "snapkv:budget=56,window=8,kernel=3", "knorm:budget=56"):
        tokens, logits = run(spec)
        np.testing.assert_array_equal(tokens, want_tokens, err_msg=spec)
        np.testing.assert_array_equal(logits, want_logits, err_msg=spec)


step_jit = jax.jit(decode_step, static_argnums=(0,), static_argnames=("rope_seq_len",))


@pytest.mark.parametrize("spec", ["sink_window:sinks=4,window=12", "h2o:budget=16,recent=4",
                                  "snapkv:budget=16,window=4,kernel=3", "knorm:budget=16"])
def test_generation_under_a_small_budget(tiny, spec):
    """Prefill and 8 greedy decode steps with eviction (the same tokens as `generate`):
    after each, every layer, row and KV head holds at most `budget` real slots, in
    position order, the newest token among them; sink_window holds exactly the 4 first
    and the 12 latest positions, so no query ever attended to a middle position."""
    config, params = tiny
    policy, new = parse(spec), 8
    tokens, lengths = pad_prompts(prompts(config), 0, 16)
    cache = new_cache(config, policy, batch=3, tokens=tokens.shape[1] + new, chunk=16)
    rope = max(PROMPT_LENGTHS) + new
    logits, cache = prefill_jit(config, params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                chunk=16, rope_seq_len=rope)
    out = []
    for step in range(new + 1):
        seen = lengths + step  # tokens each row has written
        pos, filled = np.asarray(cache.data["pos"]), np.asarray(cache.data["filled"])
        for layer, row, head in np.ndindex(*filled.shape):
            n, held = filled[layer, row, head], pos[layer, row, head]
            assert n <= policy.budget and np.all(held[n:] == -1)
            assert np.all(np.diff(held[:n]) > 0) and held[n - 1] == seen[row] - 1
            if policy.name == "sink_window":
                want = np.arange(seen[row])
                if seen[row] > 16:
                    want = np.concatenate([want[:4], want[-12:]])
                np.testing.assert_array_equal(held[:n], want)
        if step == new:
            break
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out.append(np.asarray(token))
        logits, cache = step_jit(config, params, cache, token, jnp.asarray(seen, jnp.int32),
                                 rope_seq_len=rope)
    np.testing.assert_array_equal(np.stack(out, 1), generate(
        config, params, prompts(config), max_new_tokens=new, kv_cache=spec, chunk=16))


@pytest.mark.parametrize("spec", SMALL)
@pytest.mark.parametrize("tokens", [100, 7])  # evicting, and fewer tokens than budget + chunk
def test_nbytes_is_what_the_policy_predicts(spec, tokens):
    policy = parse(spec)
    cache = KVCache.create(policy, layers=3, batch=2, kv_heads=2, head_dim=8, tokens=tokens,
                           chunk=4, dtype=jnp.bfloat16)
    assert cache.slots == min(tokens, policy.budget + 4)
    assert cache.nbytes() == 3 * policy.nbytes(2, 2, 8, tokens, 4, 2)


@pytest.mark.parametrize("spec, message", [
    ("sink_window:sinks=-1", "sinks=-1: must be >= 0"),
    ("sink_window:window=0", "window=0: must be >= 1"),
    ("sink_window:budget=8", "'budget=8' is not key=value with a key of 'sink_window'"),
    ("h2o:budget=4,recent=4", "budget=4: must be above recent=4"),
    ("h2o:recent=-2", "recent=-2: must be >= 0"),
    ("h2o:budget=0,recent=0", "budget=0: must be >= 1"),
    ("snapkv:window=0", "window=0: must be >= 1"),
    ("snapkv:budget=32,window=32", "budget=32: must be above window=32"),
    ("snapkv:kernel=4", "kernel=4: must be odd and >= 1"),
    ("snapkv:kernel=0", "kernel=0: must be odd and >= 1"),
    ("knorm:budget=0", "budget=0: must be >= 1"),
    ("knorm:budget=-3", "budget=-3: must be >= 1"),
    ("knorm:budget=lots", "budget='lots' is not an integer"),
])
def test_bad_options_raise_naming_key_and_value(spec, message):
    with pytest.raises(ValueError) as error:
        parse(spec)
    assert message in str(error.value) and "\n" not in str(error.value)
