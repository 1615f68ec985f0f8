"""Training run directories, read-only: the run config, each stage's ModelConfig and mesh,
the run's corpus, the parameters of one checkpoint.

    config, model_config, params, step, stage = read_run("runs/quickstart")      # latest
    read_run("runs/quickstart", step=200)

A run directory (`python -m lctx.train`) holds `config.json` (the run config) and
checkpoints (default `<run>/checkpoints`, else `checkpoint.directory`): Orbax step
directories with items `state` (params, opt_state, step, rng) and `meta` (JSON:
stage name and index, ...). Only `state.params` is read, onto the host, so loading
needs neither the optimizer nor the mesh the run trained on. Training writes this
layout (lctx.training.checkpoint) and resolves stage model configs here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from lctx import data as ld
from lctx import model as lm
from lctx import parallel
from lctx.cli import cause

__all__ = ["RUN_CONFIG", "RunCheckpoint", "checkpoint_directory", "is_run_dir",
           "model_overrides", "open_run_corpus", "read_run", "read_run_config",
           "stage_mesh_shape", "stage_model_config"]

RUN_CONFIG = "config.json"


class RunCheckpoint(NamedTuple):
    config: ConfigDict  # the run config
    model_config: lm.ModelConfig  # the checkpoint's stage
    params: Any  # host NumPy arrays
    step: int
    stage: str


def as_dict(value: Any) -> dict:
    """A ConfigDict, mapping or None as a plain dict."""
    if value is None:
        return {}
    return value.to_dict() if isinstance(value, ConfigDict) else dict(value)


def model_overrides(config: ConfigDict, stage_name: str) -> dict[str, Any]:
    """The ModelConfig overrides of a stage: config.model, then the stage's model and rope_scaling."""
    values = as_dict(config.model)
    values.update(as_dict(config.stages[stage_name].get("model")))
    values.pop("preset", None)
    values = {k: v for k, v in values.items() if v is not None}
    values["attention_options"] = dict(values.get("attention_options", {}))
    scaling = config.stages[stage_name].get("rope_scaling")
    if scaling is not None:
        values["rope_scaling"] = as_dict(scaling)
    return values


def stage_model_config(config: ConfigDict, stage_name: str) -> lm.ModelConfig:
    """The validated ModelConfig a stage trains."""
    preset = as_dict(config.stages[stage_name].get("model")).get("preset", config.model.preset)
    return lm.preset(preset, **model_overrides(config, stage_name))


def stage_mesh_shape(config: ConfigDict, stage_name: str, num_devices: int) -> dict[str, int]:
    """Mesh sizes of a stage with -1 filled from the device count (may not match: validate)."""
    sizes = {**as_dict(config.mesh), **as_dict(config.stages[stage_name].get("mesh"))}
    known = math.prod(v for v in sizes.values() if v != -1)
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) == 1 and known > 0 and num_devices % known == 0:
        sizes[fill[0]] = num_devices // known
    return sizes


def open_run_corpus(config: ConfigDict, run_dir: str) -> Any:
    """The run's corpus (an lctx.data.Corpus), built once into the TFDS data dir; its manifest
    recorded in the run."""
    d = config.data
    data_dir = d.tfds_data_dir or os.path.join(os.path.dirname(run_dir), "tfds")
    # Process 0 builds first: processes sharing a disk must not build one dataset at once.
    corpus = parallel.distributed.run_on_process_zero_first(lambda: ld.open_corpus(
        data_dir=data_dir, corpus_dir=d.corpus_dir or "stdlib", tfds_name=d.tfds_name,
        validation_fraction=d.validation_fraction,
        dedup=ld.DedupOptions(exact=d.dedup in ("exact", "near"), near=d.dedup == "near")), "corpus")
    if corpus.manifest is not None and jax.process_index() == 0:
        corpus.manifest.write(os.path.join(run_dir, "corpus_manifest.json"))
        print(corpus.summary(), file=sys.stderr)
    return corpus


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a run directory (its config.json is a run config, not a HF one)."""
    file = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(file):
        return False
    try:
        with open(file) as f:
            return "stage_order" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples (ConfigDict fields such as stage_order are tuples)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_run_config(run_dir: str | os.PathLike) -> ConfigDict:
    """The run config a run directory recorded; ValueError when there is none."""
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"workdir={str(run_dir)!r}: no {RUN_CONFIG}; expected a run directory of "
                         "python -m lctx.train")
    with open(path) as f:
        return ConfigDict(_tuples(json.load(f)))


def checkpoint_directory(config: ConfigDict, run_dir: str | os.PathLike) -> str:
    """Where the run's checkpoints live (absolute unless a URL such as gs://)."""
    directory = config.checkpoint.get("directory", "") or os.path.join(run_dir, "checkpoints")
    return directory if "://" in directory else os.path.abspath(directory)


@contextlib.contextmanager
def orbax_quietly():
    """Orbax logs (through absl) the damaged files it meets, then raises or skips them; lctx
    reports them once, in one line."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_log.setLevel(level)


def drop_stale_orbax_callbacks() -> None:
    """After a failed restore, orbax's reads still in flight complete into its event loop,
    already closed, and each prints "Event loop is closed" as an unraisable error (a
    traceback on stderr, also at exit). They are harmless: the failure itself is reported
    once. Installed before any restore, since they may arrive before it raises."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_stale_orbax_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_stale_orbax_callbacks = True
    sys.unraisablehook = hook


def _host_params(abstract: Mapping[str, Any]) -> tuple[Any, Any]:
    """(target tree, restore args) that read params as host NumPy arrays."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract)
    args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), abstract)
    return target, args


def _restore(manager: Any, where: str, **items: Any) -> Any:
    """One Orbax restore of `items` at the step directory `where`; one-line ValueError if it fails."""
    import orbax.checkpoint as ocp

    try:
        with orbax_quietly():
            return manager.restore(int(os.path.basename(where)), args=ocp.args.Composite(**items))
    except Exception as err:  # orbax / tensorstore raise many kinds for damaged files
        raise ValueError(f"checkpoint {where} could not be restored ({', '.join(items)}: "
                         f"{cause(err)}); it is truncated, corrupt or of another model") from None


def read_run(run_dir: str | os.PathLike, step: int | None = None) -> RunCheckpoint:
    """The parameters of a run's checkpoint `step` (default the latest) with its stage's config.

    Raises ValueError: no run config, no checkpoints, or no checkpoint `step`.
    """
    import orbax.checkpoint as ocp

    config = read_run_config(run_dir)
    if config.get("beacon") and config.beacon.get("ratios"):
        raise ValueError(f"workdir={str(run_dir)!r}: an activation-beacon run, whose checkpoints "
                         f"hold the beacon module, not a model: load init_from "
                         f"({config.init_from}) with kv_cache='beacon:ratio=R,chunk="
                         f"{config.beacon.chunk},params={os.path.join(run_dir, 'beacon.msgpack')}'")
    directory = checkpoint_directory(config, run_dir)
    drop_stale_orbax_callbacks()
    manager = None
    if os.path.isdir(directory) or "://" in directory:
        with orbax_quietly():  # it reads each step's metadata, damaged or not
            manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
                create=False))
    try:
        with orbax_quietly():
            steps = sorted(manager.all_steps()) if manager else []
        if not steps:
            raise ValueError(f"workdir={str(run_dir)!r}: no checkpoints in {directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"step={step}: no such checkpoint in {directory}; available: {steps}")
        where = os.path.join(directory, str(step))
        meta = _restore(manager, where, meta=ocp.args.JsonRestore())["meta"]
        model_config = stage_model_config(config, config.stage_order[meta["stage_index"]])
        target, restore_args = _host_params(nn.meta.unbox(lm.abstract_params(model_config)))
        state = _restore(manager, where, state=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args},
            partial_restore=True))["state"]
    finally:
        if manager is not None:
            manager.close()
    return RunCheckpoint(config, model_config, state["params"], int(step), meta["stage"])
