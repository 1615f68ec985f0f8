"""The LLaMA-style model: config and presets, Flax modules, functional entry points.

    config = lctx.model.preset("tiny", attention_impl="blockwise", remat="full")
    params = lctx.model.init(config, jax.random.key(0))
    logits = lctx.model.forward(config, params, tokens)            # float32 [b, s, V]
    loss, metrics = lctx.model.loss(config, params, tokens, targets)
    hidden, cache = lctx.model.extend(config, params, chunk, cache, positions=..., valid=...,
                                      rope_seq_len=...)      # with an lctx.infer.kvcache.KVCache
"""

from lctx.model.api import (abstract_params, extend, forward, init, logits_of, loss, param_axes,
                            param_count, param_shardings)
from lctx.model.config import PRESETS, REMAT_POLICIES, ModelConfig, preset
from lctx.model.loss import chunked_cross_entropy
from lctx.model.rope import RopeConfig
from lctx.model.transformer import Llama

__all__ = [
    "Llama", "ModelConfig", "PRESETS", "REMAT_POLICIES", "RopeConfig", "abstract_params",
    "chunked_cross_entropy", "extend", "forward", "init", "logits_of", "loss", "param_axes", "param_count",
    "param_shardings", "preset",
]
