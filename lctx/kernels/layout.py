"""Token placements over a sequence-sharded mesh axis.

Under causal attention a contiguous split gives device r work proportional to r + 1.
Load-balanced placements give every device the same work at every ring step:

- zigzag: the sequence is cut into 2P chunks; device r holds chunks r and 2P-1-r.
- striped: token t goes to device t mod P.

A placement is a permutation `perm` of token indices with `balanced = natural[:, perm]`;
device r holds `balanced[:, r*S/P:(r+1)*S/P]`. Positions and segment ids travel with
their tokens, so attention (masked by position) is unchanged by the permutation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

PLACEMENTS = ("zigzag", "striped", "contiguous")


def placement_multiple(placement: str, num_shards: int) -> int:
    """The number the sequence length must be a multiple of for `placement`."""
    return 2 * num_shards if placement == "zigzag" else num_shards


def balanced_permutation(seq_len: int, num_shards: int, placement: str = "zigzag") -> np.ndarray:
    """int32 `[seq_len]`: natural index of the token at each balanced slot."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not one of {PLACEMENTS}")
    multiple = placement_multiple(placement, num_shards)
    if seq_len % multiple:
        raise ValueError(
            f"seq_len={seq_len} must be a multiple of {multiple} for placement={placement!r} "
            f"over {num_shards} shards")
    index = np.arange(seq_len, dtype=np.int32)
    if placement == "contiguous":
        return index
    if placement == "striped":
        return index.reshape(seq_len // num_shards, num_shards).T.reshape(-1)
    chunks = index.reshape(2 * num_shards, seq_len // (2 * num_shards))
    order = [c for r in range(num_shards) for c in (r, 2 * num_shards - 1 - r)]
    return chunks[order].reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """int32 `[seq_len]` with `natural = balanced[:, inverse]`."""
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size, dtype=perm.dtype)
    return inverse


def to_balanced(x, num_shards: int, placement: str, axis: int = 1):
    """`natural -> balanced` along `axis` with reshapes and a reverse (no gather).

    Equal to `x.take(balanced_permutation(...), axis)`; written as reshapes so its
    transpose in the backward pass is also a reshape, not a scatter.
    """
    if placement == "contiguous":
        return x
    n = x.shape[axis]
    head, tail = x.shape[:axis], x.shape[axis + 1:]
    if placement == "striped":
        y = x.reshape(*head, n // num_shards, num_shards, *tail)
        return y.swapaxes(axis, axis + 1).reshape(x.shape)
    y = x.reshape(*head, 2, num_shards, n // (2 * num_shards), *tail)
    first, second = y[(slice(None),) * axis + (0,)], y[(slice(None),) * axis + (1,)]
    # Device r holds chunk r and chunk 2P-1-r: pair the first half with the reversed second.
    pairs = jnp.stack([first, jnp.flip(second, axis)], axis=axis + 1)
    return pairs.reshape(x.shape)


def to_natural(x, num_shards: int, placement: str, axis: int = 1):
    """Inverse of `to_balanced`."""
    if placement == "contiguous":
        return x
    n = x.shape[axis]
    head, tail = x.shape[:axis], x.shape[axis + 1:]
    if placement == "striped":
        y = x.reshape(*head, num_shards, n // num_shards, *tail)
        return y.swapaxes(axis, axis + 1).reshape(x.shape)
    y = x.reshape(*head, num_shards, 2, n // (2 * num_shards), *tail)
    first, second = y[(slice(None),) * (axis + 1) + (0,)], y[(slice(None),) * (axis + 1) + (1,)]
    return jnp.stack([first, jnp.flip(second, axis)], axis=axis).reshape(x.shape)
