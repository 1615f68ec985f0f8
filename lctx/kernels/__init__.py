"""Attention kernels: pure functions of arrays in the layout `[batch, seq, heads, head_dim]`.

No Flax, no config objects, no globals. `attention` is the one entry point; the
block seam (`block_fwd`, `block_bwd`) is what every strategy is built from.
"""

from lctx.kernels.api import IMPLS, attention
from lctx.kernels.blockwise import block_bwd, block_fwd, blockwise_attention, merge_partials
from lctx.kernels.feedforward import blockwise_feedforward
from lctx.kernels.layout import (PLACEMENTS, balanced_permutation, inverse_permutation,
                                 to_balanced, to_natural)
from lctx.kernels.pallas import PallasSeam, pallas_attention
from lctx.kernels.reference import reference_attention
from lctx.kernels.ring import ring_attention, ring_tiles_computed
from lctx.kernels.ulysses import ulysses_attention

__all__ = [
    "IMPLS", "PLACEMENTS", "PallasSeam", "attention", "balanced_permutation", "block_bwd", "block_fwd",
    "blockwise_attention", "blockwise_feedforward", "inverse_permutation", "merge_partials", "pallas_attention", "to_balanced", "to_natural",
    "reference_attention", "ring_attention", "ring_tiles_computed", "ulysses_attention",
]
