"""KV cache policies: one module each, registered by spec name on import.

    from lctx.infer.kvcache import KVCache, parse
    policy = parse("sink_window:sinks=4,window=1020")

Adding a policy is one new file here: a `CachePolicy` dataclass decorated with
`@register` (see base.py for the interface, full.py for the simplest one).
"""

import importlib
import pkgutil

from lctx.infer.kvcache.base import CachePolicy, KVCache, append, gather_slots, keep_top
from lctx.infer.kvcache.registry import POLICIES, parse, register

# Import every policy module so that each registers itself; a new file needs no edit here.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["CachePolicy", "KVCache", "POLICIES", "append", "gather_slots", "keep_top", "parse",
           "register"]
