"""SmolLM2-135M zero-shot past its 8192-token training length, one cell at a time.

    python experiments/smollm2_extension/run.py                 # every cell not yet done
    python experiments/smollm2_extension/run.py --budget_min=60 # stop starting cells after 60 min
    python experiments/smollm2_extension/run.py --only=none,yarn2 --tasks=ppl

A cell is (method, task, length); each writes cells/<method>__<task>__<length>.json
with its result and wall seconds, so a rerun resumes where the last one stopped.
Cells run in TIERS order, so a bounded budget measures the comparison the study asks
about first.
`report.py` turns the cells into the README table and the two PNGs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lctx
from lctx.data.corpus import iter_texts, stdlib_spec
from lctx.eval.api import evaluate_model
from lctx.training.config import base_config

HERE = Path(__file__).resolve().parent
CELLS = HERE / "cells"
TRAINED = 8192  # SmolLM2's training context (GGUF llama.context_length)
ROTARY_PAIRS = 32  # head_dim 64 / 2


def longrope_style(factor: float) -> dict:
    """LongRoPE-shaped factors without LongRoPE's search: per-pair stretch rising linearly
    from 1 (fastest pair, i = 0) to `factor` (slowest); short factors 1 (in-length: none)."""
    ramp = [1.0 + (factor - 1.0) * i / (ROTARY_PAIRS - 1) for i in range(ROTARY_PAIRS)]
    return {"rope_type": "longrope", "factor": factor, "short_factor": [1.0] * ROTARY_PAIRS,
            "long_factor": ramp, "original_max_position_embeddings": TRAINED}


def methods() -> dict[str, dict | None]:
    """name -> HF-style rope_scaling (None: the model's own RoPE)."""
    out: dict[str, dict | None] = {"none": None}
    for s in (2, 4):
        out[f"pi{s}"] = {"rope_type": "linear", "factor": float(s)}
        out[f"ntk{s}"] = {"rope_type": "ntk", "factor": float(s)}
        out[f"dynamic{s}"] = {"rope_type": "dynamic", "factor": float(s),
                              "original_max_position_embeddings": TRAINED}
        out[f"yarn{s}"] = {"rope_type": "yarn", "factor": float(s),
                           "original_max_position_embeddings": TRAINED}
        out[f"llama3_{s}"] = {"rope_type": "llama3", "factor": float(s), "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": TRAINED}
        out[f"longrope{s}"] = longrope_style(float(s))
    return out


LENGTHS = {"ppl": (2048, 4096, 8192, 16384), "passkey": (4096, 8192, 12288, 16384),
           "multikey_needle": (4096, 8192, 12288, 16384)}
DEPTHS = (0.5,)  # one trial at mid-depth: one prompt per retrieval cell
PPL_TOKENS = 4096  # scored tokens per perplexity cell (16K: its one window, all scored)

# What a bounded budget measures first: the past-length perplexity and the in-length
# baseline at factor 2, then retrieval at 12K, then factor 4, then the rest.
TIERS = (
    lambda m, t, n: t == "ppl" and n > TRAINED and m[-1] != "4",
    lambda m, t, n: t == "ppl" and m[-1] != "4",
    lambda m, t, n: t == "passkey" and n == 12288 and m[-1] != "4",
    lambda m, t, n: t == "multikey_needle" and n == 12288 and m[-1] != "4",
    lambda m, t, n: t == "ppl" and n > TRAINED,
    lambda m, t, n: n == 16384 and m[-1] != "4",
    lambda m, t, n: m[-1] != "4",
)


def priority(cell: tuple[str, str, int]) -> tuple:
    """The first tier a cell is in (TIERS), then shorter and cheaper first."""
    tier = next((i for i, test in enumerate(TIERS) if test(*cell)), len(TIERS))
    method, task, length = cell
    return (tier, length, list(LENGTHS).index(task), method)


def all_cells() -> list[tuple[str, str, int]]:
    return sorted(((m, t, n) for m in methods() for t in LENGTHS for n in LENGTHS[t]),
                  key=priority)


def cell_path(method: str, task: str, length: int) -> Path:
    return CELLS / f"{method}__{task}__{length}.json"


def held_out_code(tokenizer, min_tokens: int) -> list[dict]:
    """The held-out standard-library source files with more than `min_tokens` tokens,
    in a fixed order (the same text at every length and method)."""
    fraction = base_config().data.validation_fraction  # the split lctx.train holds out
    docs = []
    for rel, text in sorted(iter_texts(stdlib_spec(), "validation", fraction)):
        if len(tokenizer.encode(text)) > min_tokens:
            docs.append({"path": rel, "text": text})
    return docs


def run_cell(model, method: str, task: str, length: int, held_out: list[dict]) -> dict:
    scaled = model.with_config(rope_scaling=methods()[method]) if methods()[method] else model
    options = dict(progress=False)
    if task == "ppl":
        options.update(stride=length, max_tokens=max(PPL_TOKENS, length), batch_size=1)
    else:
        options.update(depths=DEPTHS, trials=1, seed=0, prompt_batch=1)
    start = time.perf_counter()
    result = evaluate_model(scaled.config, scaled.params, scaled.tokenizer, held_out,
                            tasks=(task,), lengths=(length,), label=method,
                            training_lengths=(TRAINED,), **options)
    return {"method": method, "task": task, "length": length, "rope_scaling": methods()[method],
            "result": result.get(task), "wall_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_min", type=float, default=180.0,
                        help="start no new cell after this many minutes")
    parser.add_argument("--only", default="", help="comma-separated methods (default: all)")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: all)")
    args = parser.parse_args(argv)
    only = [m for m in args.only.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    for name, allowed in (("--only", methods()), ("--tasks", LENGTHS)):
        bad = [x for x in (only if name == "--only" else tasks) if x not in allowed]
        if bad:
            print(f"error: {name}={','.join(bad)}: allowed {', '.join(allowed)}", file=sys.stderr)
            return 2
    todo = [c for c in all_cells() if (not only or c[0] in only) and (not tasks or c[1] in tasks)
            and not cell_path(*c).exists()]
    print(f"{len(todo)} cells to run", flush=True)
    if not todo:
        return 0
    model = lctx.load("smollm2-135m")
    held_out = held_out_code(model.tokenizer, max(LENGTHS["ppl"]))
    CELLS.mkdir(exist_ok=True)
    began = time.perf_counter()
    for cell in todo:
        if (time.perf_counter() - began) / 60 > args.budget_min:
            print("budget spent; rerun to continue", flush=True)
            break
        record = run_cell(model, *cell, held_out)
        tmp = cell_path(*cell).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=float))
        os.replace(tmp, cell_path(*cell))  # a killed run never leaves a half cell
        print(f"{cell}: {json.dumps(record['result'], default=float)[:120]} ({record['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
