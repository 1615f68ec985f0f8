"""The train state and the pure train / eval steps."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lctx import model as lm
from lctx.model import beacon as bc

Batch = dict[str, jax.Array]  # lctx.data.BATCH_KEYS: int/float [b, s]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: parameters, optimizer state, step counter, rng."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer updates taken in this stage
    rng: jax.Array  # base key; step t uses fold_in(rng, t) for any stochastic op


# (trainable params, frozen params or None, batch, key) -> (summed token loss, metrics)
Objective = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def lm_objective(model_config: lm.ModelConfig, mesh: Mesh | None) -> Objective:
    """Next-token loss of the model itself (all its parameters train)."""
    def summed(params, _frozen, batch, _key):
        mean, metrics = lm.loss(model_config, params, batch["tokens"], batch["targets"],
                                loss_mask=batch["loss_mask"], positions=batch["positions"],
                                segment_ids=batch["segment_ids"], mesh=mesh)
        return mean * metrics["tokens"], metrics
    return summed


def beacon_objective(model_config: lm.ModelConfig, *, chunk: int, ratios: Sequence[int]
                     ) -> Objective:
    """Next-token loss read through activation beacons (lctx.model.beacon): the trainable
    params are the beacon module, the frozen ones the model's. Each chunk's ratio is drawn
    from `ratios` with the step's key. A row is read as one stream (packed documents'
    boundaries are not reset: beacons carry context across them, as over a long file)."""
    def summed(beacon, frozen, batch, key):
        picks = jax.random.randint(key, (batch["tokens"].shape[1] // chunk,), 0, len(ratios))
        mean, metrics = bc.beacon_lm_loss(model_config, frozen, beacon, batch["tokens"],
                                          batch["targets"], batch["loss_mask"], chunk=chunk,
                                          ratio=tuple(ratios), picks=picks)
        return mean * metrics["tokens"], metrics
    return summed


def _micro_batches(batch: Batch, count: int) -> Batch:
    """`[b, s]` leaves -> `[count, b / count, s]` for a scan over micro-batches."""
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def loss_and_grads(objective: Objective, params: Any, frozen: Any, batch: Batch, key: jax.Array,
                   accum_steps: int):
    """Token-weighted mean loss and gradient over the batch, in `accum_steps` pieces
    (micro-batch i draws with fold_in(key, i)).

    Returns (loss, grads, tokens, correct): accumulating sums, then dividing by the
    total token count, equals one full-batch step whatever the masks are.
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum_steps == 1:
        (total, metrics), grads = grad_fn(params, frozen, batch, jax.random.fold_in(key, 0))
        tokens, correct = metrics["tokens"], metrics["accuracy"] * metrics["tokens"]
    else:
        def micro(carry, inputs):
            index, piece = inputs
            (total, metrics), grads = grad_fn(params, frozen, piece, jax.random.fold_in(key, index))
            acc_total, acc_grads, acc_tokens, acc_correct = carry
            return (acc_total + total, jax.tree.map(jnp.add, acc_grads, grads),
                    acc_tokens + metrics["tokens"],
                    acc_correct + metrics["accuracy"] * metrics["tokens"]), None
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (jnp.float32(0), zeros, jnp.float32(0), jnp.float32(0))
        pieces = (jnp.arange(accum_steps), _micro_batches(batch, accum_steps))
        (total, grads, tokens, correct), _ = jax.lax.scan(micro, init, pieces)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
    return total / denom, grads, tokens, correct / denom


def train_step(state: TrainState, batch: Batch, frozen: Any = None, *, objective: Objective,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update: a pure function `(state, batch, frozen) -> (state, metrics)`;
    `frozen`: parameters the objective reads but never updates (None: none).

    A non-finite loss or gradient leaves the state unchanged (metrics["finite"] is
    False) so the caller can stop with the last good parameters intact.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads, tokens, accuracy = loss_and_grads(objective, state.params, frozen, batch, key,
                                                   accum_steps)
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
