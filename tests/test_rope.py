"""RoPE and its scaling family: formulas, transformers parity, precision, HF config round trip.

Expected values come from float64 NumPy written here from the papers' formulas, never
from lctx.model.rope's own helpers: RoPE (RoFormer, arXiv:2104.09864), linear position
interpolation (PI, arXiv:2306.15595), NTK-aware, dynamic NTK and YaRN's ramp and
attention temperature (YaRN, arXiv:2309.00071), LongRoPE's per-pair factors
(arXiv:2402.13753), and Llama 3.1's wavelength bands (the formula of transformers'
`_compute_llama3_parameters`).
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lctx.model.rope import RopeConfig, apply_rope, inverse_frequencies, rope_cos_sin

# --- independent float64 formulas --------------------------------------------------


def theta(b: float, d: int) -> np.ndarray:
    return np.array([b ** (-2.0 * i / d) for i in range(d // 2)])


def yarn_expected(
    b,
    d,
    s,
    L,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=True,
    attention_factor=None,
    mscale=None,
    mscale_all_dim=None,
):
    def c(r):
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))

    low, high = c(beta_fast), c(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if high == low:
        high += 0.001
    ramp = np.array([min(max((i - low) / (high - low), 0.0), 1.0) for i in range(d // 2)])
    th = theta(b, d)

    def m(scale, mu=1.0):
        return 1.0 if scale <= 1 else 0.1 * mu * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = (
            m(s, mscale) / m(s, mscale_all_dim) if mscale and mscale_all_dim else m(s)
        )
    return th / s * ramp + th * (1 - ramp), attention_factor


def llama3_expected(b, d, s, L, low, high):
    out = []
    for t in theta(b, d):
        wavelen = 2 * math.pi / t
        if wavelen < L / high:
            out.append(t)
        elif wavelen > L / low:
            out.append(t / s)
        else:
            g = (L / wavelen - low) / (high - low)
            out.append((1 - g) * t / s + g * t)
    return np.array(out), 1.0


def dynamic_expected(b, d, s, L, seq_len):
    n = max(seq_len, L)
    return theta(b * (s * n / L - (s - 1)) ** (d / (d - 2)), d), 1.0


SHORT = [1.0 + 0.05 * i for i in range(32)]
LONG = [1.5 + 0.5 * i for i in range(32)]

# (id, RopeConfig kwargs, head_dim, seq_len, expected (inv_freq, attention_factor))
CASES = [
    ("default", dict(rope_theta=5e5), 128, None, (theta(5e5, 128), 1.0)),
    ("linear", dict(rope_type="linear", factor=4.0), 64, None, (theta(1e4, 64) / 4, 1.0)),
    (
        "linear_partial",
        dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.5),
        128,
        None,
        (theta(1e4, 64) / 2, 1.0),
    ),
    (
        "ntk",
        dict(rope_type="ntk", factor=8.0),
        128,
        None,
        (theta(1e4 * 8 ** (128 / 126), 128), 1.0),
    ),
    (
        "dynamic_below_L",
        dict(rope_type="dynamic", factor=4.0, max_position_embeddings=4096),
        128,
        1000,
        (theta(1e4, 128), 1.0),
    ),
    (
        "dynamic_at_3L",
        dict(rope_type="dynamic", factor=4.0, max_position_embeddings=4096),
        128,
        3 * 4096,
        dynamic_expected(1e4, 128, 4.0, 4096, 3 * 4096),
    ),
    (
        "yarn",
        dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096),
        128,
        None,
        yarn_expected(1e4, 128, 16.0, 4096),
    ),
    (
        "yarn_no_truncate_betas",
        dict(
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=2048,
            beta_fast=16.0,
            beta_slow=2.0,
            truncate=False,
        ),
        64,
        None,
        yarn_expected(1e4, 64, 4.0, 2048, 16.0, 2.0, truncate=False),
    ),
    (
        "yarn_mscale",
        dict(
            rope_type="yarn",
            rope_theta=1e4,
            factor=40.0,
            original_max_position_embeddings=4096,
            mscale=0.707,
            mscale_all_dim=1.0,
        ),
        64,
        None,
        yarn_expected(1e4, 64, 40.0, 4096, mscale=0.707, mscale_all_dim=1.0),
    ),
    (
        "yarn_attention_factor",
        dict(
            rope_type="yarn",
            factor=8.0,
            original_max_position_embeddings=4096,
            attention_factor=1.5,
        ),
        64,
        None,
        yarn_expected(1e4, 64, 8.0, 4096, attention_factor=1.5),
    ),
    (
        "yarn_fallback_L",
        dict(rope_type="yarn", factor=8.0, max_position_embeddings=8192),
        64,
        None,
        yarn_expected(1e4, 64, 8.0, 8192),
    ),
    (
        "llama3",
        dict(
            rope_type="llama3",
            rope_theta=5e5,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        128,
        None,
        llama3_expected(5e5, 128, 8.0, 8192, 1.0, 4.0),
    ),
    (
        "longrope_short",
        dict(
            rope_type="longrope",
            factor=32.0,
            short_factor=SHORT,
            long_factor=LONG,
            original_max_position_embeddings=4096,
        ),
        64,
        4096,
        (theta(1e4, 64) / np.array(SHORT), math.sqrt(1 + math.log(32.0) / math.log(4096))),
    ),
    (
        "longrope_long",
        dict(
            rope_type="longrope",
            factor=32.0,
            short_factor=SHORT,
            long_factor=LONG,
            original_max_position_embeddings=4096,
        ),
        64,
        4097,
        (theta(1e4, 64) / np.array(LONG), math.sqrt(1 + math.log(32.0) / math.log(4096))),
    ),
    (
        "longrope_no_factor",
        dict(
            rope_type="longrope",
            short_factor=SHORT,
            long_factor=LONG,
            original_max_position_embeddings=4096,
        ),
        64,
        None,
        (theta(1e4, 64) / np.array(SHORT), 1.0),
    ),
]


@pytest.mark.parametrize(
    "kwargs,head_dim,seq_len,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_inverse_frequencies_match_formulas(kwargs, head_dim, seq_len, expected):
    inv_freq, attention_factor = inverse_frequencies(RopeConfig(**kwargs), head_dim, seq_len)
    np.testing.assert_allclose(inv_freq, expected[0], rtol=1e-12)
    assert attention_factor == pytest.approx(expected[1], rel=1e-12)


def test_yarn_case_exercises_all_three_regions():
    """Guard the test data: the ramp has kept, interpolated and blended frequencies."""
    th = theta(1e4, 128)
    inv_freq, _ = inverse_frequencies(
        RopeConfig(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096), 128
    )
    ratio = th / inv_freq
    assert ratio[0] == 1.0 and ratio[-1] == pytest.approx(16.0)
    assert np.any((ratio > 1.01) & (ratio < 15.9))


# --- parity with transformers -------------------------------------------------------


def hf_rope_init(
    rope_kwargs: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None
):
    """transformers' own (inv_freq, attention_factor) for old-style settings, 4.x or 5.x."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed: parity with HF skipped"
    )
    pytest.importorskip("torch", reason="torch not installed: transformers' RoPE code needs it")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_kwargs)
    extra = {k: rope.pop(k) for k in ("rope_theta", "partial_rotary_factor") if k in rope}
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_scaling=rope or None,
        **extra,
    )
    rope_type = rope.get("rope_type", "default")
    if rope_type in ROPE_INIT_FUNCTIONS:
        fn = ROPE_INIT_FUNCTIONS[rope_type]
    else:  # transformers >= 5 moved `default` onto each model's rotary class
        llama = transformers.models.llama.modeling_llama
        fn = llama.LlamaRotaryEmbedding.compute_default_rope_parameters
    inv_freq, attention_factor = fn(config, "cpu", seq_len=seq_len)
    return inv_freq.double().numpy(), float(attention_factor)


# (id, HF rope_scaling (+ rope_theta, partial_rotary_factor), head_dim, max_position_embeddings,
#  seq_len)
HF_CASES = [
    ("default", dict(rope_theta=5e5), 128, 8192, None),
    ("linear", dict(rope_type="linear", factor=4.0), 64, 4096, None),
    (
        "linear_partial",
        dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.5),
        128,
        4096,
        None,
    ),
    ("dynamic_below", dict(rope_type="dynamic", factor=4.0), 128, 4096, 1000),
    ("dynamic_above", dict(rope_type="dynamic", factor=4.0), 128, 4096, 3 * 4096),
    # max_position_embeddings = factor * L: transformers versions disagree on what else to use.
    (
        "yarn",
        dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096),
        128,
        16 * 4096,
        None,
    ),
    (
        "yarn_betas",
        dict(
            rope_type="yarn",
            factor=4.0,
            original_max_position_embeddings=2048,
            beta_fast=16.0,
            beta_slow=2.0,
        ),
        64,
        4 * 2048,
        None,
    ),
    (
        "yarn_mscale",
        dict(
            rope_type="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            mscale=0.707,
            mscale_all_dim=1.0,
        ),
        64,
        40 * 4096,
        None,
    ),
    (
        "llama3",
        dict(
            rope_theta=5e5,
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        128,
        131072,
        None,
    ),
    (
        "longrope_short",
        dict(
            rope_type="longrope",
            factor=32.0,
            short_factor=SHORT,
            long_factor=LONG,
            original_max_position_embeddings=4096,
        ),
        64,
        131072,
        4096,
    ),
    (
        "longrope_long",
        dict(
            rope_type="longrope",
            factor=32.0,
            short_factor=SHORT,
            long_factor=LONG,
            original_max_position_embeddings=4096,
        ),
        64,
        131072,
        5000,
    ),
]


@pytest.mark.parametrize(
    "rope,head_dim,max_pos,seq_len", [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES]
)
def test_inverse_frequencies_match_transformers(rope, head_dim, max_pos, seq_len):
    expected, expected_attention = hf_rope_init(rope, head_dim, max_pos, seq_len)
    hf_json = {
        "max_position_embeddings": max_pos,
        "rope_scaling": {
            k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")
        },
    }
    hf_json.update({k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope})
    inv_freq, attention_factor = inverse_frequencies(RopeConfig.from_hf(hf_json), head_dim, seq_len)
    # transformers computes in float32; lctx in float64.
    np.testing.assert_allclose(inv_freq, expected, rtol=2e-6)
    assert attention_factor == pytest.approx(expected_attention, rel=1e-6)


@pytest.mark.parametrize(
    "rope",
    [dict(rope_theta=1e4), dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)],
    ids=["default", "yarn"],
)
def test_apply_rope_matches_transformers_rotary(rope):
    """Equals LlamaRotaryEmbedding + apply_rotary_pos_emb: rotate-half pairs, cos/sin scaling."""
    pytest.importorskip("transformers", reason="transformers not installed: parity with HF skipped")
    torch = pytest.importorskip(
        "torch", reason="torch not installed: transformers' RoPE code needs it"
    )
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, max_pos = 32, 256
    extra = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_scaling=scaling,
        **extra,
    )
    x = np.random.default_rng(0).standard_normal((2, 100, 2, head_dim)).astype(np.float32)
    positions = (
        np.random.default_rng(1)
        .permutation(200)[:100]
        .reshape(1, 100)
        .repeat(2, 0)
        .astype(np.int32)
    )

    xt = torch.from_numpy(x).transpose(1, 2)  # HF layout [batch, heads, seq, head_dim]
    cos, sin = LlamaRotaryEmbedding(config)(xt, torch.from_numpy(positions).long())
    expected, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), RopeConfig.from_hf(config.to_dict()))
    np.testing.assert_allclose(np.asarray(got), expected.transpose(1, 2).numpy(), atol=2e-5)


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(rope_type="rope2"),
            r"rope_type='rope2': must be one of default, dynamic, linear, llama3, longrope, "
            r"ntk, yarn",
        ),
        (dict(rope_type="linear", factor=0.5), r"factor=0.5: must be >= 1"),
        (dict(rope_theta=0.0), r"rope_theta=0.0: must be > 0"),
        (dict(partial_rotary_factor=1.5), r"partial_rotary_factor=1.5: must be in \(0, 1\]"),
        (
            dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
            r"original_max_position_embeddings=None: required for rope_type 'llama3'",
        ),
        (
            dict(
                rope_type="llama3",
                factor=8.0,
                original_max_position_embeddings=8192,
                low_freq_factor=4.0,
                high_freq_factor=1.0,
            ),
            r"high_freq_factor=1.0: must be > low_freq_factor=4.0",
        ),
        (
            dict(rope_type="dynamic", factor=2.0),
            r"max_position_embeddings=None: rope_type 'dynamic' needs",
        ),
        (
            dict(rope_type="yarn", factor=2.0),
            r"original_max_position_embeddings=None: rope_type 'yarn' needs it",
        ),
        (
            dict(
                rope_type="yarn",
                factor=2.0,
                max_position_embeddings=64,
                beta_fast=1.0,
                beta_slow=2.0,
            ),
            r"beta_fast=1.0: must be >= beta_slow=2.0",
        ),
        (
            dict(rope_type="longrope", original_max_position_embeddings=64, short_factor=[1.0]),
            r"long_factor=None: required for rope_type 'longrope'",
        ),
        (
            dict(rope_type="yarn", factor=2.0, max_position_embeddings=64, attention_factor=-1.0),
            r"attention_factor=-1.0: must be > 0",
        ),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kwargs)


def test_config_errors_reported_together():
    with pytest.raises(ValueError, match=r"(?s)factor=0.5.*partial_rotary_factor=2.0"):
        RopeConfig(factor=0.5, partial_rotary_factor=2.0)


def test_head_dim_errors():
    with pytest.raises(ValueError, match=r"head_dim=63 .*rotary dim 63.*must be even"):
        inverse_frequencies(RopeConfig(), 63)
    cfg = RopeConfig(
        rope_type="longrope",
        original_max_position_embeddings=64,
        short_factor=SHORT,
        long_factor=LONG,
    )
    with pytest.raises(
        ValueError, match=r"short_factor has length 32: must have rotary_dim/2 = 16 entries"
    ):
        inverse_frequencies(cfg, 32)
    with pytest.raises(
        ValueError, match=r"short_factor has length 32: must have rotary_dim/2 = 16 entries"
    ):
        apply_rope(jnp.zeros((1, 4, 1, 32)), jnp.zeros((1, 4), jnp.int32), cfg)


# --- applying RoPE ---------------------------------------------------------------------


def rotate_half_f64(
    x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float = 1.0
):
    """HF LLaMA's rotation in float64: pairs (i, i + k), k = len(inv_freq); the rest pass."""
    k = len(inv_freq)
    ang = positions[..., None, None].astype(np.float64) * inv_freq  # [b, s, 1, k]
    c, s = attention_factor * np.cos(ang), attention_factor * np.sin(ang)
    x1, x2, rest = x[..., :k], x[..., k : 2 * k], x[..., 2 * k :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)


def test_apply_rope_small_positions():
    cfg = RopeConfig(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, partial_rotary_factor=0.5
    )
    x = np.random.default_rng(0).standard_normal((2, 16, 3, 32)).astype(np.float32)
    positions = np.random.default_rng(1).integers(0, 512, (2, 16)).astype(np.int32)
    inv_freq, att = yarn_expected(1e4, 16, 4.0, 64)
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), cfg)
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(
        np.asarray(got),
        rotate_half_f64(x.astype(np.float64), positions, inv_freq, att),
        rtol=0,
        atol=3e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(got)[..., 16:], x[..., 16:]
    )  # partial rotary: untouched


def test_apply_rope_keeps_dtype_bf16():
    x = jnp.ones((1, 8, 2, 16), jnp.bfloat16)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    got = apply_rope(x, positions, RopeConfig())
    assert got.dtype == jnp.bfloat16
    expected = rotate_half_f64(np.ones((1, 8, 2, 16)), np.arange(8)[None], theta(1e4, 16))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=1e-2)


def test_apply_rope_positions_in_any_order():
    """Load-balanced layouts permute tokens and positions together; RoPE follows the positions."""
    x = np.random.default_rng(0).standard_normal((2, 64, 2, 16)).astype(np.float32)
    natural = np.broadcast_to(np.arange(64, dtype=np.int32), (2, 64))
    perm = np.random.default_rng(1).permutation(64)
    cfg = RopeConfig(rope_type="linear", factor=2.0)
    in_order = apply_rope(jnp.asarray(x), jnp.asarray(natural), cfg)
    permuted = apply_rope(jnp.asarray(x[:, perm]), jnp.asarray(natural[:, perm]), cfg)
    np.testing.assert_array_equal(np.asarray(permuted), np.asarray(in_order)[:, perm])


def test_scores_depend_only_on_relative_position():
    """q(m).k(n) is the same for (m, n) and (m + D, n + D), here with D near 1M."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 128)).astype(np.float32)) for _ in range(2))
    cfg = RopeConfig(rope_theta=5e5)

    def score(m, n):
        qm = apply_rope(q, jnp.full((1, 1), m, jnp.int32), cfg)
        kn = apply_rope(k, jnp.full((1, 1), n, jnp.int32), cfg)
        return float(jnp.sum(qm * kn))

    assert score(1_000_123, 1_000_000) == pytest.approx(score(123, 0), abs=1e-4)


# --- precision at long positions ----------------------------------------------------


def angle_error(
    cos_sin: tuple[jax.Array, jax.Array], positions: np.ndarray, inv_freq: np.ndarray
) -> float:
    """Max |angle - positions * inv_freq| (mod 2 pi), radians, against float64."""
    got = np.arctan2(np.asarray(cos_sin[1], np.float64), np.asarray(cos_sin[0], np.float64))
    diff = got - positions[..., None].astype(np.float64) * inv_freq
    return float(np.max(np.abs(np.angle(np.exp(1j * diff)))))


# Bound for every int32 position (measured: ~5e-7 rad at 128K and 1M, < 1e-6 at 2^31 - 1).
ANGLE_TOL = 2e-6


@pytest.mark.parametrize(
    "start", [128 * 1024 - 512, 1024 * 1024 - 512, 2**31 - 1024], ids=["128K", "1M", "2^31"]
)
def test_long_positions_match_float64(start):
    cfg = RopeConfig(
        rope_type="llama3",
        rope_theta=5e5,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    inv_freq, _ = llama3_expected(5e5, 128, 8.0, 8192, 1.0, 4.0)
    positions = (start + np.arange(1024, dtype=np.int64)).reshape(2, 512).astype(np.int32)

    cos_sin = rope_cos_sin(jnp.asarray(positions), inverse_frequencies(cfg, 128)[0])
    err = angle_error(cos_sin, positions, inv_freq)
    assert err < ANGLE_TOL, err

    x = np.random.default_rng(0).standard_normal((2, 512, 2, 128)).astype(np.float32)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), cfg), np.float64)
    expected = rotate_half_f64(x.astype(np.float64), positions, inv_freq)
    # |x| ~ 4 at most, so an angle error e moves an output by at most ~4e; add float32 rounding.
    np.testing.assert_allclose(got, expected, rtol=0, atol=4 * ANGLE_TOL + 1e-5)


def test_naive_float32_angles_fail_at_1m():
    """The precision tests are sensitive: a plain float32 product misses the bound by 10^4."""
    inv_freq = theta(5e5, 128)
    positions = (1024 * 1024 + np.arange(512)).astype(np.int32)[None]
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    assert angle_error((jnp.cos(angles), jnp.sin(angles)), positions, inv_freq) > 1e-2


# A fixed list size keeps one compiled shape across examples.
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=32, max_size=32))
def test_any_int32_position_matches_float64(positions):
    inv_freq = theta(1e4, 64)
    positions = np.asarray(positions, np.int32)[None]
    cos_sin = rope_cos_sin(jnp.asarray(positions), inv_freq)
    assert angle_error(cos_sin, positions, inv_freq) < ANGLE_TOL


# --- dynamic under jit -----------------------------------------------------------------


def test_dynamic_under_jit_follows_static_length():
    """Frequencies read back from the rotation of e_i at position 1, for several static lengths."""
    L, head_dim, factor = 16, 8, 2.0
    cfg = RopeConfig(rope_type="dynamic", factor=factor, max_position_embeddings=L)
    rotate = jax.jit(apply_rope, static_argnames=("cfg", "seq_len"))

    def measured_inv_freq(seq: int, seq_len: int | None = None) -> np.ndarray:
        x = jnp.concatenate(
            [jnp.ones((1, seq, 1, head_dim // 2)), jnp.zeros((1, seq, 1, head_dim // 2))], -1
        )
        out = np.asarray(
            rotate(x, jnp.ones((1, seq), jnp.int32), cfg=cfg, seq_len=seq_len), np.float64
        )
        return np.arctan2(out[0, 0, 0, head_dim // 2 :], out[0, 0, 0, : head_dim // 2])

    below = measured_inv_freq(L // 2)
    np.testing.assert_allclose(below, theta(1e4, head_dim), atol=2e-6)  # default at or below L
    np.testing.assert_allclose(measured_inv_freq(L), theta(1e4, head_dim), atol=2e-6)
    seen = []
    for seq in (2 * L, 4 * L):
        got = measured_inv_freq(seq)
        np.testing.assert_allclose(
            got, dynamic_expected(1e4, head_dim, factor, L, seq)[0], atol=2e-6
        )
        seen.append(got)
    assert not np.allclose(seen[0], seen[1], atol=1e-4)
    # An explicit static seq_len (e.g. decoding one token against a 4L cache) overrides x.shape[1].
    np.testing.assert_allclose(measured_inv_freq(1, seq_len=4 * L), seen[1], atol=2e-6)


# --- Hugging Face config round trip ---------------------------------------------------

LLAMA31_OLD = {
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
LLAMA2_OLD = {"max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None}
YARN_NEW = {
    "max_position_embeddings": 32768,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 8192,
        "beta_fast": 16.0,
    },
}
LONGROPE_NEW = {
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": 4096,
        "factor": 32.0,
    },
}


@pytest.mark.parametrize(
    "hf,legacy",
    [(LLAMA31_OLD, True), (LLAMA2_OLD, True), (YARN_NEW, False), (LONGROPE_NEW, False)],
    ids=["llama31", "llama2", "yarn", "longrope"],
)
def test_hf_round_trip(hf, legacy):
    cfg = RopeConfig.from_hf(hf)
    assert cfg.to_hf(legacy=legacy) == hf
    assert RopeConfig.from_hf(cfg.to_hf(legacy=not legacy)) == cfg  # and across the two styles


def test_from_hf_reads_fields():
    cfg = RopeConfig.from_hf(LLAMA31_OLD)
    assert cfg == RopeConfig(
        rope_type="llama3",
        rope_theta=5e5,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        max_position_embeddings=131072,
    )
    assert (
        RopeConfig.from_hf(YARN_NEW).beta_fast == 16.0
        and RopeConfig.from_hf(YARN_NEW).beta_slow == 1.0
    )


def test_from_hf_legacy_spellings():
    """`type` for `rope_type`; Phi-3's top-level original length and implied factor; nulls."""
    cfg = RopeConfig.from_hf({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e4})
    assert cfg == RopeConfig(rope_type="linear", factor=2.0)
    phi3 = RopeConfig.from_hf(
        {
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
        }
    )
    assert (phi3.factor, phi3.original_max_position_embeddings, phi3.partial_rotary_factor) == (
        32.0,
        4096,
        0.5,
    )
    assert (
        RopeConfig.from_hf(
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 2.0,
                    "beta_fast": None,
                    "original_max_position_embeddings": 64,
                }
            }
        ).beta_fast
        == 32.0
    )


@pytest.mark.parametrize(
    "cfg",
    [
        RopeConfig(),
        RopeConfig(rope_type="ntk", factor=4.0, partial_rotary_factor=0.25),
        RopeConfig(rope_type="dynamic", factor=2.0, max_position_embeddings=2048),
        RopeConfig(
            rope_type="yarn",
            factor=8.0,
            max_position_embeddings=4096,
            mscale=1.0,
            mscale_all_dim=0.5,
            truncate=False,
            attention_factor=1.2,
        ),
        RopeConfig.from_hf(LONGROPE_NEW),
    ],
    ids=["default", "ntk", "dynamic", "yarn", "longrope"],
)
@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_to_hf_from_hf_inverse(cfg, legacy):
    assert RopeConfig.from_hf(cfg.to_hf(legacy=legacy)) == cfg


def test_from_hf_rejects_unknown_keys():
    with pytest.raises(
        ValueError, match=r"rope config keys \['mrope_section'\]: not RoPE parameters"
    ):
        RopeConfig.from_hf(
            {"rope_scaling": {"rope_type": "default", "mrope_section": [16, 24, 24]}}
        )
    with pytest.raises(ValueError, match=r"rope_type='su': must be one of"):
        RopeConfig.from_hf({"rope_scaling": {"type": "su", "factor": 2.0}})
