"""lctx.infer: autoregressive decoding with a KV cache.

    tokens = lctx.infer.generate(config, params, [prompt_ids, ...], max_new_tokens=8)
"""

from lctx.infer.generate import cached_attention, decode_step, generate, prefill, rope_length

__all__ = ["cached_attention", "decode_step", "generate", "prefill", "rope_length"]
