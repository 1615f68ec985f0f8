"""KV-cache policies on SmolLM2-135M, one cell at a time.

    python experiments/kv_cache/run.py                  # every cell not yet done
    python experiments/kv_cache/run.py --budget_min=60  # start no new cell after 60 min
    python experiments/kv_cache/run.py --tasks=stream,quant

A cell is (task, setting, length) and writes cells/<task>__<setting>__<length>.json with
its result and wall seconds, so a rerun resumes where the last one stopped; cells run in
TIERS order so that a bounded budget measures the main comparison first.

    stream    perplexity of 16K held-out tokens fed through the cache CHUNK_STREAM at a
              time (each chunk attends to the cache, then the policy evicts), per 2K segment
    passkey / multikey_needle   5 depths, one prompt each, prefilled and answered through
              the cache (lctx.eval with kv_cache=SPEC)
    quant     every quantized policy against `full` on the same text in one pass: ppl and
              mean KL(full || quantized) of next-token distributions
    keyscale  SmolLM2's own cached keys quantized with per-channel against per-token scales
    speed     prefill seconds, decode ms/token (16 greedy steps) and cache bytes at 1K-16K

`report.py` turns the cells into the README table and the PNGs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lctx
from lctx.eval.api import evaluate_model, held_out_documents
from lctx.infer.generate import (decode_jit, inference_config, new_cache, pad_prompts,
                                 prefill_jit, prefill_length)
from lctx.infer.kvcache.int4 import hadamard, quantize
from lctx.model.api import extend, logits_of

HERE = Path(__file__).resolve().parent
CELLS = HERE / "cells"
BUDGETS = (256, 512, 1024, 2048)
STREAM_TOKENS = 16384
CHUNK_STREAM = 128  # tokens written per streaming step: decode, batched for CPU time
SEGMENT = 2048  # streaming perplexity is reported per segment of this many tokens
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DECODE_STEPS = 16


def evicting(budget: int) -> dict[str, str]:
    """The evicting policies at `budget` tokens per layer and KV head."""
    return {f"sink_window_{budget}": f"sink_window:sinks=4,window={budget - 4}",
            f"window_{budget}": f"sink_window:sinks=0,window={budget}",
            f"h2o_{budget}": f"h2o:budget={budget},recent={budget // 4}",
            f"snapkv_{budget}": f"snapkv:budget={budget},window=32,kernel=7",
            f"knorm_{budget}": f"knorm:budget={budget}"}


QUANTIZED = {"int8": "int8", "int4": "int4:group=32,residual=128",
             "int4_hadamard": "int4:group=32,residual=128,rotate=hadamard",
             "int2": "int4:bits=2,group=32,residual=128"}
BOUNDED = {name: spec for b in BUDGETS for name, spec in evicting(b).items()}
SPECS = {"full": "full", **QUANTIZED, **BOUNDED}
SPEED = ("full", "int4", "sink_window_1024")  # full and two compressed (one of each kind)


def all_cells() -> list[tuple[str, str, int]]:
    cells = [("stream", name, STREAM_TOKENS) for name in ("full", *BOUNDED)]
    cells += [(task, name, n) for task in ("passkey", "multikey_needle") for name in SPECS
              for n in (4096, 8192)]
    cells += [("quant", "all", n) for n in (2048, 8192)] + [("keyscale", "all", 2048)]
    cells += [("speed", name, n) for name in SPEED for n in (1024, 2048, 4096, 8192, 16384)]
    return sorted(cells, key=priority)


def _budget(name: str) -> int | None:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


# What a bounded budget measures first: streaming at the default budget, the
# quantization cells, 4K retrieval at that budget, speed, then the other budgets and 8K.
TIERS = (
    lambda t, s, n: t == "stream" and _budget(s) in (None, 1024),
    lambda t, s, n: t in ("quant", "keyscale") and n == 2048,
    lambda t, s, n: t == "passkey" and n == 4096 and _budget(s) in (None, 1024),
    lambda t, s, n: t == "speed" and n <= 8192,
    lambda t, s, n: t == "stream",
    lambda t, s, n: t == "passkey" and n == 8192 and _budget(s) in (None, 1024),
    lambda t, s, n: t == "multikey_needle" and n == 4096 and _budget(s) in (None, 1024),
    lambda t, s, n: t in ("speed", "quant"),
    lambda t, s, n: t == "passkey" and _budget(s) in (None, 256),
)


def priority(cell: tuple[str, str, int]) -> tuple:
    tier = next((i for i, test in enumerate(TIERS) if test(*cell)), len(TIERS))
    return (tier, cell[2], cell[0], cell[1])


def cell_path(task: str, name: str, length: int) -> Path:
    return CELLS / f"{task}__{name}__{length}.json"


def held_out_stream(tokenizer, tokens: int) -> np.ndarray:
    """The held-out standard-library files in path order, concatenated, cut to `tokens`."""
    ids: list[int] = []
    for doc in held_out_documents():
        ids.extend(tokenizer.encode(doc["text"] + "\n\n"))
        if len(ids) >= tokens:
            return np.asarray(ids[:tokens], np.int32)
    raise RuntimeError(f"the held-out split has fewer than {tokens} tokens")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _chunked_scores(config, params, tokens, targets, caches, chunk):
    """Feeds tokens `[1, N]` through each cache of `caches` (a tuple) `chunk` at a time.

    Returns nll float32 `[len(caches), N]` of `targets` `[1, N]` and, for every cache
    after the first, the KL divergence `[len(caches) - 1, N]` of its next-token
    distribution from the first cache's.
    """
    cfg = inference_config(config, chunk)
    steps = tokens.shape[1] // chunk
    as_steps = lambda x: x.reshape(steps, 1, chunk)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]

    def step(caches, inputs):
        ids, target, pos = inputs
        logps, out = [], []
        for cache in caches:
            hidden, cache = extend(cfg, params, ids, cache, positions=pos,
                                   valid=jnp.ones(ids.shape, bool), rope_seq_len=tokens.shape[1])
            logps.append(jax.nn.log_softmax(logits_of(cfg, params, hidden)[0]))
            out.append(cache)
        nll = jnp.stack([-jnp.take_along_axis(lp, target[0][:, None], -1)[:, 0] for lp in logps])
        ref = logps[0]
        kl = jnp.stack([jnp.sum(jnp.exp(ref) * (ref - lp), -1) for lp in logps[1:]]) \
            if len(logps) > 1 else jnp.zeros((0, chunk))
        return tuple(out), (nll, kl)

    _, (nll, kl) = jax.lax.scan(step, caches, (as_steps(tokens), as_steps(targets),
                                               as_steps(positions)))
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], tokens.shape[1])
    return flat(nll), flat(kl)


def _ppl(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def stream_cell(model, name: str, text: np.ndarray) -> dict:
    n = STREAM_TOKENS
    cache = new_cache(model.config, SPECS[name], batch=1, tokens=n, chunk=CHUNK_STREAM)
    nbytes = cache.nbytes()
    nll, _ = _chunked_scores(model.config, model.params, jnp.asarray(text[None, :n]),
                             jnp.asarray(text[None, 1:n + 1]), (cache,), CHUNK_STREAM)
    nll = np.asarray(nll[0])
    return {"ppl": _ppl(nll), "cache_bytes": nbytes,
            "segment_ppl": [_ppl(nll[i:i + SEGMENT]) for i in range(0, n, SEGMENT)]}


def quant_cell(model, length: int, text: np.ndarray) -> dict:
    chunk = min(2048, length)
    names = ("full", *QUANTIZED)
    caches = tuple(new_cache(model.config, SPECS[m], batch=1, tokens=length, chunk=chunk)
                   for m in names)
    nll, kl = _chunked_scores(model.config, model.params, jnp.asarray(text[None, :length]),
                              jnp.asarray(text[None, 1:length + 1]), caches, chunk)
    nll, kl = np.asarray(nll), np.asarray(kl)
    out = {}
    for i, m in enumerate(names):
        out[m] = {"ppl": _ppl(nll[i]), "cache_bytes": caches[i].nbytes()}
        if i:
            out[m].update(ppl_change=_ppl(nll[i]) / _ppl(nll[0]) - 1.0, mean_kl=float(kl[i - 1].mean()))
    return out


def _relative_error(keys: np.ndarray, bits: int, per_channel: bool, group: int = 32) -> float:
    """‖k − dequant(quant(k))‖ / ‖k‖ for keys `[L, Hkv, T, hd]` float32: per-channel
    scales over groups of `group` tokens, or per-token scales over groups of `group`
    channels (the two KIVI compares)."""
    layers, heads, tokens, dim = keys.shape
    if per_channel:
        x = keys.reshape(layers, heads, tokens // group, group, dim)
        axis = 3
    else:
        x = keys.reshape(layers, heads, tokens, dim // group, group)
        axis = 4
    codes, scale, zero = quantize(jnp.asarray(x), bits, axis)
    back = np.asarray(codes, np.float32) * np.asarray(scale) + np.asarray(zero)
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


def keyscale_cell(model, length: int, text: np.ndarray) -> dict:
    """Quantization error of SmolLM2's own keys (after a full prefill) per key layout."""
    cache = new_cache(model.config, "full", batch=1, tokens=length, chunk=length)
    tokens, lengths = pad_prompts([text[:length]], 0, length)
    _, cache = prefill_jit(model.config, model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                           cache, chunk=length, rope_seq_len=length)
    keys = np.asarray(cache.data["k"][:, 0], np.float32)  # [L, Hkv, T, hd], rotated by RoPE
    channel_max = np.abs(keys).max(axis=2)  # [L, Hkv, hd]
    rotated = keys @ hadamard(keys.shape[-1])
    out = {"outlier_ratio": float(np.median(channel_max.max(-1) / np.median(channel_max, -1)))}
    for bits in (4, 2):
        for layout, k, per_channel in (("per_channel", keys, True), ("per_token", keys, False),
                                       ("hadamard_per_channel", rotated, True),
                                       ("hadamard_per_token", rotated, False)):
            out[f"{layout}_{bits}bit"] = _relative_error(k, bits, per_channel)
    return out


def speed_cell(model, name: str, length: int, text: np.ndarray) -> dict:
    """Prefill of a `length`-token prompt, then DECODE_STEPS greedy tokens; each half
    compiled first (AOT), then timed once."""
    chunk = min(2048, length)
    tokens, lengths = pad_prompts([text[:length]], 0, chunk)
    total = prefill_length(length, chunk) + DECODE_STEPS
    rope = length + DECODE_STEPS
    fresh = lambda: new_cache(model.config, SPECS[name], batch=1, tokens=total, chunk=chunk)
    args = (jnp.asarray(tokens), jnp.asarray(lengths))
    prefill = prefill_jit.lower(model.config, model.params, *args, fresh(), chunk=chunk,
                                rope_seq_len=rope).compile()
    start = time.perf_counter()
    logits, cache = prefill(model.params, *args, fresh())
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    nbytes = cache.nbytes()
    rng = jax.random.key(0)
    decode = decode_jit.lower(model.config, model.params, cache, logits, args[1], rng,
                              steps=DECODE_STEPS, temperature=0.0, rope_seq_len=rope).compile()
    start = time.perf_counter()
    new, _, _ = decode(model.params, cache, logits, args[1], rng)
    jax.block_until_ready(new)
    decode_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_ms_per_token": 1000 * decode_s / DECODE_STEPS,
            "decode_tokens_per_s": DECODE_STEPS / decode_s, "cache_bytes": nbytes}


def retrieval_cell(model, task: str, name: str, length: int, held_out: list[dict]) -> dict:
    result = evaluate_model(model.config, model.params, model.tokenizer, held_out, tasks=(task,),
                            lengths=(length,), depths=DEPTHS, trials=1, seed=0, prompt_batch=1,
                            kv_cache=SPECS[name], progress=False, label=name)
    return result[task]


def run_cell(model, cell: tuple[str, str, int], text: np.ndarray, held_out: list[dict]) -> dict:
    task, name, length = cell
    start = time.perf_counter()
    if task == "stream":
        result = stream_cell(model, name, text)
    elif task == "quant":
        result = quant_cell(model, length, text)
    elif task == "keyscale":
        result = keyscale_cell(model, length, text)
    elif task == "speed":
        result = speed_cell(model, name, length, text)
    else:
        result = retrieval_cell(model, task, name, length, held_out)
    return {"task": task, "setting": name, "spec": SPECS.get(name), "length": length,
            "result": result, "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_min", type=float, default=180.0,
                        help="start no new cell after this many minutes")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: all)")
    args = parser.parse_args(argv)
    known = sorted({c[0] for c in all_cells()})
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in known]
    if bad:
        print(f"error: --tasks={','.join(bad)}: allowed {', '.join(known)}", file=sys.stderr)
        return 2
    todo = [c for c in all_cells() if (not tasks or c[0] in tasks) and not cell_path(*c).exists()]
    print(f"{len(todo)} cells to run", flush=True)
    if not todo:
        return 0
    model = lctx.load("smollm2-135m")
    text = held_out_stream(model.tokenizer, STREAM_TOKENS + 1)
    held_out = held_out_documents()
    CELLS.mkdir(exist_ok=True)
    began = time.perf_counter()
    for cell in todo:
        if (time.perf_counter() - began) / 60 > args.budget_min:
            print("budget spent; rerun to continue", flush=True)
            break
        record = run_cell(model, cell, text, held_out)
        tmp = cell_path(*cell).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, cell_path(*cell))  # a killed run never leaves a half cell
        print(f"{cell}: {json.dumps(record['result'], default=float)[:150]} ({record['wall_s']} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
