"""Rotary position embeddings (RoPE) and the Hugging Face scaling family.

Notation used by every docstring below: d = rotary dim = int(head_dim *
partial_rotary_factor), b = `rope_theta`, s = `factor`, theta_i = b^(-2i/d) for
i < d/2, L = `original_max_position_embeddings` (for `dynamic`:
`max_position_embeddings`).

Parameter names and formulas are those of transformers' `modeling_rope_utils.py`,
so a Hugging Face `config.json` maps one-to-one (`RopeConfig.from_hf` / `to_hf`).
The one addition is `ntk` (static NTK-aware base change), which transformers has
no type for. Inverse frequencies are computed in float64 on the host: they are
static given the config, head_dim and (for `dynamic` / `longrope`) the static
sequence length, so under `jit` they become constants.

Layout: x is `[batch, seq, heads, head_dim]`; pairs are (i, i + d/2) ("rotate
half", as HF LLaMA), so HF checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROPE_TYPES",
    "RopeConfig",
    "RopeType",
    "apply_rope",
    "apply_rotary",
    "inverse_frequencies",
    "rope_angles",
    "rope_cos_sin",
    "rotary_dim",
]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """One RoPE variant with its parameters, named as in HF `rope_parameters`.

    Only the fields a type reads matter for it (see `ROPE_TYPES[t].params`);
    `None` means "not given" exactly as a missing key does in transformers.
    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float = 1.0
    partial_rotary_factor: float = 1.0
    # Model context length: L for `dynamic`; stands in for a missing
    # original_max_position_embeddings in `yarn` / `longrope` (as transformers).
    max_position_embeddings: int | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # longrope: one factor per frequency pair, length d/2
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config stays hashable.
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        problems = _config_problems(self)
        if problems:
            raise ValueError("\n".join(problems))

    @property
    def context_length(self) -> int | None:
        """L of the scaled types: original_max_position_embeddings, else max_position_embeddings."""
        return self.original_max_position_embeddings or self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> RopeConfig:
        """Reads a HF `config.json` dict, old style or transformers-5 style.

        Old style: top-level `rope_theta` (+ `partial_rotary_factor`) and
        `rope_scaling` {`rope_type` or `type`, factor, ...} or null. New style:
        `rope_parameters` {rope_type, rope_theta, ...}. A top-level
        `original_max_position_embeddings` (Phi-3) wins over the rope dict's, and a
        missing yarn/longrope `factor` is max_position_embeddings / L, both as
        transformers does. Unknown keys raise rather than being dropped silently.
        """
        rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
        # None means "absent" in HF configs (e.g. "beta_fast": null -> default 32).
        params = {k: v for k, v in rope.items() if v is not None}
        legacy_type = params.pop("type", None)
        params.setdefault("rope_type", legacy_type or "default")
        for key in ("rope_theta", "partial_rotary_factor", "max_position_embeddings"):
            if key not in params and hf_config.get(key) is not None:
                params[key] = hf_config[key]
        if hf_config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = hf_config[
                "original_max_position_embeddings"
            ]
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"rope config keys {unknown}: not RoPE parameters lctx knows; "
                f"allowed: {sorted(allowed)}"
            )
        if (
            "factor" not in params
            and params["rope_type"] in ("yarn", "longrope")
            and params.get("max_position_embeddings")
            and params.get("original_max_position_embeddings")
        ):
            params["factor"] = (
                params["max_position_embeddings"] / params["original_max_position_embeddings"]
            )
        return cls(**params)

    def to_hf(self, *, legacy: bool = False) -> dict[str, Any]:
        """The config.json entries for this RoPE; `from_hf` inverts it.

        `legacy=False` writes transformers-5 `rope_parameters`; `legacy=True` writes
        top-level `rope_theta` and `rope_scaling` (null for `default`). Only the
        parameters the type reads are written, optional ones only when they differ
        from the default. `ntk` is lctx's own type: transformers cannot load it.
        """
        rope: dict[str, Any] = {"rope_type": self.rope_type}
        defaults = RopeConfig()
        for name in ROPE_TYPES[self.rope_type].params:
            value = getattr(self, name)
            # `factor` is a required key in HF for every type that reads it.
            if value is not None and (name == "factor" or value != getattr(defaults, name)):
                rope[name] = list(value) if isinstance(value, tuple) else value
        top: dict[str, Any] = {}
        if self.max_position_embeddings is not None:
            top["max_position_embeddings"] = self.max_position_embeddings
        shared = {"rope_theta": self.rope_theta}
        if self.partial_rotary_factor != 1.0:
            shared["partial_rotary_factor"] = self.partial_rotary_factor
        if legacy:
            scaling = None if self.rope_type == "default" else rope
            return {**top, **shared, "rope_scaling": scaling}
        return {**top, "rope_parameters": {**rope, **shared}}


def _config_problems(cfg: RopeConfig) -> list[str]:
    """One line per invalid field: key, value, what is allowed."""
    if cfg.rope_type not in ROPE_TYPES:
        return [f"rope_type={cfg.rope_type!r}: must be one of {', '.join(sorted(ROPE_TYPES))}"]
    problems = []
    if not cfg.rope_theta > 0:
        problems.append(f"rope_theta={cfg.rope_theta!r}: must be > 0")
    if not cfg.factor >= 1.0:
        problems.append(f"factor={cfg.factor!r}: must be >= 1 (a context extension factor)")
    if not 0.0 < cfg.partial_rotary_factor <= 1.0:
        problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor!r}: must be in (0, 1]")
    if cfg.attention_factor is not None and not cfg.attention_factor > 0:
        problems.append(f"attention_factor={cfg.attention_factor!r}: must be > 0 or None")
    if cfg.rope_type == "dynamic" and cfg.max_position_embeddings is None:
        problems.append(
            "max_position_embeddings=None: rope_type 'dynamic' needs the model context length L"
        )
    if cfg.rope_type in ("yarn", "longrope") and cfg.context_length is None:
        problems.append(
            f"original_max_position_embeddings=None: rope_type {cfg.rope_type!r} needs it "
            "(or max_position_embeddings to fall back on)"
        )
    if cfg.rope_type == "yarn" and cfg.beta_fast < cfg.beta_slow:
        problems.append(f"beta_fast={cfg.beta_fast!r}: must be >= beta_slow={cfg.beta_slow!r}")
    if cfg.rope_type == "llama3":
        for name in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
            if getattr(cfg, name) is None:
                problems.append(f"{name}=None: required for rope_type 'llama3'")
        if (
            None not in (cfg.low_freq_factor, cfg.high_freq_factor)
            and cfg.high_freq_factor <= cfg.low_freq_factor
        ):
            problems.append(
                f"high_freq_factor={cfg.high_freq_factor!r}: "
                f"must be > low_freq_factor={cfg.low_freq_factor!r}"
            )
    if cfg.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            if getattr(cfg, name) is None:
                problems.append(
                    f"{name}=None: required for rope_type 'longrope' "
                    "(a list of rotary_dim/2 floats)"
                )
    return problems


# --- the registry ---------------------------------------------------------------

InvFreqFn = Callable[[RopeConfig, int, int | None], tuple[np.ndarray, float]]


@dataclasses.dataclass(frozen=True)
class RopeType:
    """A registered RoPE variant.

    compute(cfg, d, seq_len) -> (inv_freq float64 `[d/2]`, attention_factor), with
    d the (even) rotary dim; params: the RopeConfig fields it reads besides
    rope_theta / partial_rotary_factor (what `to_hf` writes).
    """

    compute: InvFreqFn
    params: tuple[str, ...]


ROPE_TYPES: dict[str, RopeType] = {}


def _register(name: str, *params: str) -> Callable[[InvFreqFn], InvFreqFn]:
    def add(fn: InvFreqFn) -> InvFreqFn:
        ROPE_TYPES[name] = RopeType(fn, params)
        return fn

    return add


def _theta(base: float, d: int) -> np.ndarray:
    """theta_i = base^(-2i/d), float64 `[d/2]`."""
    return 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)


@_register("default")
def _default_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """theta_i; attention factor 1."""
    return _theta(cfg.rope_theta, d), 1.0


@_register("linear", "factor")
def _linear_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """Position interpolation: theta_i / s (same as positions / s)."""
    return _theta(cfg.rope_theta, d) / cfg.factor, 1.0


@_register("ntk", "factor")
def _ntk_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """Static NTK-aware: base b' = b * s^(d/(d-2)), then theta_i with b'."""
    return _theta(cfg.rope_theta * cfg.factor ** (d / (d - 2)), d), 1.0


@_register("dynamic", "factor")
def _dynamic_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """Dynamic NTK: n = max(seq_len, L), b' = b * (s*n/L - (s-1))^(d/(d-2)).

    L = max_position_embeddings; equals `default` for seq_len <= L (or None).
    """
    L = cfg.max_position_embeddings
    n = max(seq_len or L, L)
    base = cfg.rope_theta * (cfg.factor * n / L - (cfg.factor - 1)) ** (d / (d - 2))
    return _theta(base, d), 1.0


def _yarn_mscale(s: float, mscale: float = 1.0) -> float:
    """m(s, mu) = 1 if s <= 1 else 0.1 * mu * ln(s) + 1."""
    return 1.0 if s <= 1 else 0.1 * mscale * math.log(s) + 1.0


@_register(
    "yarn",
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
)
def _yarn_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """YaRN: interpolate the low frequencies, keep the high ones.

    c(r) = d * ln(L / (2 pi r)) / (2 ln b); low = floor(c(beta_fast)),
    high = ceil(c(beta_slow)) (no rounding when truncate=False), clamped to
    [0, d-1]; ramp_i = clip((i - low) / (high - low), 0, 1);
    theta'_i = theta_i / s * ramp_i + theta_i * (1 - ramp_i).
    attention_factor: the given one, else m(s, mscale) / m(s, mscale_all_dim) when
    both are given, else m(s, 1).
    """
    b, s, L = cfg.rope_theta, cfg.factor, cfg.context_length

    def correction_dim(rotations: float) -> float:
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(b))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    theta = _theta(b, d)
    inv_freq = theta / s * ramp + theta * (1.0 - ramp)
    if cfg.attention_factor is not None:
        attention_factor = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:  # truthiness, as transformers: 0 counts as absent
        attention_factor = _yarn_mscale(s, cfg.mscale) / _yarn_mscale(s, cfg.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(s)
    return inv_freq, attention_factor


@_register(
    "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
)
def _llama3_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """Llama 3.1: by wavelength w_i = 2 pi / theta_i.

    w < L / high_freq_factor: theta_i; w > L / low_freq_factor: theta_i / s;
    otherwise (1 - g) theta_i / s + g theta_i, g = (L / w - low) / (high - low).
    """
    s, L = cfg.factor, cfg.original_max_position_embeddings
    lo, hi = cfg.low_freq_factor, cfg.high_freq_factor
    theta = _theta(cfg.rope_theta, d)
    wavelen = 2 * math.pi / theta
    g = (L / wavelen - lo) / (hi - lo)
    smoothed = (1.0 - g) * theta / s + g * theta
    inv_freq = np.where(wavelen < L / hi, theta, np.where(wavelen > L / lo, theta / s, smoothed))
    return inv_freq, 1.0


@_register(
    "longrope",
    "short_factor",
    "long_factor",
    "original_max_position_embeddings",
    "factor",
    "attention_factor",
)
def _longrope_rope(cfg: RopeConfig, d: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """LongRoPE: theta'_i = theta_i / ext_i, ext = long_factor if seq_len > L else short_factor.

    attention_factor: the given one, else sqrt(1 + ln(s) / ln(L)) when s > 1, else 1.
    """
    L = cfg.context_length
    ext = cfg.long_factor if seq_len is not None and seq_len > L else cfg.short_factor
    inv_freq = _theta(cfg.rope_theta, d) / np.asarray(ext, dtype=np.float64)
    if cfg.attention_factor is not None:
        attention_factor = cfg.attention_factor
    elif cfg.factor > 1.0:
        attention_factor = math.sqrt(1.0 + math.log(cfg.factor) / math.log(L))
    else:
        attention_factor = 1.0
    return inv_freq, attention_factor


# --- frequencies and angles -------------------------------------------------------


def rotary_dim(cfg: RopeConfig, head_dim: int) -> int:
    """int(head_dim * partial_rotary_factor): the leading dims that rotate; must be even."""
    d = int(head_dim * cfg.partial_rotary_factor)
    if d < 2 or d % 2:
        raise ValueError(
            f"head_dim={head_dim} (x partial_rotary_factor={cfg.partial_rotary_factor} "
            f"-> rotary dim {d}): the rotary dim must be even and >= 2"
        )
    return d


def inverse_frequencies(
    cfg: RopeConfig, head_dim: int, seq_len: int | None = None
) -> tuple[np.ndarray, float]:
    """(inv_freq float64 `[rotary_dim/2]`, attention_factor) for a static seq_len.

    seq_len (a Python int, static under jit) matters only for `dynamic` and
    `longrope`; None means "at most L".
    """
    d = rotary_dim(cfg, head_dim)
    if cfg.rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            n = len(getattr(cfg, name))
            if n != d // 2:
                raise ValueError(
                    f"{name} has length {n}: must have rotary_dim/2 = {d // 2} entries"
                )
    return ROPE_TYPES[cfg.rope_type].compute(cfg, d, seq_len)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """positions * inv_freq reduced to [-pi, pi], float32 `[..., d/2]` for int32 positions `[...]`.

    Plain float32 `position * freq` is off by ~0.06 rad at 1M. Here the product is
    taken in turns (angle / 2 pi) with fixed point: on the host (float64) each
    frequency's fractional turns per step t = T / 2^32 + r, T uint32, r < 2^-32.
    On device pos * T wraps mod 2^32 in uint32 arithmetic, which drops exactly the
    whole turns, and pos * r < 0.5 turn is small enough for float32. Each term has
    rounding error <= ~6e-8 turns, so the angle error stays below ~1e-6 rad for
    every int32 position, negative ones included (two's complement wraps the same
    way); measured 5.4e-7 rad near 128K and 1M, 9.8e-7 near 2^31.
    inv_freq must be a concrete host array (it is static), not a tracer.
    """
    turns = np.mod(np.asarray(inv_freq, dtype=np.float64) / (2 * np.pi), 1.0)
    scaled = turns * 2.0**32
    whole = np.floor(scaled)
    t_int = jnp.asarray(whole.astype(np.uint32))
    t_rem = jnp.asarray(((scaled - whole) * 2.0**-32).astype(np.float32))

    pos = jnp.asarray(positions)
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise TypeError(f"positions must be integers, got {pos.dtype}")
    pos = pos.astype(jnp.int32)[..., None]
    coarse = (jax.lax.bitcast_convert_type(pos, jnp.uint32) * t_int).astype(jnp.float32) * 2.0**-32
    phase = coarse + pos.astype(jnp.float32) * t_rem
    return (2 * np.pi) * (phase - jnp.round(phase))


def rope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """attention_factor * (cos, sin) of the angles, float32 `[batch, seq, d/2]` each.

    Scaling both by the factor (as transformers) scales q.k logits by its square.
    Compute once per forward pass and share across layers with `apply_rotary`.
    """
    angles = rope_angles(positions, inv_freq)
    return attention_factor * jnp.cos(angles), attention_factor * jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + k) of x's first 2k dims, k = cos.shape[-1]; the rest pass through.

    x: `[batch, seq, heads, head_dim]`; cos, sin: `[batch, seq, k]`. Returns x's
    dtype, computed in float32.
    """
    k = cos.shape[-1]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :k], xf[..., k : 2 * k], xf[..., 2 * k :]
    c, s = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], axis=-1)
    return out.astype(x.dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, cfg: RopeConfig, *, seq_len: int | None = None
) -> jax.Array:
    """RoPE of `cfg` applied to x `[batch, seq, heads, head_dim]` at int32 positions `[batch, seq]`.

    Positions may be in any order (e.g. load-balanced). seq_len is the current
    sequence length for `dynamic` / `longrope` and must be static; it defaults to
    x.shape[1], so pass the full length when x is a slice of it (e.g. decoding
    against a KV cache, where transformers uses max(position) + 1).
    """
    seq_len = x.shape[1] if seq_len is None else seq_len
    inv_freq, attention_factor = inverse_frequencies(cfg, x.shape[-1], seq_len)
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)
    return apply_rotary(x, cos, sin)
