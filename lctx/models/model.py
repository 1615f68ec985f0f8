"""`Model`: a loaded model's config, parameters (on device) and tokenizer, with logits and
generation.

    model = lctx.load("smollm2-135m")
    model.logits(tokens)                                  # float32 [b, s, V]
    model.generate("The capital of France is", max_new_tokens=8)   # -> str
    model.with_attention("ring", mesh=lctx.parallel.make_mesh(sequence=8)).logits(tokens)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from lctx import model as lm
from lctx.data.tokenizer import Tokenizer
from lctx.infer import generate as infer_generate
from lctx.infer.generate import DEFAULT_CHUNK
from lctx.model.config import rope_from_scaling

Params = dict[str, Any]


def with_rope_scaling(config: lm.ModelConfig, scaling: Mapping[str, Any] | None
                      ) -> lm.ModelConfig:
    """`config` with an HF-style rope_scaling dict (None: plain RoPE) on its rope_theta and
    max_position_embeddings (dynamic NTK's L), validated."""
    rope = rope_from_scaling(scaling, config.rope, config.max_position_embeddings)
    return config.replace(rope=rope).validate()


def place_params(config: lm.ModelConfig, params: Params, mesh: Mesh | None) -> Params:
    """Params as device arrays in `config.param_dtype`: sharded on `mesh` (FSDP/TP rules) or
    on the default device."""
    dtype = config.weights_dtype
    params = jax.tree.map(lambda x: x if x.dtype == dtype else x.astype(dtype), params)
    if mesh is None:
        return jax.device_put(params)
    return jax.device_put(params, lm.param_shardings(config, mesh))


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A model ready to run: `config`, device `params`, `tokenizer` (None when the source has
    none), the `mesh` sequence-parallel impls run on, and where it came from (`source`;
    `step` and `stage` for a training run's checkpoint)."""

    config: lm.ModelConfig
    params: Params
    tokenizer: Tokenizer | None = None
    mesh: Mesh | None = None
    source: str = ""
    step: int | None = None
    stage: str | None = None

    # ------------------------------------------------------------------ variants

    def with_config(self, **overrides: Any) -> Model:
        """This model with ModelConfig fields replaced (validated); `rope_scaling=` takes an
        HF-style dict. Params are recast when param_dtype changes."""
        scaling = overrides.pop("rope_scaling", None)
        config = self.config.replace(**overrides).validate()
        if scaling is not None:
            config = with_rope_scaling(config, scaling)
        params = self.params
        if config.param_dtype != self.config.param_dtype:
            params = place_params(config, params, self.mesh)
        return dataclasses.replace(self, config=config, params=params)

    def with_attention(self, impl: str, *, mesh: Mesh | None = None, **options: Any) -> Model:
        """This model with attention `impl` and its options (block_q, block_k, ...); `mesh`
        (lctx.parallel.make_mesh) for ring / ulysses, params resharded onto it."""
        config = self.config.replace(attention_impl=impl, attention_options=options).validate()
        params = self.params if mesh is self.mesh else place_params(config, self.params, mesh)
        return dataclasses.replace(self, config=config, params=params, mesh=mesh)

    # ------------------------------------------------------------------ running

    def logits(self, tokens: Any, *, positions: Any = None, segment_ids: Any = None
               ) -> jax.Array:
        """float32 logits `[b, s, V]` of int tokens `[b, s]` (jitted lctx.model.forward)."""
        as_ids = lambda x: None if x is None else np.asarray(x, np.int32)
        return lm.forward(self.config, self.params, as_ids(tokens), positions=as_ids(positions),
                          segment_ids=as_ids(segment_ids), mesh=self.mesh)

    def encode(self, text: str) -> np.ndarray:
        """int32 `[n]` prompt ids of `text`, with BOS first when the tokenizer asks for it."""
        tokenizer = self._tokenizer()
        ids = tokenizer.encode(text)
        if getattr(tokenizer, "add_bos", False):
            ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)
        return ids

    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
                 | np.ndarray, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 rng: jax.Array | None = None, kv_cache: str = "full",
                 chunk: int = DEFAULT_CHUNK) -> Any:
        """Continues prompts (greedy at temperature 0, else sampled with `rng`) through a
        KV cache of policy `kv_cache` (a spec, lctx.infer.kvcache), prefilling `chunk`
        tokens at a time.

        A str gives a str, a list of str a list of str: the continuation decoded up to
        the first EOS. Token ids give ids: `[n]` for one prompt `[len]`, `[b, n]` for a
        batch (a list of id lists or an int array `[b, len]`), n = max_new_tokens.
        """
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and np.ndim(prompts[0]) == 0 and not isinstance(prompts[0], str))
        batch = [prompts] if single else list(prompts)
        as_text = all(isinstance(p, str) for p in batch)
        ids = [self.encode(p) for p in batch] if as_text else [np.asarray(p, np.int32)
                                                                for p in batch]
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        new = infer_generate(self.config, self.params, ids, max_new_tokens=max_new_tokens,
                             temperature=temperature, rng=rng, pad_id=pad, kv_cache=kv_cache,
                             chunk=chunk)
        if as_text:
            texts = [self._decode_until_eos(row) for row in new]
            return texts[0] if single else texts
        return new[0] if single else new

    def _decode_until_eos(self, ids: np.ndarray) -> str:
        tokenizer = self._tokenizer()
        stops = np.flatnonzero(ids == tokenizer.eos_id)
        return tokenizer.decode(ids[:stops[0]] if stops.size else ids)

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer; pass token ids")
        return self.tokenizer
