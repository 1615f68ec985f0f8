"""Attention kernels: pure functions of arrays in the layout `[batch, seq, heads, head_dim]`.

No Flax, no config objects, no globals. `attention` is the one entry point; the
block seam (`block_fwd`, `block_bwd`) is what every strategy is built from.
Implementations register themselves in `lctx.kernels.registry.IMPLS` when their module
is imported; every module here is, except the backend Pallas kernels (pallas_tpu,
pallas_gpu), which `pallas.py` imports when a call needs one.
"""

import importlib
import pkgutil

# A new implementation module registers itself on import: it needs no edit here.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("pallas_"):
        importlib.import_module(f"{__name__}.{_module}")

from lctx.kernels.api import attention  # noqa: E402  (after the registering imports)
from lctx.kernels.blockwise import block_bwd, block_fwd, blockwise_attention, merge_partials
from lctx.kernels.feedforward import blockwise_feedforward
from lctx.kernels.layout import (PLACEMENTS, balanced_permutation, inverse_permutation,
                                 to_balanced, to_natural)
from lctx.kernels.pallas import PallasSeam, pallas_attention
from lctx.kernels.registry import IMPLS, AttentionImpl, register
from lctx.kernels.reference import reference_attention
from lctx.kernels.ring import ring_attention, ring_tiles_computed
from lctx.kernels.ulysses import ulysses_attention

__all__ = [
    "AttentionImpl", "IMPLS", "PLACEMENTS", "PallasSeam", "attention", "balanced_permutation", "block_bwd", "block_fwd",
    "blockwise_attention", "blockwise_feedforward", "inverse_permutation", "merge_partials", "pallas_attention", "to_balanced", "to_natural",
    "reference_attention", "register", "ring_attention", "ring_tiles_computed", "ulysses_attention",
]
