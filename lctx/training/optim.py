"""Learning-rate schedules and the AdamW optimizer of a stage."""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant", "linear")


def learning_rate_schedule(peak: float, steps: int, warmup_steps: int, kind: str,
                           final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup to `peak` over `warmup_steps`, then `kind` down to
    `final_fraction * peak` at `steps` (constant stays at peak)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}: must be one of {SCHEDULES}")
    warmup = min(warmup_steps, steps)
    decay_steps = max(steps - warmup, 1)
    end = peak * final_fraction
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_fraction)
    elif kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any, *, decay_norms_and_embeddings: bool) -> Any:
    """True for the leaves AdamW decays: matrices, and norms/embeddings only if asked."""
    def decays(path, leaf) -> bool:
        names = {getattr(p, "key", getattr(p, "name", "")) for p in path}
        if names & {"embed", "attn_norm", "mlp_norm", "final_norm"}:
            return decay_norms_and_embeddings
        return leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(*, learning_rate: optax.Schedule, weight_decay: float, b1: float, b2: float,
                   eps: float, clip_norm: float | None,
                   decay_norms_and_embeddings: bool) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a weight-decay mask."""
    chain = []
    if clip_norm:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=lambda p: decay_mask(
                                 p, decay_norms_and_embeddings=decay_norms_and_embeddings)))
    return optax.chain(*chain)
