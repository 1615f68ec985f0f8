"""Evaluation of any model on the registered tasks (lctx.eval.tasks: ppl, passkey, needle,
multikey_needle, multivalue, multiquery, variable_tracking).

    results = lctx.eval.evaluate_source("smollm2-135m", tasks=("ppl", "multikey_needle"),
                                        lengths=(2048, 4096))   # -> eval_results/smollm2-135m/
    results = lctx.eval.evaluate("runs/quickstart", tasks=("ppl", "passkey", "needle"))

`evaluate_source` loads anything lctx.load accepts and scores perplexity on held-out
standard-library source (or a directory of text files) with the model's own tokenizer;
`evaluate` takes a training run and its own held-out split, writing RUN/eval/
(step N: results_step{N}.json as well). Both write results.json and PNGs through
`evaluate_model`, which takes a (config, params) pair in memory (the end of training
and the RoPE-scaling study call it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
from tqdm import tqdm

from lctx import model as lm
from lctx import parallel
from lctx.convert.run import open_run_corpus, read_run_config, stage_mesh_shape
from lctx.data.corpus import VALIDATION_FRACTION, CorpusSpec, iter_texts, stdlib_spec
from lctx.data.tokenizer import Tokenizer, make_tokenizer
from lctx.eval import plots
from lctx.eval.perplexity import perplexity_by_length
from lctx.eval.tasks import TASKS, EvalContext, Task
from lctx.infer import generate, kvcache
from lctx.models import load, with_rope_scaling  # noqa: F401  (with_rope_scaling: re-export)

DEFAULT_TASKS = ("ppl", "passkey", "needle")
# The one set of defaults: python -m lctx.eval's flags and a run's config.eval read these.
DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULTS = dict(stride=256, max_tokens=32768, batch_size=4, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                trials=4, seed=0, prompt_batch=8, kv_cache="full")


def check_options(tasks: Sequence[str], lengths: Sequence[int], options: Mapping[str, Any]
                  ) -> list[str]:
    """One line per bad evaluation argument (empty when all are fine)."""
    problems = []
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        known = [*DEFAULT_TASKS, *sorted(set(TASKS) - set(DEFAULT_TASKS))]
        problems.append(f"tasks={','.join(tasks)}: expected a non-empty subset of "
                        f"{', '.join(known)}")
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
    spec = options.get("kv_cache", DEFAULTS["kv_cache"])
    try:
        kvcache.parse(spec)
    except ValueError as err:
        problems.append(str(err))
    depths = options.get("depths", DEFAULTS["depths"])
    if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
        problems.append(f"depths={list(depths)}: expected values in [0, 1]")
    return problems


def _continuations(model_config, params, tokenizer, prompts, max_new, batch, kv_cache):
    """Greedy continuations (text) of prompt ids, batched by similar length, decoded
    through a `kv_cache` (a lctx.infer.kvcache spec)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        tokens = generate(model_config, params, [prompts[i] for i in rows],
                          max_new_tokens=max_new, pad_id=tokenizer.pad_id, kv_cache=kv_cache)
        for i, ids in zip(rows, tokens):
            out[i] = tokenizer.decode(ids)
    return out


def evaluate_model(model_config: lm.ModelConfig, params: Any, tokenizer: Tokenizer,
                   held_out: Sequence[Mapping[str, Any]], *, text_key: str = "text",
                   tasks: Sequence[str] = DEFAULT_TASKS, lengths: Sequence[int] = DEFAULT_LENGTHS,
                   out_dir: str | None = None, training_lengths: Sequence[int] = (),
                   label: str = "model", mesh=None, progress: bool = True,
                   **options: Any) -> dict[str, Any]:
    """Evaluates a model in memory on `tasks` (names in lctx.eval.tasks.TASKS); writes
    results.json and PNGs in `out_dir` when given.

    held_out: documents {text_key: text} for perplexity and as haystacks.
    options: stride, max_tokens, batch_size (perplexity); depths, trials, seed,
    prompt_batch, kv_cache (retrieval: prompts are prefilled and answered through that
    cache policy, e.g. "snapkv:budget=1024"); needle (a retrieval.Needle). Perplexity
    is the model's full forward, except through a policy that reads the text its own
    way (beacon), whose windows it scores.
    """
    problems = check_options(tasks, lengths, options)
    if problems:
        raise ValueError("invalid evaluation arguments: " + "; ".join(problems))
    o = {**DEFAULTS, **options}
    lengths = tuple(sorted(lengths))
    depths = tuple(float(d) for d in o["depths"])
    bar = tqdm(total=sum(TASKS[t].units(lengths, depths) for t in tasks), desc="eval",
               unit="cell", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def advance(task: str, length: int) -> None:
        bar.update(1)
        bar.set_postfix(task=task, length=length)

    window_nll = kvcache.parse(o["kv_cache"]).window_nll(model_config, params)

    def perplexity(length: int) -> dict[str, Any]:
        return perplexity_by_length(model_config, params, held_out, tokenizer, lengths=(length,),
                                    stride=o["stride"], max_tokens=o["max_tokens"],
                                    text_key=text_key, batch_size=o["batch_size"],
                                    longest=max(lengths), mesh=mesh,
                                    window_nll=window_nll)[str(length)]

    ctx = EvalContext(
        tokenizer=tokenizer, held_out=held_out, text_key=text_key, lengths=lengths, depths=depths,
        options=o, perplexity=perplexity, advance=advance,
        continue_text=lambda prompts, max_new: _continuations(
            model_config, params, tokenizer, prompts, max_new, o["prompt_batch"],
            o["kv_cache"]))
    results: dict[str, Any] = {"lengths": list(lengths),
                               "training_lengths": sorted(set(training_lengths)),
                               "rope": model_config.rope.to_hf() if hasattr(model_config.rope, "to_hf")
                               else str(model_config.rope)}
    try:
        for task in tasks:
            results[task] = TASKS[task].run(ctx)
    finally:
        bar.close()
    if out_dir is not None:
        results["plots"] = write_outputs(results, out_dir, label)
    return results


def _tasks_in(results: Mapping[str, Any]) -> list[Task]:
    """The registered tasks with a section in `results`, in the order they ran."""
    return [TASKS[key] for key in results if key in TASKS]


def write_outputs(results: Mapping[str, Any], out_dir: str, label: str = "model",
                  name: str = "results.json") -> list[str]:
    """results.json and the PNGs of whichever tasks ran; returns the PNG paths."""
    plots.ensure_dir(out_dir)
    training = results.get("training_lengths", ())
    written = []
    for task in _tasks_in(results):
        written += task.plot(results[task.name], out_dir, label, training)
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump({**results, "plots": written}, f, indent=1, default=float)
    return written


def format_table(results: Mapping[str, Any]) -> str:
    """The terminal table: one row per length with every task's numbers, then the notes."""
    ran = _tasks_in(results)
    columns = [col for task in ran for col in task.columns(results[task.name])]
    width = max([11] + [len(head) for head, _ in columns])
    lines = ["  ".join(h.rjust(width) for h in ["length"] + [head for head, _ in columns])]
    for n in results["lengths"]:
        lines.append("  ".join([str(n).rjust(width)] +
                               [values.get(int(n), "-").rjust(width) for _, values in columns]))
    lines += [line for task in ran for line in task.notes(results[task.name])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- runs


def load_run(workdir: str, step: int | None = None):
    """(run config, stage model config, params, step, stage name) of a run directory's
    checkpoint (latest, or `step`), loaded through lctx.load."""
    model = load(workdir if step is None else f"{workdir}@{step}")
    return read_run_config(workdir), model.config, model.params, model.step, model.stage


def evaluate(workdir: str, step: int | None = None, tasks: Sequence[str] = DEFAULT_TASKS,
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
    if model_config.sequence_parallel:
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


# ----------------------------------------------------------------------------- any source

DEFAULT_OUT = "eval_results"


def held_out_documents(corpus_dir: str | None = None) -> list[dict[str, str]]:
    """[{"text": ...}]: every text file of `corpus_dir`, or (None) the standard-library files
    the default training corpus holds out (VALIDATION_FRACTION by path hash), in path order."""
    if corpus_dir is None:
        texts = iter_texts(stdlib_spec(), "validation", VALIDATION_FRACTION)
    else:
        texts = iter_texts(CorpusSpec.from_dir(corpus_dir))
    docs = [{"text": text} for _, text in texts]
    if not docs:
        raise ValueError(f"corpus_dir={corpus_dir!r}: no text files")
    return docs


def default_out_dir(source: str, rope_scaling: Mapping[str, Any] | None = None) -> str:
    """eval_results/<source name>[_<rope type><factor>]: a file or directory's base name
    (".gguf" dropped, RUN@STEP as RUN_stepSTEP), a registered name as it is; `_default`
    for {} (plain RoPE in place of the model's own scaling)."""
    name = os.path.basename(os.path.normpath(source)).removesuffix(".gguf").replace("@", "_step")
    if rope_scaling == {}:
        name += "_default"
    elif rope_scaling:
        name += f"_{rope_scaling.get('rope_type', rope_scaling.get('type', 'rope'))}"
        name += f"{rope_scaling['factor']:g}" if "factor" in rope_scaling else ""
    return os.path.join(DEFAULT_OUT, name)


def evaluate_source(source: str, *, rope_scaling: Mapping[str, Any] | None = None,
                    tokenizer: str | None = None, corpus_dir: str | None = None,
                    out_dir: str | None = None, tasks: Sequence[str] = DEFAULT_TASKS,
                    lengths: Sequence[int] = DEFAULT_LENGTHS, progress: bool = True,
                    **options: Any) -> dict[str, Any]:
    """Evaluates what `lctx.load(source, rope_scaling=...)` gives; writes results.json and
    PNGs into out_dir (default `default_out_dir`) and returns the results.

    rope_scaling: an HF-style dict replacing the model's own; {} is plain RoPE, None
    keeps the model's.
    tokenizer: a tokenizer spec (lctx.data.make_tokenizer) replacing the model's own,
    needed when the source carries none. corpus_dir: see `held_out_documents`.
    options: see `evaluate_model`. ValueError (one line) for a bad argument or source.
    """
    problems = check_options(tasks, lengths, options)
    if problems:
        raise ValueError("; ".join(problems))
    model = load(source, rope_scaling=rope_scaling)
    tok = make_tokenizer(tokenizer) if tokenizer else model.tokenizer
    if tok is None:
        raise ValueError(f"model={source}: carries no tokenizer; pass one (tokenizer='byte', "
                         "'hf:PATH/tokenizer.json' or a SentencePiece .model)")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer: {tok.vocab_size} ids, more than the model's vocab_size "
                         f"{model.config.vocab_size}")
    out_dir = out_dir or default_out_dir(source, rope_scaling)
    results = evaluate_model(model.config, model.params, tok, held_out_documents(corpus_dir),
                             tasks=tasks, lengths=lengths, out_dir=None,
                             training_lengths=(model.config.max_position_embeddings,),
                             label=os.path.basename(out_dir), mesh=model.mesh,
                             progress=progress, **options)
    results.update(source=source,
                   rope_scaling=None if rope_scaling is None else dict(rope_scaling),
                   corpus_dir=corpus_dir or "stdlib (held-out split)",
                   out_dir=os.path.abspath(out_dir))
    results["plots"] = write_outputs(results, out_dir, os.path.basename(out_dir))
    return results
