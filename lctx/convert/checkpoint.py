"""lctx model checkpoints on disk: orbax parameters + the model config as JSON.

Layout of a checkpoint directory:

    <dir>/model_config.json   ModelConfig fields (rope as a nested object)
    <dir>/params/             orbax StandardCheckpointer tree, lctx's parameter layout
    <dir>/tokenizer.json      optional (with tokenizer_config.json): the model's tokenizer

`python -m lctx.convert` writes and reads this layout; the config JSON is plain
data (no pickles, no code), so any tool can inspect it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lctx.model.config import ModelConfig
from lctx.model.rope import RopeConfig

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "check_new_checkpoint", "config_from_dict",
           "config_to_dict", "load_checkpoint", "save_checkpoint"]

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
Params = dict[str, Any]


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of every ModelConfig field; `config_from_dict` inverts it."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, RopeConfig):
            value = {k: list(v) if isinstance(v, tuple) else v
                     for k, v in dataclasses.asdict(value).items()}
        elif field.name == "attention_options":
            value = dict(value)
        out[field.name] = value
    return out


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A validated ModelConfig from `config_to_dict`'s output; ValueError names unknown keys."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"model config keys {unknown}: not ModelConfig fields; "
                         f"allowed: {sorted(fields)}")
    data = dict(data)
    rope = data.get("rope", {})
    if not isinstance(rope, dict):
        raise ValueError(f"model config rope={rope!r}: must be an object of RoPE parameters")
    rope_fields = {f.name for f in dataclasses.fields(RopeConfig)}
    unknown = sorted(set(rope) - rope_fields)
    if unknown:
        raise ValueError(f"model config rope keys {unknown}: not RopeConfig fields; "
                         f"allowed: {sorted(rope_fields)}")
    data["rope"] = RopeConfig(**rope)
    return ModelConfig(**data).validate()


def check_new_checkpoint(ckpt_dir: str | os.PathLike) -> Path:
    """The absolute checkpoint path; ValueError if it already holds files (never overwritten)."""
    ckpt = Path(ckpt_dir).absolute()  # orbax wants absolute paths
    if (ckpt / PARAMS_DIR).exists():
        raise ValueError(f"{ckpt / PARAMS_DIR}: already exists; choose a new output directory")
    if ckpt.exists() and (not ckpt.is_dir() or any(ckpt.iterdir())):
        raise ValueError(f"{ckpt}: already exists and is not an empty directory; choose a new "
                         "output directory")
    return ckpt


def save_checkpoint(config: ModelConfig, params: Params, ckpt_dir: str | os.PathLike, *,
                    tokenizer: Any = None) -> Path:
    """Writes `params` (orbax), `config` (JSON) and `tokenizer` (anything with `.save(dir)`,
    e.g. a HuggingFaceTokenizer: tokenizer.json + tokenizer_config.json) as ckpt_dir.

    Everything is written into a temporary sibling renamed into place at the end, so a
    failure never leaves a half-written checkpoint. Refuses a non-empty ckpt_dir.
    """
    import orbax.checkpoint as ocp  # heavy; only the CLI paths need it

    ckpt = check_new_checkpoint(ckpt_dir)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    partial = ckpt.parent / f".{ckpt.name}.partial-{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(partial / PARAMS_DIR, params)
        (partial / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(partial)
        if ckpt.exists():
            ckpt.rmdir()  # empty (checked above); rename needs the name free
        partial.rename(ckpt)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ckpt


def load_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """(config, params as host NumPy arrays) of a directory `save_checkpoint` wrote."""
    import orbax.checkpoint as ocp

    ckpt = Path(ckpt_dir).absolute()
    config_path = ckpt / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; expected an lctx checkpoint directory "
                         f"({CONFIG_FILE} + {PARAMS_DIR}/)")
    if not (ckpt / PARAMS_DIR).is_dir():
        raise ValueError(f"{ckpt / PARAMS_DIR}: missing; expected orbax parameters there")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    try:
        config = config_from_dict(data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_path}: " + "; ".join(str(err).splitlines())) from None
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(ckpt / PARAMS_DIR)
    return config, jax.tree.map(np.asarray, jax.device_get(params))
