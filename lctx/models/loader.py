"""`load(source)`: the one way to get a model, whatever it was saved as.

Sources, tried in this order:
  RUN@STEP                    checkpoint STEP of a training run directory
  a registered name           e.g. "smollm2-135m": a GGUF file in a pip package (sha256-checked)
  FILE.gguf                   llama.cpp GGUF, llama architecture, any tensor type gguf reads
  an lctx checkpoint dir      model_config.json + params/ (+ tokenizer.json when written)
  a training run directory    config.json with stage_order: its latest checkpoint
  a Hugging Face LLaMA dir    config.json + safetensors (+ tokenizer.json)

Every failure to resolve or read a source raises SourceError (a ValueError) with one
line; command-line tools turn it into exit status 2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lctx.convert.checkpoint import CONFIG_FILE, load_checkpoint
from lctx.convert.gguf import GGUFFile, load_gguf, tokenizer_from_gguf
from lctx.convert.hf import load_llama
from lctx.convert.run import is_run_dir, read_run
from lctx.data.tokenizer import HuggingFaceTokenizer, Tokenizer, make_tokenizer
from lctx.models.model import Model, place_params, with_rope_scaling
from lctx.models.registry import REGISTRY, SourceError, registered_file

__all__ = ["load"]

_GGUF_MAGIC = b"GGUF"
_SOURCES = ("a registered name, a .gguf file, an lctx checkpoint directory, a training run "
            "directory (RUN or RUN@STEP) or a Hugging Face LLaMA directory")


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _dir_tokenizer(directory: Path) -> Tokenizer | None:
    """The tokenizer.json (+ tokenizer_config.json) a model directory carries, if any."""
    has_one = (directory / "tokenizer.json").is_file()
    return HuggingFaceTokenizer(str(directory)) if has_one else None


def _from_gguf(path: Path) -> dict[str, Any]:
    file = GGUFFile(path)
    config, params = load_gguf(file)
    return dict(config=config, params=params, tokenizer=tokenizer_from_gguf(file))


def _from_run(run_dir: str, step: int | None) -> dict[str, Any]:
    found = read_run(run_dir, step)
    spec = found.config.data.tokenizer
    # "model": the run started from init_from and kept its tokenizer
    tokenizer = _tokenizer_of(found.config.init_from) if spec == "model" else make_tokenizer(spec)
    return dict(config=found.model_config, params=found.params, tokenizer=tokenizer,
                step=found.step, stage=found.stage)


def _tokenizer_of(source: str) -> Tokenizer | None:
    """The tokenizer `source` carries, read without its weights where the format allows."""
    path = registered_file(source) if source in REGISTRY else Path(source).expanduser()
    if path.is_file():
        return tokenizer_from_gguf(GGUFFile(path))
    if path.is_dir() and not is_run_dir(path):
        return _dir_tokenizer(path)
    return _resolve(source)["tokenizer"]


def _from_checkpoint(directory: Path) -> dict[str, Any]:
    config, params = load_checkpoint(directory)
    return dict(config=config, params=params, tokenizer=_dir_tokenizer(directory))


def _from_hf(directory: Path) -> dict[str, Any]:
    config, params = load_llama(directory)
    return dict(config=config, params=params, tokenizer=_dir_tokenizer(directory))


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _resolve(source: str) -> dict[str, Any]:
    """Config, host params, tokenizer (and step / stage for runs) of `source`."""
    run, at, step = source.rpartition("@")
    if at and step.isdigit() and is_run_dir(run):
        return _from_run(run, int(step))
    if source in REGISTRY:
        return _from_gguf(registered_file(source))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _is_gguf(path):
            return _from_gguf(path)
        raise SourceError(f"{source}: a file, but not a .gguf file; expected {_SOURCES}")
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return _from_checkpoint(path)
        if is_run_dir(path):
            return _from_run(str(path), None)
        if (path / "config.json").is_file():
            return _from_hf(path)
        raise SourceError(f"{source}: a directory without model_config.json or config.json; "
                          f"expected {_SOURCES}")
    if os.sep not in source and not path.suffix:
        raise SourceError(f"unknown model {source!r}; known names: {', '.join(sorted(REGISTRY))} "
                          f"(or give {_SOURCES})")
    raise SourceError(f"{source}: no such file or directory; expected {_SOURCES}")


def load(source: str | os.PathLike, *, rope_scaling: Mapping[str, Any] | None = None,
         dtype: str | None = None) -> Model:
    """The model `source` names (module docstring), params on the default device.

    rope_scaling: an HF-style dict (e.g. {"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 8192}) replacing the model's own RoPE scaling,
    on the model's rope_theta; None keeps the model's. dtype: parameter and compute
    dtype ("float32", "bfloat16", "float16"); None keeps the source's (GGUF: float32).
    Raises SourceError (one line) when the source cannot be found or read.
    """
    source = os.fspath(source)
    try:
        found = _resolve(source)
    except SourceError:
        raise
    except (ValueError, OSError) as err:
        raise SourceError(_one_line(err)) from None
    config = found.pop("config")
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=dtype).validate()
    if rope_scaling is not None:
        config = with_rope_scaling(config, rope_scaling)
    params = place_params(config, found.pop("params"), None)
    return Model(config=config, params=params, source=source, **found)
