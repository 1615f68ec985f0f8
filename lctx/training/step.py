"""The train state and the pure train / eval steps."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lctx import model as lm

Batch = dict[str, jax.Array]  # lctx.data.BATCH_KEYS: int/float [b, s]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: parameters, optimizer state, step counter, rng."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates taken in this stage
    rng: jax.Array  # base key; step t uses fold_in(rng, t) for any stochastic op


def _summed_loss(model_config: lm.ModelConfig, mesh: Mesh | None, params: Any, batch: Batch):
    """(sum of token losses, metrics) so micro-batches combine exactly by token count."""
    mean, metrics = lm.loss(model_config, params, batch["tokens"], batch["targets"],
                            loss_mask=batch["loss_mask"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], mesh=mesh)
    return mean * metrics["tokens"], metrics


def _micro_batches(batch: Batch, count: int) -> Batch:
    """`[b, s]` leaves -> `[count, b / count, s]` for a scan over micro-batches."""
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def loss_and_grads(model_config: lm.ModelConfig, mesh: Mesh | None, params: Any, batch: Batch,
                   accum_steps: int):
    """Token-weighted mean loss and gradient over the batch, in `accum_steps` pieces.

    Returns (loss, grads, tokens, correct): accumulating sums, then dividing by the
    total token count, equals one full-batch step whatever the masks are.
    """
    grad_fn = jax.value_and_grad(lambda p, b: _summed_loss(model_config, mesh, p, b), has_aux=True)
    if accum_steps == 1:
        (total, metrics), grads = grad_fn(params, batch)
        tokens, correct = metrics["tokens"], metrics["accuracy"] * metrics["tokens"]
    else:
        def micro(carry, piece):
            (total, metrics), grads = grad_fn(params, piece)
            acc_total, acc_grads, acc_tokens, acc_correct = carry
            return (acc_total + total, jax.tree.map(jnp.add, acc_grads, grads),
                    acc_tokens + metrics["tokens"],
                    acc_correct + metrics["accuracy"] * metrics["tokens"]), None
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (jnp.float32(0), zeros, jnp.float32(0), jnp.float32(0))
        (total, grads, tokens, correct), _ = jax.lax.scan(micro, init, _micro_batches(batch, accum_steps))
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return total / denom, grads, tokens, correct / denom


def train_step(state: TrainState, batch: Batch, *, model_config: lm.ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh | None,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update: a pure function `(state, batch) -> (state, metrics)`.

    A non-finite loss or gradient leaves the state unchanged (metrics["finite"] is
    False) so the caller can stop with the last good parameters intact.
    """
    loss, grads, tokens, accuracy = loss_and_grads(model_config, mesh, state.params, batch, accum_steps)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              step=state.step + finite.astype(state.step.dtype))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "tokens": tokens, "accuracy": accuracy, "finite": finite}
    return new_state, metrics

