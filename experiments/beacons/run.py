"""Activation beacons on SmolLM2-135M: train the beacon module on CPU, then measure it.

    python experiments/beacons/run.py train --minutes=30   # resumable; base model frozen
    python experiments/beacons/run.py eval                 # cells not yet done
    python experiments/beacons/report.py                   # table.md and the PNG

train: next-token loss on windows of SEQ_LEN tokens of the standard-library training
split, read CHUNK tokens at a time through the beacons; the ratio is sampled per step
(not per chunk, as the paper does: one compiled step per ratio) from RATIOS. Only the
beacon module has parameters in the optimizer. The checkpoint (ckpt/state.msgpack,
written to a temporary file and renamed) holds the module, the Adam state, the step
and the data position, so a rerun resumes.

eval: one cell per (setting, length) in cells/. Perplexity of held-out standard-library
code: the full model, beacons at ratio r before and after training, and at equal memory
(the slots the beacon cache holds on its last chunk) sink_window and snapkv streamed
through the cache as in experiments/kv_cache. Passkey at five depths through the full
cache, beacons at ratio 8 (trained, untrained) and sink_window at equal memory.
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
import optax

import lctx
from lctx.data.corpus import VALIDATION_FRACTION, iter_texts, stdlib_spec
from lctx.eval.api import evaluate_model, held_out_documents
from lctx.infer.generate import new_cache
from lctx.model import beacon as bc

HERE = Path(__file__).resolve().parent
CELLS, CKPT, TRAIN_LOG = HERE / "cells", HERE / "ckpt" / "state.msgpack", HERE / "train_log.jsonl"
MODULE = HERE / "ckpt" / "beacon.msgpack"  # the module alone: kv_cache="beacon:params=..."
SEQ_LEN, CHUNK, RATIOS = 4096, 1024, (2, 4, 8, 16)
LR, WARMUP = 1e-4, 10
EVAL_LENGTHS, EVAL_RATIOS = (4096, 8192), (4, 8, 16)
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


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def train_step(config, params, beacon, opt_state, tokens, ratio, optimizer):
    loss, grads = jax.value_and_grad(
        lambda b: bc.beacon_loss(config, params, b, tokens, chunk=CHUNK, ratio=ratio))(beacon)
    updates, opt_state = optimizer.update(grads, opt_state, beacon)
    return optax.apply_updates(beacon, updates), opt_state, loss


def make_optimizer() -> optax.GradientTransformation:
    schedule = optax.linear_schedule(0.0, LR, WARMUP)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def _write(path: Path, tree) -> None:
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.to_bytes(tree))
    os.replace(tmp, path)  # a killed run never leaves a half file


def save(state: dict) -> None:
    _write(CKPT, state)
    _write(MODULE, state["beacon"])


def train(minutes: float) -> int:
    model = lctx.load("smollm2-135m")
    optimizer = make_optimizer()
    beacon = bc.init_beacon(model.config, model.params)
    state = {"beacon": beacon, "opt": optimizer.init(beacon), "step": 0}
    if CKPT.exists():
        state = flax.serialization.from_bytes(state, CKPT.read_bytes())
        print(f"resumed at step {int(state['step'])}", flush=True)
    data = token_stream(model.tokenizer, "train", 4_000_000)
    began = time.perf_counter()
    while (time.perf_counter() - began) / 60 < minutes:
        step = int(state["step"])
        rng = np.random.default_rng(step)  # the same windows and ratios after a resume
        start = int(rng.integers(0, len(data) - SEQ_LEN))
        ratio = int(rng.choice(RATIOS))
        tokens = jnp.asarray(data[None, start:start + SEQ_LEN])
        t0 = time.perf_counter()
        beacon, opt, loss = train_step(model.config, model.params, state["beacon"], state["opt"],
                                       tokens, ratio, optimizer)
        state = {"beacon": beacon, "opt": opt, "step": step + 1}
        save(state)
        record = {"step": step + 1, "ratio": ratio, "loss": float(loss),
                  "seconds": round(time.perf_counter() - t0, 1)}
        with open(TRAIN_LOG, "a") as log:  # after the checkpoint: a resume never repeats a line
            log.write(json.dumps(record) + "\n")
        print(record, flush=True)
    return 0


def trained_beacon(model) -> tuple[dict, int]:
    beacon = bc.init_beacon(model.config, model.params)
    optimizer = make_optimizer()
    template = {"beacon": beacon, "opt": optimizer.init(beacon), "step": 0}
    state = flax.serialization.from_bytes(template, CKPT.read_bytes())
    _write(MODULE, state["beacon"])
    return state["beacon"], int(state["step"])


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
    ratio = int("".join(ch for ch in name if ch.isdigit()) or 0)
    if name == "full" or name.startswith(("sink_window", "snapkv")):
        study = _kv_cache_study()
        # Equal memory: the slots the beacon cache holds on its last chunk (past beacons,
        # the raw chunk and its beacons), less the streamed chunk the cache also holds.
        past = (length // CHUNK - 1) * (CHUNK // ratio) if ratio else 0
        budget = past + CHUNK + CHUNK // ratio - STREAM_CHUNK if ratio else length
        spec = {"full": "full", "sink_window": f"sink_window:sinks=4,window={budget - 4}",
                "snapkv": f"snapkv:budget={budget},window=32,kernel=7"}[name.rstrip("0123456789")]
        cache = new_cache(model.config, spec, batch=1, tokens=length, chunk=STREAM_CHUNK)
        nll, _ = study._chunked_scores(model.config, model.params, tokens,
                                       jnp.asarray(text[None, 1:length + 1]), (cache,), STREAM_CHUNK)
        nll, nbytes = np.asarray(nll[0][:-1]), cache.nbytes()
    else:
        beacon = beacons["untrained" if name.endswith("untrained") else "trained"]
        nll = np.asarray(_beacon_nll(model.config, model.params, beacon, tokens, ratio)[0])
        past = (length // CHUNK - 1) * (CHUNK // ratio)  # beacons kept before the last chunk
        # float32 keys and values of past beacons plus the last chunk's tokens and beacons
        nbytes = 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim \
            * 4 * (past + CHUNK + CHUNK // ratio)
    return {"ppl": float(np.exp(nll.mean())), "kv_bytes": int(nbytes)}


PASSKEY = ("full", "beacon8", "beacon8_untrained", "sink_window8")  # at 4K and 8K, 5 depths


def passkey_cell(model, name: str, length: int, held_out: list[dict]) -> dict:
    """Passkey at five depths, prompts read and answered through the setting's cache."""
    ratio = 8
    past = (length // CHUNK - 1) * (CHUNK // ratio)
    spec = {"full": "full",
            "beacon8": f"beacon:ratio={ratio},chunk={CHUNK},params={MODULE}",
            "beacon8_untrained": f"beacon:ratio={ratio},chunk={CHUNK}",
            "sink_window8": f"sink_window:sinks=4,window={past + CHUNK + CHUNK // ratio - 4}"}[name]
    result = evaluate_model(model.config, model.params, model.tokenizer, held_out,
                            tasks=("passkey",), lengths=(length,), depths=DEPTHS, trials=1,
                            seed=0, prompt_batch=1, kv_cache=spec, progress=False)
    return {"correct": [c["correct"] for c in result["passkey"]["cells"]], "spec": spec}


def evaluate(budget_min: float) -> int:
    model = lctx.load("smollm2-135m")
    text = token_stream(model.tokenizer, "validation", max(EVAL_LENGTHS) + 1)
    beacons = {"untrained": bc.init_beacon(model.config, model.params)}
    step = 0
    if CKPT.exists():
        beacons["trained"], step = trained_beacon(model)
    CELLS.mkdir(exist_ok=True)
    began = time.perf_counter()
    todo = [(s, n) for n in EVAL_LENGTHS for s in settings()
            if not (CELLS / f"{s}__{n}.json").exists() and (s.endswith("untrained")
                                                         or not s.startswith("beacon") or step)]
    todo += [(f"passkey_{s}", n) for n in EVAL_LENGTHS for s in PASSKEY
             if not (CELLS / f"passkey_{s}__{n}.json").exists() and (s != "beacon8" or step)]
    held_out = held_out_documents()
    for name, length in todo:
        if (time.perf_counter() - began) / 60 > budget_min:
            print("budget spent; rerun to continue", flush=True)
            break
        t0 = time.perf_counter()
        result = (passkey_cell(model, name.removeprefix("passkey_"), length, held_out)
                  if name.startswith("passkey_") else eval_cell(model, name, length, text, beacons))
        record = {"setting": name, "length": length, "result": result,
                  "trained_steps": step if name.startswith("beacon") and "untrained" not in name else 0,
                  "wall_s": round(time.perf_counter() - t0, 1)}
        path = CELLS / f"{name}__{length}.json"
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        print(f"{name} {length}: {result} ({record['wall_s']} s)", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("train", "eval"))
    parser.add_argument("--minutes", type=float, default=30.0, help="train: wall-clock budget")
    parser.add_argument("--budget_min", type=float, default=60.0, help="eval: start no cell after")
    args = parser.parse_args(argv)
    return train(args.minutes) if args.command == "train" else evaluate(args.budget_min)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
