"""Activation beacons on SmolLM2-135M: measure the module `lctx.train` trained.

    python -m lctx.train --config=configs/beacon_smollm2.py --config.workdir=experiments/beacons/run
    python experiments/beacons/run.py --budget_min=20   # cells not yet done
    python experiments/beacons/report.py                # table.md and the PNG

Training is configs/beacon_smollm2.py (only the beacon module in the optimizer, the
ratio drawn per chunk from 2, 4, 8, 16); its run directory RUN (default
experiments/beacons/run) holds the module (RUN/beacon.msgpack) and metrics.jsonl.

One cell per (setting, length) in cells/. Perplexity of held-out standard-library
code: the full model, beacons at ratio r before and after training, and at equal memory
(the slots the beacon cache holds on its last chunk) sink_window and snapkv streamed
through the cache as in experiments/kv_cache. Passkey at five depths through the full
cache, beacons (trained at ratios 4, 8, 16; untrained at 8), sink_window and snapkv at
equal memory; prefill and decode time through lctx.generate, full cache against beacons.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

import lctx
from lctx.data.corpus import VALIDATION_FRACTION, iter_texts, stdlib_spec
from lctx.eval.api import evaluate_model, held_out_documents
from lctx.generate import stream_tokens
from lctx.infer.generate import new_cache
from lctx.model import beacon as bc

HERE = Path(__file__).resolve().parent
CELLS, RUN = HERE / "cells", HERE / "run"
CHUNK = 1024
EVAL_LENGTHS, EVAL_RATIOS = (4096, 8192), (4, 8, 16)
LONG = 16384  # past SmolLM2's 8K
SPEED_LENGTHS, SPEED_SETTINGS, DECODE_STEPS = (8192, 16384), ("full", "beacon8"), 16
STREAM_CHUNK = 128
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _kv_cache_study():
    """experiments/kv_cache/run.py, for its streaming scorer (one definition of it)."""
    path = HERE.parent / "kv_cache" / "run.py"
    spec = importlib.util.spec_from_file_location("kv_cache_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def token_stream(tokenizer, split: str, tokens: int) -> np.ndarray:
    """The split's standard-library files in path order, concatenated, cut to `tokens`."""
    ids: list[int] = []
    for _, text in sorted(iter_texts(stdlib_spec(), split, VALIDATION_FRACTION)):
        ids.extend(tokenizer.encode(text + "\n\n"))
        if len(ids) >= tokens:
            break
    return np.asarray(ids[:tokens], np.int32)


def trained_steps(run: Path) -> int:
    """Optimizer steps the run's module has taken (its metrics.jsonl)."""
    with open(run / "metrics.jsonl") as f:
        return max(json.loads(line)["step"] for line in f if '"loss"' in line)


def settings() -> list[str]:
    out = ["full"]
    for r in EVAL_RATIOS:
        out += [f"beacon{r}_untrained", f"beacon{r}", f"sink_window{r}", f"snapkv{r}"]
    return out


@functools.partial(jax.jit, static_argnums=(0, 4))
def _beacon_nll(config, params, beacon, tokens, ratio):
    return bc.beacon_nll(config, params, beacon, tokens, chunk=CHUNK, ratio=ratio)


def eval_cell(model, name: str, length: int, text: np.ndarray, beacons: dict) -> dict:
    tokens = jnp.asarray(text[None, :length])
    if name == "full" or name.startswith(("sink_window", "snapkv")):
        study = _kv_cache_study()
        # Equal memory, less the streamed chunk the cache also holds.
        spec = cache_spec(name, length, Path(), held=STREAM_CHUNK)
        cache = new_cache(model.config, spec, batch=1, tokens=length, chunk=STREAM_CHUNK)
        nll, _ = study._chunked_scores(model.config, model.params, tokens,
                                       jnp.asarray(text[None, 1:length + 1]), (cache,), STREAM_CHUNK)
        nll, nbytes = np.asarray(nll[0][:-1]), cache.nbytes()
    else:
        beacon, ratio = beacons["untrained" if name.endswith("untrained") else "trained"], ratio_of(name)
        nll = np.asarray(_beacon_nll(model.config, model.params, beacon, tokens, ratio)[0])
        # float32 keys and values of every slot the beacon cache holds on its last chunk
        nbytes = 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim \
            * 4 * beacon_slots(length, ratio)
    return {"ppl": float(np.exp(nll.mean())), "kv_bytes": int(nbytes)}


# Passkey settings, most telling first: the budget takes them in this order per length.
PASSKEY = ("full", "beacon8", "sink_window8", "snapkv8", "beacon8_untrained", "beacon4", "beacon16")


def ratio_of(name: str) -> int:
    return int("".join(ch for ch in name if ch.isdigit()))


def beacon_slots(length: int, ratio: int) -> int:
    """Slots the beacon cache holds on the last chunk of `length` tokens: the past
    chunks' beacons, the raw chunk and its beacons."""
    return (length // CHUNK - 1) * (CHUNK // ratio) + CHUNK + CHUNK // ratio


def cache_spec(name: str, length: int, module: Path, held: int = 0) -> str:
    """The cache spec of a setting: eviction at the beacon cache's memory for the ratio,
    less `held` slots the caller keeps besides (a streamed chunk)."""
    if name == "full":
        return "full"
    ratio = ratio_of(name)
    if name.startswith("beacon"):
        trained = "" if name.endswith("untrained") else f",params={module}"
        return f"beacon:ratio={ratio},chunk={CHUNK}{trained}"
    slots = beacon_slots(length, ratio) - held
    if name.startswith("sink_window"):
        return f"sink_window:sinks=4,window={slots - 4}"
    return f"snapkv:budget={slots},window=32,kernel=7"


def passkey_cell(model, name: str, length: int, held_out: list[dict], module: Path) -> dict:
    """Passkey at five depths, prompts read and answered through the setting's cache."""
    spec = cache_spec(name, length, module)
    result = evaluate_model(model.config, model.params, model.tokenizer, held_out,
                            tasks=("passkey",), lengths=(length,), depths=DEPTHS, trials=1,
                            seed=0, prompt_batch=1, kv_cache=spec, progress=False)
    return {"correct": [c["correct"] for c in result["passkey"]["cells"]], "spec": spec}


def speed_cell(model, name: str, length: int, text: np.ndarray, module: Path) -> dict:
    """Seconds to the first token of a `length`-token prompt (prefill) and ms per decoded
    token after it, through lctx.generate's streaming path; the second of two runs (the
    first compiles)."""
    spec = cache_spec(name, length, module)
    for _ in range(2):
        t0 = time.perf_counter()
        steps = stream_tokens(model.config, model.params, text[:length],
                              max_new_tokens=DECODE_STEPS + 1, kv_cache=spec)
        next(steps)
        t1 = time.perf_counter()
        for _ in steps:
            pass
        t2 = time.perf_counter()
    return {"prefill_s": round(t1 - t0, 2), "decode_ms": round((t2 - t1) / DECODE_STEPS * 1e3, 1),
            "spec": spec}


def evaluate(run: Path, budget_min: float) -> int:
    model = lctx.load("smollm2-135m")
    text = token_stream(model.tokenizer, "validation", LONG + 1)
    fresh = bc.init_beacon(model.config, model.params)
    beacons, step = {"untrained": fresh}, 0
    if (run / "beacon.msgpack").exists():
        beacons["trained"] = flax.serialization.from_bytes(fresh, (run / "beacon.msgpack").read_bytes())
        step = trained_steps(run)
    CELLS.mkdir(exist_ok=True)
    began = time.perf_counter()

    def ready(setting: str) -> bool:  # a trained-beacon cell waits for the trained module
        return bool(step) or not setting.startswith(("beacon", "speed_beacon", "passkey_beacon")) \
            or setting.endswith("untrained")

    lengths = (*EVAL_LENGTHS, LONG)
    todo = [(s, n) for n in lengths for s in settings()]
    todo += [(f"speed_{s}", SPEED_LENGTHS[0]) for s in SPEED_SETTINGS]
    todo += [(f"passkey_{s}", n) for s in PASSKEY[:3] for n in lengths]
    todo += [(f"speed_{s}", n) for n in SPEED_LENGTHS[1:] for s in SPEED_SETTINGS]
    todo += [(f"passkey_{s}", n) for s in PASSKEY[3:] for n in EVAL_LENGTHS]
    todo += [(f"passkey_{s}", LONG) for s in PASSKEY[3:]]
    todo = [(s, n) for s, n in todo if ready(s) and not (CELLS / f"{s}__{n}.json").exists()]
    held_out = held_out_documents()
    for name, length in todo:
        if (time.perf_counter() - began) / 60 > budget_min:
            print("budget spent; rerun to continue", flush=True)
            break
        t0 = time.perf_counter()
        if name.startswith("passkey_"):
            result = passkey_cell(model, name.removeprefix("passkey_"), length, held_out,
                                  run / "beacon.msgpack")
        elif name.startswith("speed_"):
            result = speed_cell(model, name.removeprefix("speed_"), length, text,
                                run / "beacon.msgpack")
        else:
            result = eval_cell(model, name, length, text, beacons)
        record = {"setting": name, "length": length, "result": result,
                  "trained_steps": step if "beacon" in name and "untrained" not in name else 0,
                  "wall_s": round(time.perf_counter() - t0, 1)}
        path = CELLS / f"{name}__{length}.json"
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"{name} {length}: {result} ({record['wall_s']} s)", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=RUN, help="the lctx.train run directory")
    parser.add_argument("--budget_min", type=float, default=60.0, help="start no cell after")
    args = parser.parse_args(argv)
    return evaluate(args.run, args.budget_min)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
