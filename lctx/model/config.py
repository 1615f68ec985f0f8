"""`ModelConfig`: the LLaMA-style model's hyper-parameters, its validation, and the presets.

The config is a frozen (hashable) dataclass, so it can be a static argument of
`jax.jit`. `validate()` checks every field at once and raises one ValueError with
one line per problem, "key=value: what is allowed", before anything is traced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

from lctx.kernels.registry import IMPLS, option_problems
from lctx.model.rope import RopeConfig, inverse_frequencies

REMAT_POLICIES = ("none", "full", "save_attention")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-style decoder: pre-RMSNorm blocks, RoPE, GQA attention, SwiGLU MLP.

    Field names follow the rest of lctx; `head_dim=None` means d_model // n_heads
    (filled in at construction). head_dim may be set apart from d_model (Qwen3 and
    Gemma shapes: n_heads * head_dim != d_model): q projects `[d_model] -> [n_heads,
    head_dim]`, k and v to `[n_kv_heads, head_dim]`, o back to `[d_model]`.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None
    rope: RopeConfig = RopeConfig()
    norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmul inputs
    tie_embeddings: bool = False
    attention_impl: str = "blockwise"
    # Hashable mapping: block_q, block_k (tile sizes), placement (ring), layout (ring).
    attention_options: Mapping[str, Any] = FrozenDict()
    remat: str = "none"
    ffn_chunk: int | None = None  # blockwise FFN: tokens per step (split over sequence shards)
    max_position_embeddings: int = 2048
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        # Normalise to hashable, comparable forms; validate() reports what is left wrong.
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, jnp.dtype(value).name)
            except TypeError:
                pass
        options = self.attention_options or {}
        items = options.items() if hasattr(options, "items") else options  # ConfigDict too
        object.__setattr__(self, "attention_options", FrozenDict(dict(items)))
        if (self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0
                and self.d_model % self.n_heads == 0):
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def problems(self) -> list[str]:
        """One "key=value: what is allowed" line per invalid field (empty when valid)."""
        out: list[str] = []

        def bad(key: str, value: Any, allowed: str) -> None:
            out.append(f"{key}={value!r}: {allowed}")

        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if not _positive_int(value):
                bad(key, value, "must be a positive int")
        heads_ok = _positive_int(self.n_heads) and _positive_int(self.n_kv_heads)
        if heads_ok and self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", self.n_kv_heads,
                f"must divide n_heads={self.n_heads} (grouped-query attention)")
        if self.head_dim is None:
            if _positive_int(self.n_heads):
                bad("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        elif not _positive_int(self.head_dim) or self.head_dim % 2:
            bad("head_dim", self.head_dim, "must be a positive even int (RoPE rotates pairs)")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            bad("norm_eps", self.norm_eps, "must be a positive float")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, getattr(self, key), f"must be one of {', '.join(DTYPES)}")
        if not isinstance(self.tie_embeddings, bool):
            bad("tie_embeddings", self.tie_embeddings, "must be True or False")
        if self.remat not in REMAT_POLICIES:
            bad("remat", self.remat, f"must be one of {', '.join(REMAT_POLICIES)}")
        if self.ffn_chunk is not None and not _positive_int(self.ffn_chunk):
            bad("ffn_chunk", self.ffn_chunk, "must be None or a positive int (tokens per chunk)")
        if self.sliding_window is not None and not _positive_int(self.sliding_window):
            bad("sliding_window", self.sliding_window, "must be None or a positive int")
        out += self._attention_problems()
        out += self._rope_problems()
        return out

    @property
    def sequence_parallel(self) -> bool:
        """Whether attention splits the sequence over a mesh's 'sequence' axis."""
        return IMPLS[self.attention_impl].sequence_parallel

    def _attention_problems(self) -> list[str]:
        """attention_impl and attention_options, checked by the kernels' registry (the
        model adds `layout` for the ring: "balanced" permutes tokens once, "natural"
        lets every attention call place them)."""
        impl = self.attention_impl
        found = option_problems(impl, dict(self.attention_options), model=True)
        return [f"attention_impl={value!r}: {allowed}" if key == "impl" else
                f"attention_options.{key}={value!r}: {allowed}" for key, value, allowed in found]

    def _rope_problems(self) -> list[str]:
        if not isinstance(self.rope, RopeConfig):
            return [f"rope={self.rope!r}: must be an lctx.model.rope.RopeConfig"]
        out = []
        rope_len = self.rope.max_position_embeddings
        if rope_len is not None and rope_len != self.max_position_embeddings:
            out.append(f"rope.max_position_embeddings={rope_len}: must equal "
                       f"max_position_embeddings={self.max_position_embeddings} (or be None)")
        if _positive_int(self.head_dim):
            try:  # rotary dim and longrope factor lengths depend on head_dim
                inverse_frequencies(self.rope, self.head_dim)
            except ValueError as err:
                out.append(f"rope={self.rope.rope_type!r}: {err}")
        return out

    def validate(self) -> ModelConfig:
        """Raises one ValueError listing every problem; returns self when valid."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
        return self


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _llama3_rope(factor: float) -> RopeConfig:
    """Llama 3.1/3.2 frequency scaling: low 1, high 4, L 8192, theta 500000."""
    return RopeConfig(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192,
                      max_position_embeddings=131072)


# Byte-level vocabularies: 256 bytes plus special tokens, padded to a multiple of 128
# so the vocab dimension splits evenly over tensor-parallel axes (and TPU lanes).
BYTE_VOCAB = 384

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: every forward/backward runs in well under a second on CPU.
    "tiny": dict(vocab_size=BYTE_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 mlp_dim=128, max_position_embeddings=256, rope=RopeConfig()),
    # CPU quickstart / studies: ~3.2M parameters, trains at 256-1024 tokens in minutes.
    "small": dict(vocab_size=BYTE_VOCAB, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                  mlp_dim=768, max_position_embeddings=1024, tie_embeddings=True,
                  rope=RopeConfig()),
    # Llama-3.2-1B shapes (1.24B parameters).
    "llama3_1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      mlp_dim=8192, max_position_embeddings=131072, tie_embeddings=True,
                      rope=_llama3_rope(32.0), dtype="bfloat16"),
    # Llama-3.1-8B shapes (8.03B parameters).
    "llama3_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      mlp_dim=14336, max_position_embeddings=131072, rope=_llama3_rope(8.0),
                      dtype="bfloat16"),
    # SmolLM2-135M (the registered GGUF, lctx.load("smollm2-135m")): for recipes that
    # start from it (configs/beacon_smollm2.py).
    "smollm2_135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         mlp_dim=1536, head_dim=64, max_position_embeddings=8192,
                         tie_embeddings=True,
                         rope=RopeConfig(rope_theta=100000.0, max_position_embeddings=8192)),
    # Llama-2-7B shapes (6.74B parameters).
    "llama2_7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      mlp_dim=11008, max_position_embeddings=4096,
                      rope=RopeConfig(rope_theta=10000.0), dtype="bfloat16"),
}


def rope_from_scaling(scaling: RopeConfig | Mapping[str, Any] | None, base: RopeConfig,
                      max_position_embeddings: int) -> RopeConfig:
    """A `rope_scaling` override as a RopeConfig: as given, or an HF-style dict (None:
    plain RoPE) read on top of `base`'s rope_theta and the model's context length."""
    if isinstance(scaling, RopeConfig):
        return scaling
    hf = {"rope_theta": base.rope_theta, "max_position_embeddings": max_position_embeddings,
          "rope_scaling": dict(scaling) if scaling else None}
    return RopeConfig.from_hf(hf)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied, validated.

    Overrides set any ModelConfig field (e.g. attention_impl="ring", remat="full",
    dtype="bfloat16"), plus `rope_scaling`: a RopeConfig, an HF-style dict
    ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 256}) read
    on top of the preset's rope_theta and max_position_embeddings, or None for plain RoPE.
    Raises one ValueError listing every problem.
    """
    if name not in PRESETS:
        raise ValueError(f"preset={name!r}: must be one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields - {"rope_scaling"})
    if unknown:
        raise ValueError("invalid model config:\n  " + "\n  ".join(
            f"{key}={overrides[key]!r}: not a model field; allowed: {', '.join(sorted(fields))}, "
            "rope_scaling" for key in unknown))
    if "rope" in overrides and "rope_scaling" in overrides:
        raise ValueError("invalid model config:\n  rope_scaling: give either rope or rope_scaling")
    values = {**PRESETS[name], **overrides}
    scaling = values.pop("rope_scaling", values["rope"])
    max_len = values["max_position_embeddings"]
    try:
        rope = rope_from_scaling(scaling, values["rope"], max_len)
    except ValueError as err:  # RopeConfig's own checks, one line per problem
        lines = str(err).splitlines()
        raise ValueError("invalid model config:\n  " + "\n  ".join(
            f"rope_scaling.{line}" for line in lines)) from None
    if "rope" not in overrides and rope.max_position_embeddings is not None:
        # Keep the rope's context length (dynamic NTK's L) in step with the model's.
        rope = dataclasses.replace(rope, max_position_embeddings=max_len)
    return ModelConfig(**{**values, "rope": rope}).validate()
