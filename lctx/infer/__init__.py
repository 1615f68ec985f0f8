"""lctx.infer: autoregressive decoding through the model's layers and a KV cache.

    tokens = lctx.infer.generate(config, params, [prompt_ids, ...], max_new_tokens=8,
                                 kv_cache="sink_window:sinks=4,window=1020")
"""

from lctx.infer.generate import decode, decode_step, generate, new_cache, prefill, rope_length
from lctx.infer.kvcache import POLICIES, CachePolicy, KVCache, parse

__all__ = ["POLICIES", "CachePolicy", "KVCache", "decode", "decode_step", "generate",
           "new_cache", "parse", "prefill", "rope_length"]
