"""`evaluate`: perplexity against length, passkey retrieval and needle-in-a-haystack.

    results = lctx.eval.evaluate("runs/quickstart", tasks=("ppl", "passkey", "needle"),
                                 lengths=(256, 512, 1024, 2048))

writes RUN/eval/results.json (step N: results_step{N}.json as well) and PNGs in
RUN/eval/. `evaluate_model` does the same for a (config, params) pair in memory
(the end of training and the RoPE-scaling study call it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lctx import model as lm
from lctx.convert.run import open_run_corpus, read_run_config, stage_mesh_shape
from lctx.data.tokenizer import Tokenizer
from lctx.eval import plots, retrieval
from lctx.eval.perplexity import perplexity_by_length
from lctx.infer import generate
from lctx.models import load, with_rope_scaling  # noqa: F401  (with_rope_scaling: re-export)

TASKS = ("ppl", "passkey", "needle")
# The one set of defaults: python -m lctx.eval's flags and a run's config.eval read these.
DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULTS = dict(stride=256, max_tokens=32768, batch_size=4, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                trials=4, seed=0, prompt_batch=8)


def check_options(tasks: Sequence[str], lengths: Sequence[int], options: Mapping[str, Any]
                  ) -> list[str]:
    """One line per bad evaluation argument (empty when all are fine)."""
    problems = []
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        problems.append(f"tasks={list(tasks)}: expected a non-empty subset of {', '.join(TASKS)}")
    if not lengths or any(not isinstance(n, int) or n < 2 for n in lengths):
        problems.append(f"lengths={list(lengths)}: expected positive ints >= 2")
    unknown = sorted(set(options) - set(DEFAULTS) - {"needle", "rope_scaling"})
    if unknown:
        problems.append(f"options {unknown}: unknown; allowed: {', '.join(DEFAULTS)}, needle, "
                        "rope_scaling")
    for key in ("stride", "max_tokens", "batch_size", "trials", "prompt_batch"):
        value = options.get(key, DEFAULTS[key])
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r}: expected an int >= 1")
    depths = options.get("depths", DEFAULTS["depths"])
    if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
        problems.append(f"depths={list(depths)}: expected values in [0, 1]")
    return problems


def _continuations(model_config, params, tokenizer, prompts, max_new, batch, mesh):
    """Greedy continuations (text) of prompts, batched by similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        tokens = generate(model_config, params, [prompts[i].ids for i in rows],
                          max_new_tokens=max_new, pad_id=tokenizer.pad_id, mesh=mesh)
        for i, ids in zip(rows, tokens):
            out[i] = tokenizer.decode(ids)
    return out


def _retrieval_cells(kind: str, model_config, params, tokenizer, lengths, depths, trials, seed,
                     prompt_for, score, max_new, batch, mesh, bar) -> dict[str, Any]:
    """Runs one retrieval task over lengths x depths x trials; returns its results."""
    rng = np.random.default_rng(seed)
    cells, skipped = [], {}
    for length in lengths:
        prompts, index = [], []
        for depth in depths:
            for trial in range(trials):
                prompt = prompt_for(length, float(depth), trial, rng)
                if prompt is None:
                    break
                prompts.append(prompt)
                index.append(depth)
            if prompts and prompt is None:
                break
        if not prompts or len(prompts) < len(depths) * trials:
            skipped[str(length)] = ("filler below 75% of the prompt" if kind == "passkey" else
                                    "haystack too short for this length")
            bar.update(len(depths))
            continue
        texts = _continuations(model_config, params, tokenizer, prompts, max_new, batch, mesh)
        for depth in depths:
            hits = [score(t, p.answer) for t, p, d in zip(texts, prompts, index) if d == depth]
            example = next(p for p, d in zip(prompts, index) if d == depth)
            cells.append({"length": length, "depth": float(depth), "correct": int(sum(hits)),
                          "trials": len(hits), "accuracy": float(np.mean(hits)),
                          "prompt_tokens": int(len(example.ids)),
                          "filler_fraction": round(example.filler_fraction, 4),
                          **({"instruction": "short" if example.instruction ==
                              retrieval.SHORT_INSTRUCTION else "full"} if kind == "passkey" else {})})
            bar.update(1)
        bar.set_postfix(task=kind, length=length)
    by_length = retrieval.accuracy_by_length(cells)
    return {"cells": cells, "accuracy": {str(n): a for n, a in by_length.items()},
            "skipped": skipped,
            "effective_length": {"yarn_80": retrieval.effective_length_80(by_length),
                                 "pi_20": retrieval.effective_length_20(by_length)}}


def evaluate_model(model_config: lm.ModelConfig, params: Any, tokenizer: Tokenizer,
                   held_out: Sequence[Mapping[str, Any]], *, text_key: str = "text",
                   tasks: Sequence[str] = TASKS, lengths: Sequence[int] = DEFAULT_LENGTHS,
                   out_dir: str | None = None, training_lengths: Sequence[int] = (),
                   label: str = "model", mesh=None, progress: bool = True,
                   **options: Any) -> dict[str, Any]:
    """Evaluates a model in memory; writes results.json and PNGs in `out_dir` when given.

    options: stride, max_tokens, batch_size (perplexity); depths, trials, seed,
    prompt_batch (retrieval); needle (a retrieval.Needle).
    """
    problems = check_options(tasks, lengths, options)
    if problems:
        raise ValueError("invalid evaluation arguments: " + "; ".join(problems))
    o = {**DEFAULTS, **options}
    needle = o.get("needle") or retrieval.Needle()
    lengths = sorted(lengths)
    depths = [float(d) for d in o["depths"]]
    from tqdm import tqdm

    total = (len(lengths) if "ppl" in tasks else 0) + len(lengths) * len(depths) * (
        ("passkey" in tasks) + ("needle" in tasks))
    bar = tqdm(total=total, desc="eval", unit="cell", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    results: dict[str, Any] = {"lengths": lengths, "training_lengths": sorted(set(training_lengths)),
                               "rope": model_config.rope.to_hf() if hasattr(model_config.rope, "to_hf")
                               else str(model_config.rope)}
    try:
        if "ppl" in tasks:
            ppl = {}
            for length in lengths:
                ppl.update(perplexity_by_length(model_config, params, held_out, tokenizer,
                                                lengths=(length,), stride=o["stride"],
                                                max_tokens=o["max_tokens"], text_key=text_key,
                                                batch_size=o["batch_size"], longest=max(lengths),
                                                mesh=mesh))
                bar.update(1)
                bar.set_postfix(task="ppl", length=length)
            results["ppl"] = ppl
        if "passkey" in tasks:
            keys: dict[tuple, str] = {}

            def passkey_for(length, depth, trial, rng):
                key = keys.setdefault((length, trial), retrieval.passkey_keys(rng, 1)[0])
                return retrieval.passkey_prompt(tokenizer, length, depth, key)

            results["passkey"] = _retrieval_cells(
                "passkey", model_config, params, tokenizer, lengths, depths, o["trials"],
                o["seed"], passkey_for, retrieval.score_passkey, 8, o["prompt_batch"], mesh, bar)
        if "needle" in tasks:
            texts = [_text(held_out[i][text_key]) for i in range(len(held_out))]

            def needle_for(length, depth, trial, rng):
                start = (trial * 7919) % max(len(texts), 1)  # a different haystack per trial
                hay = retrieval.haystack_ids(tokenizer, texts[start:] + texts[:start], length)
                return retrieval.needle_prompt(tokenizer, hay, length, depth, needle)

            results["needle"] = _retrieval_cells(
                "needle", model_config, params, tokenizer, lengths, depths, o["trials"],
                o["seed"], needle_for, retrieval.score_needle,
                retrieval.needle_answer_tokens(tokenizer, needle), o["prompt_batch"], mesh, bar)
    finally:
        bar.close()
    if out_dir is not None:
        results["plots"] = write_outputs(results, out_dir, label)
    return results


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def write_outputs(results: Mapping[str, Any], out_dir: str, label: str = "model",
                  name: str = "results.json") -> list[str]:
    """results.json and the PNGs for whichever tasks ran; returns the PNG paths."""
    plots.ensure_dir(out_dir)
    training = results.get("training_lengths", ())
    written = []
    if "ppl" in results:
        curve = {int(n): r["ppl"] for n, r in results["ppl"].items()}
        written.append(plots.plot_perplexity({label: curve}, os.path.join(out_dir, "ppl_vs_length.png"),
                                             training_lengths=training))
    if "passkey" in results and results["passkey"]["accuracy"]:
        curve = {int(n): a for n, a in results["passkey"]["accuracy"].items()}
        written.append(plots.plot_accuracy({label: curve}, os.path.join(out_dir, "passkey.png"),
                                           training_lengths=training))
    if "needle" in results and results["needle"]["cells"]:
        grid: dict[int, dict[float, float]] = {int(n): {} for n in results["needle"]["skipped"]}
        for c in results["needle"]["cells"]:
            grid.setdefault(c["length"], {})[c["depth"]] = c["accuracy"]
        written.append(plots.plot_heatmap(grid, os.path.join(out_dir, "needle_heatmap.png")))
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump({**results, "plots": written}, f, indent=1, default=float)
    return written


def format_table(results: Mapping[str, Any]) -> str:
    """The terminal table: one row per length with every task's number."""
    head = ["length"]
    if "ppl" in results:
        head += ["ppl", "bits/byte"]
    for task in ("passkey", "needle"):
        if task in results:
            head.append(f"{task} acc")
    lines = ["  ".join(f"{h:>11}" for h in head)]
    for n in results["lengths"]:
        row = [f"{n:>11d}"]
        if "ppl" in results:
            r = results["ppl"].get(str(n))
            row += [f"{r['ppl']:>11.3f}", f"{r['bits_per_byte']:>11.4f}"] if r else ["-".rjust(11)] * 2
        for task in ("passkey", "needle"):
            if task in results:
                acc = results[task]["accuracy"].get(str(n))
                row.append(f"{acc:>11.2f}" if acc is not None else "skipped".rjust(11))
        lines.append("  ".join(row))
    for task in ("passkey", "needle"):
        if task in results:
            e = results[task]["effective_length"]
            lines.append(f"{task} effective length: {e['yarn_80']} (>= 80% accuracy), "
                         f"{e['pi_20']} (every length up to it >= 20%)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs


def load_run(workdir: str, step: int | None = None):
    """(run config, stage model config, params, step, stage name) of a run directory's
    checkpoint (latest, or `step`), loaded through lctx.load."""
    model = load(workdir if step is None else f"{workdir}@{step}")
    return read_run_config(workdir), model.config, model.params, model.step, model.stage


def evaluate(workdir: str, step: int | None = None, tasks: Sequence[str] = TASKS,
             lengths: Sequence[int] = DEFAULT_LENGTHS, **options: Any) -> dict[str, Any]:
    """Evaluates a run's checkpoint (latest, or `step`) on its held-out split.

    options: see `evaluate_model`, plus rope_scaling (an HF-style dict evaluated in
    place of the checkpoint's, e.g. dynamic NTK on a model trained without it).
    Writes RUN/eval/results.json and the PNGs; returns the results dict.
    """
    problems = check_options(tasks, lengths, options)
    if problems:
        raise ValueError("invalid evaluation arguments: " + "; ".join(problems))
    config = read_run_config(workdir)  # first: names a missing config.json plainly
    model = load(workdir if step is None else f"{workdir}@{step}",
                 rope_scaling=options.pop("rope_scaling", None))
    model_config, params, step, stage = model.config, model.params, model.step, model.stage
    corpus = open_run_corpus(config, os.path.abspath(workdir))
    training = [config.stages[n].seq_len for n in config.stage_order]
    mesh = None
    if model_config.attention_impl in ("ring", "ulysses"):
        from lctx import parallel

        mesh = parallel.make_mesh(**stage_mesh_shape(config, stage, jax.device_count()))
    out_dir = os.path.join(workdir, "eval")
    results = evaluate_model(model_config, params, model.tokenizer, corpus.splits["validation"],
                             text_key=corpus.text_key, tasks=tasks, lengths=lengths,
                             out_dir=None, training_lengths=training, label=f"step {step}",
                             mesh=mesh, **options)
    results.update(step=int(step), stage=stage, workdir=os.path.abspath(workdir))
    results["plots"] = write_outputs(results, out_dir, f"step {step}")
    with open(os.path.join(out_dir, f"results_step{step}.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results
