"""The stage loop: pretrain short, then extend, with exact resume.

`run(config)` trains every stage in `config.stage_order`. A stage starts from the
previous stage's final parameters (optimizer state fresh or carried). Checkpoints
record the stage, the step within it and the data iterator's position, so rerunning
the same command after a crash or preemption continues with the same batches and,
on CPU, bitwise the same losses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict
from tqdm import tqdm

from lctx import data as ld
from lctx import model as lm
from lctx import parallel
from lctx.convert.run import open_run_corpus
from lctx.eval.api import evaluate_model, format_table
from lctx.model import beacon as bc
from lctx.models import Model, SourceError, load
from lctx.training import config as cfg
from lctx.training.checkpoint import Checkpointer
from lctx.training.metrics import MetricsWriter, plot_loss_curve
from lctx.training.optim import learning_rate_schedule, make_optimizer
from lctx.training.step import TrainState, beacon_objective, lm_objective, train_step

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, data that does not fit the model)."""


@dataclasses.dataclass
class Stage:
    """Everything compiled for one stage."""

    name: str
    index: int
    first_global_step: int
    settings: ConfigDict
    model_config: lm.ModelConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_params: Any  # the trainable tree: the model's, or a beacon module's
    state_shardings: Any
    frozen_shardings: Any  # the frozen model's params (beacon runs), else None
    batch_sharding: NamedSharding
    step_fn: Callable  # (state, batch, frozen params or None) -> (state, metrics)

    @property
    def steps(self) -> int:
        return self.settings.steps


# ----------------------------------------------------------------------------- setup


def _build_stage(config: ConfigDict, index: int) -> Stage:
    name = config.stage_order[index]
    settings = config.stages[name]
    model_config = cfg.model_config(config, name)
    sizes = cfg.mesh_shape(config, name, jax.device_count())
    mesh = parallel.make_mesh(**sizes)
    schedule = learning_rate_schedule(settings.learning_rate, settings.steps, settings.warmup_steps,
                                      settings.schedule, settings.final_lr_fraction)
    o = config.optimizer
    tx = make_optimizer(learning_rate=schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                        eps=o.eps, clip_norm=o.clip_norm,
                        decay_norms_and_embeddings=o.decay_norms_and_embeddings)
    param_sh = lm.param_shardings(model_config, mesh)
    replicated = NamedSharding(mesh, P())
    if cfg.trains_beacons(config):
        abstract_params = jax.eval_shape(lambda p: bc.init_beacon(model_config, p),
                                         _unboxed_abstract(model_config))
        frozen_sh, param_sh = param_sh, {"embedding": replicated, "attn": param_sh["layers"]["attn"]}
        objective = beacon_objective(model_config, chunk=config.beacon.chunk,
                                     ratios=tuple(config.beacon.ratios))
    else:
        abstract_params, frozen_sh = _unboxed_abstract(model_config), None
        objective = lm_objective(model_config, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    state_sh = TrainState(params=param_sh, opt_state=opt_sh, step=replicated, rng=replicated)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    batch_sh = NamedSharding(mesh, P(batch_axes, None))
    step = jax.jit(
        lambda state, batch, frozen: train_step(state, batch, frozen, objective=objective, tx=tx,
                                                schedule=schedule,
                                                accum_steps=settings.grad_accum_steps),
        in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, None),
        donate_argnums=(0,))
    first = sum(config.stages[n].steps for n in config.stage_order[:index])
    return Stage(name, index, first, settings, model_config, mesh, tx, schedule, abstract_params,
                 state_sh, frozen_sh, batch_sh, step)


def _unboxed_abstract(model_config: lm.ModelConfig) -> Any:
    return nn.meta.unbox(lm.abstract_params(model_config))


def _abstract_state(stage: Stage) -> TrainState:
    params = stage.abstract_params
    abstract = TrainState(params=params, opt_state=jax.eval_shape(stage.tx.init, params),
                          step=jax.ShapeDtypeStruct((), jnp.int32),
                          rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, stage.state_shardings)


def _load_base(config: ConfigDict) -> Model | None:
    """The init_from model (lctx.load), or None for a run from random weights."""
    if not config.init_from:
        return None
    try:
        return load(config.init_from)
    except SourceError as err:
        raise TrainingError(f"init_from={config.init_from!r}: {err}") from None


def _check_base(config: ConfigDict, base: Model, stage: Stage) -> None:
    """The model config must describe the weights init_from holds."""
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "mlp_dim", "norm_eps", "tie_embeddings"):
        have, want = getattr(base.config, field), getattr(stage.model_config, field)
        if have != want and not (isinstance(want, float) and math.isclose(have, want, rel_tol=1e-6)):
            raise TrainingError(f"init_from={config.init_from!r}: {field}={have} but the model "
                                f"has {want}")


def _frozen_params(base: Model | None, stage: Stage) -> Any:
    """The frozen model's params on the stage's mesh (beacon runs), else None."""
    if stage.frozen_shardings is None:
        return None
    return jax.device_put(base.params, stage.frozen_shardings)  # validated: init_from is set


def _initial_params(config: ConfigDict, stage: Stage, base: Model | None) -> Any:
    if base is None:
        return lm.init(stage.model_config, jax.random.key(config.seed), mesh=stage.mesh)
    _check_base(config, base, stage)
    if cfg.trains_beacons(config):
        return jax.device_put(bc.init_beacon(stage.model_config, base.params),
                              stage.state_shardings.params)
    return jax.device_put(base.params, stage.state_shardings.params)


def _fresh_state(stage: Stage, params: Any, seed: int, opt_state: Any = None) -> TrainState:
    params = jax.device_put(params, stage.state_shardings.params)
    if opt_state is None:
        opt_state = jax.jit(stage.tx.init, out_shardings=stage.state_shardings.opt_state)(params)
    else:
        opt_state = jax.device_put(opt_state, stage.state_shardings.opt_state)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1 + stage.index))
    step, rng = jax.device_put((jnp.int32(0), rng), (stage.state_shardings.step, stage.state_shardings.rng))
    return TrainState(params=params, opt_state=opt_state, step=step, rng=rng)


# ----------------------------------------------------------------------------- data


def _check_tokenizer(tokenizer: ld.Tokenizer, stage: Stage) -> None:
    if tokenizer.vocab_size > stage.model_config.vocab_size:
        raise TrainingError(f"data.tokenizer has {tokenizer.vocab_size} ids but the model's "
                            f"vocab_size is {stage.model_config.vocab_size}")


@dataclasses.dataclass
class _ProcessBatches:
    """This process's rows of every global batch: data shard `shard_index` of `shard_count`."""

    iterator: Iterator
    shard_index: int
    shard_count: int

    def __iter__(self) -> "_ProcessBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def states(self) -> list[Any]:
        """Every shard's iterator state (collective: all processes call it together)."""
        return parallel.distributed.gather_shard_states(self.iterator.get_state(), self.shard_index,
                                                        self.shard_count)


def _train_batches(config: ConfigDict, corpus: ld.Corpus, tokenizer: ld.Tokenizer, stage: Stage,
                   data_states: list | None) -> _ProcessBatches:
    """The stage's batches for this process's devices, continuing from `data_states` (one per shard)."""
    s = stage.settings
    index, count = parallel.distributed.process_data_shard(stage.batch_sharding,
                                                           (s.batch_size, s.seq_len))
    dataset = ld.make_dataset(corpus.splits["train"], tokenizer, seq_len=s.seq_len,
                              batch_size=s.batch_size // count, seed=config.seed + stage.index,
                              shard_index=index, shard_count=count,
                              text_key=corpus.text_key, min_doc_len=s.min_doc_len,
                              mix=ld.synthetic.Mix.from_config(config.data.mix),
                              whole_docs=config.data.whole_docs)
    iterator = iter(dataset)
    if data_states is not None:
        if len(data_states) != count:
            raise TrainingError(
                f"the checkpoint's data position is for {len(data_states)} data shard(s) (one per "
                f"data-parallel block of processes) but this run has {count} ({jax.process_count()} "
                f"processes, mesh {dict(stage.mesh.shape)}); resume with the process count and mesh "
                "it was written with, or start a new workdir")
        iterator.set_state(data_states[index])
    return _ProcessBatches(iterator, index, count)


def _to_device(batch: dict[str, np.ndarray], stage: Stage) -> dict[str, jax.Array]:
    """Global arrays `[batch_size, seq_len]` from this process's rows."""
    batch = {k: batch[k] for k in ld.BATCH_KEYS}
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
    return parallel.distributed.process_batch(stage.batch_sharding, batch, stage.settings.batch_size)


# ----------------------------------------------------------------------------- signals


class _StopRequest:
    """Turns SIGTERM / SIGINT (TPU preemption, Ctrl-C) into a checkpoint and a clean exit.

    One process: Python signal handlers. Several: SIGTERM on any host reaches JAX's
    preemption service (started with jax.distributed, which a Python handler would
    displace), and Orbax's preemption sync point makes every host stop and save at
    the same step.
    """

    def __init__(self, checkpointer: Checkpointer):
        self.signum: int | None = None
        self._previous = {}
        self._checkpointer = checkpointer
        self._synced = jax.process_count() > 1

    def __enter__(self):
        for sig in () if self._synced else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def requested(self, global_step: int) -> bool:
        """Whether to save and stop after `global_step` (every process calls it every step)."""
        if self._synced and self.signum is None and self._checkpointer.reached_preemption(global_step):
            self.signum = signal.SIGTERM
        return self.signum is not None

    def _handle(self, signum, _frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the loop


def _meta(config: ConfigDict, stage: Stage, stage_step: int, data_states: list[Any]) -> dict[str, Any]:
    return {"stage": stage.name, "stage_index": stage.index, "stage_step": stage_step,
            "data_states": data_states, "config": cfg.describe(config)}


def _progress(stage: Stage, start: int):
    return tqdm(total=stage.steps, initial=start, desc=f"{stage.name} (seq {stage.settings.seq_len})",
                unit="step", disable=jax.process_index() != 0, dynamic_ncols=True,
                file=sys.stderr)


def _train_stage(config: ConfigDict, stage: Stage, state: TrainState, frozen: Any,
                 batches: _ProcessBatches, checkpointer: Checkpointer, writer: MetricsWriter,
                 stop: _StopRequest, first_step: int) -> tuple[TrainState, dict[str, float], bool]:
    """Runs a stage from `first_step`; returns (state, stage stats, stopped_by_signal)."""
    s = stage.settings
    tokens_per_step = s.batch_size * s.seq_len
    bar = _progress(stage, first_step)
    losses, start_time, timed_steps = [], None, 0
    interval_start, interval_steps = time.time(), 0
    for stage_step in range(first_step, stage.steps):
        batch = _to_device(next(batches), stage)
        state, metrics = stage.step_fn(state, batch, frozen)
        global_step = stage.first_global_step + stage_step + 1
        if not bool(metrics["finite"]):
            bar.close()
            raise TrainingError(
                f"non-finite loss or gradient at stage {stage.name!r} step {stage_step + 1} "
                f"(loss {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}); "
                f"the last good checkpoint in {checkpointer.directory} is kept")
        loss = float(metrics["loss"])
        losses.append(loss)
        if start_time is None:  # exclude the first step (compilation) from throughput
            start_time = time.time()
        else:
            timed_steps += 1
        interval_steps += 1
        done = stage_step + 1
        if done % config.log_every_steps == 0 or done == stage.steps:
            elapsed = max(time.time() - interval_start, 1e-9)
            tps = interval_steps * tokens_per_step / elapsed
            writer.write({"stage": stage.name, "step": done, "global_step": global_step,
                          "loss": loss, "lr": float(metrics["lr"]),
                          "grad_norm": float(metrics["grad_norm"]),
                          "accuracy": float(metrics["accuracy"]), "tokens_per_sec": round(tps, 1)},
                         global_step)
            interval_start, interval_steps = time.time(), 0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        stage_done = done == stage.steps
        stopping = stop.requested(global_step)
        if stage_done or checkpointer.due(global_step) or stopping:
            checkpointer.save(global_step, state, _meta(config, stage, done, batches.states()))
        if stopping and not stage_done:
            bar.close()
            return state, {}, True
    bar.close()
    elapsed = time.time() - start_time if start_time else 0.0
    stats = {"final_loss": losses[-1] if losses else float("nan"),
             "tokens_per_sec": timed_steps * tokens_per_step / elapsed if elapsed > 0 else float("nan")}
    return state, stats, False


def _resume(checkpointer: Checkpointer, config: ConfigDict, stages: dict[int, Stage]):
    """(stage index, stage step, data state, state) from the latest good checkpoint, or None."""
    def abstract_for(meta):
        index = meta["stage_index"]
        if index not in stages:
            stages[index] = _build_stage(config, index)
        return _abstract_state(stages[index])

    found = checkpointer.restore_latest(abstract_for)
    if found is None:
        return None
    step, meta, state = found
    names = tuple(config.stage_order)
    if meta["stage_index"] >= len(names) or names[meta["stage_index"]] != meta["stage"]:
        raise TrainingError(f"checkpoint {step} in {checkpointer.directory} is from stage "
                            f"{meta['stage']!r}, which is not stage {meta['stage_index']} of "
                            f"stage_order={names}; use a new workdir for a different recipe")
    log.info("resuming from checkpoint %d: stage %s step %d", step, meta["stage"], meta["stage_step"])
    return meta["stage_index"], meta["stage_step"], meta["data_states"], state


def run(config: ConfigDict) -> dict[str, Any]:
    """Trains every stage of `config` (validated beforehand); returns the run summary."""
    run_dir = os.path.abspath(cfg.workdir(config))
    os.makedirs(run_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg.describe(config), f, indent=1, default=str)

    corpus = open_run_corpus(config, run_dir)
    base = _load_base(config)
    tokenizer = _tokenizer(config, base)
    checkpointer = Checkpointer(config.checkpoint.directory or os.path.join(run_dir, "checkpoints"),
                                every_steps=config.checkpoint.every_steps,
                                keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    writer = MetricsWriter(run_dir)
    stages: dict[int, Stage] = {}
    summary: dict[str, Any] = {"run_dir": run_dir, "corpus": corpus.name, "stages": {}}
    failed = True
    try:
        resumed = _resume(checkpointer, config, stages)
        state = None
        with _StopRequest(checkpointer) as stop:
            for index, name in enumerate(config.stage_order):
                if resumed is not None and index < resumed[0]:
                    continue
                stage = stages.get(index) or _build_stage(config, index)
                stages[index] = stage
                _check_tokenizer(tokenizer, stage)
                first_step, data_states = 0, None
                if resumed is not None and index == resumed[0]:
                    _, first_step, data_states, state = resumed
                    resumed = None
                elif state is None:
                    state = _fresh_state(stage, _initial_params(config, stage, base), config.seed)
                else:
                    carry = stage.settings.optimizer_state == "carry"
                    state = _fresh_state(stage, state.params, config.seed,
                                         state.opt_state if carry else None)
                if first_step >= stage.steps:
                    summary["stages"][name] = {"resumed_complete": True}
                    continue
                batches = _train_batches(config, corpus, tokenizer, stage, data_states)
                frozen = _frozen_params(base, stage)
                state, stats, stopped = _train_stage(config, stage, state, frozen, batches,
                                                     checkpointer, writer, stop, first_step)
                if stopped:
                    checkpointer.wait()
                    name_of = signal.Signals(stop.signum).name
                    print(f"lctx.train: {name_of} received; checkpoint saved in "
                          f"{checkpointer.directory}; rerun the same command to resume",
                          file=sys.stderr)
                    summary["interrupted"] = name_of
                    failed = False
                    return summary
                summary["stages"][name] = stats
        checkpointer.wait()
        summary["loss_curve"] = plot_loss_curve(run_dir, tuple(config.stage_order))
        final = stages[len(config.stage_order) - 1]
        if cfg.trains_beacons(config):
            module = _write_beacon_module(run_dir, state.params)
            summary["beacon_module"] = module
            summary["eval"] = evaluate_run(config, corpus, tokenizer, final.model_config,
                                           _frozen_params(base, final), final.mesh,
                                           beacon_module=module)
        else:
            summary["eval"] = evaluate_run(config, corpus, tokenizer, final.model_config,
                                           state.params, final.mesh)
        failed = False
    finally:
        if not (failed and jax.process_count() > 1):  # a failed peer would hold the close barrier
            checkpointer.close()
        writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)
    return summary


def _tokenizer(config: ConfigDict, base: Model | None) -> ld.Tokenizer:
    if config.data.tokenizer != "model":
        return ld.make_tokenizer(config.data.tokenizer)
    if base is None or base.tokenizer is None:
        raise TrainingError(f"data.tokenizer='model': init_from={config.init_from!r} carries no "
                            "tokenizer; give a tokenizer file")
    return base.tokenizer


def _write_beacon_module(run_dir: str, module: Any) -> str:
    """RUN/beacon.msgpack, the trained module alone (kv_cache="beacon:...,params=FILE"),
    written whole or not at all (a temporary file renamed)."""
    path = os.path.join(run_dir, "beacon.msgpack")
    if jax.process_index() == 0:
        data = flax.serialization.to_bytes(jax.device_get(module))
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return path


def _with_module(spec: str, module: str) -> str:
    """A beacon spec that names no params= reads the module this run trained."""
    if not module or "params=" in spec:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}params={module}"


def evaluate_run(config: ConfigDict, corpus: ld.Corpus, tokenizer: ld.Tokenizer,
                 model_config: lm.ModelConfig, params: Any, mesh: Mesh | None = None,
                 beacon_module: str = "") -> dict[str, Any]:
    """The config's `eval.tasks` at `eval.lengths` (lctx.eval), written to RUN/eval/;
    retrieval through `eval.kv_cache`; a beacon run (`beacon_module`, its file) reads
    everything through the beacons.

    Returns {"lengths": perplexity and bits per byte per length, "unigram_bits_per_byte",
    and each retrieval task's accuracy per length and effective lengths when evaluated}.
    """
    e = config.eval
    held_out = corpus.splits["validation"]
    results = evaluate_model(
        model_config, params, tokenizer, held_out, text_key=corpus.text_key,
        tasks=tuple(e.tasks), lengths=tuple(e.lengths),
        out_dir=os.path.join(cfg.workdir(config), "eval") if jax.process_index() == 0 else None,
        training_lengths=[config.stages[n].seq_len for n in config.stage_order],
        label=config.name, progress=jax.process_index() == 0,
        mesh=mesh if model_config.sequence_parallel else None,
        stride=e.stride, max_tokens=e.max_tokens, batch_size=e.batch_size,
        depths=tuple(e.depths), trials=e.trials, seed=e.seed,
        kv_cache=_with_module(e.kv_cache, beacon_module))
    summary: dict[str, Any] = {"lengths": results.get("ppl", {})}
    retrieval = [t for t in e.tasks if isinstance(results.get(t), dict)
                 and "effective_length" in results[t]]
    if jax.process_index() == 0 and retrieval:
        print(f"evaluation ({os.path.join(cfg.workdir(config), 'eval', 'results.json')}):\n"
              f"{format_table(results)}")
    for task in retrieval:
        summary[task] = {"accuracy": results[task]["accuracy"],
                         "effective_length": results[task]["effective_length"]}
    texts = lambda split: (split[i][corpus.text_key] for i in range(len(split)))
    summary["unigram_bits_per_byte"] = ld.unigram_bits_per_byte(
        texts(corpus.splits["train"]), texts(held_out), tokenizer)
    return summary

