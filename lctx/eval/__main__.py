"""python -m lctx.eval --model=SOURCE [--rope_scaling=JSON] --tasks=ppl,multikey_needle
                      --lengths=2048,4096 [--corpus_dir=DIR] [--out=DIR]
   python -m lctx.eval --workdir=RUN [--step=N] --tasks=ppl,passkey,needle

Thin entry point: parse and check the flags (a bad one: one line, exit 2), evaluate,
print the table. --model takes anything lctx.load accepts (a registered name, a .gguf
file, a Hugging Face or lctx checkpoint directory, RUN or RUN@STEP) and scores
perplexity on held-out standard-library source (or --corpus_dir) with the model's own
tokenizer, writing results.json and PNGs to --out (default eval_results/<name>/).
--workdir evaluates a training run on its own held-out split into RUN/eval/.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from lctx.cli import UsageError, run_absl
from lctx.eval.api import (DEFAULT_LENGTHS, DEFAULT_TASKS, DEFAULTS, check_options, evaluate,
                           evaluate_source, format_table)

_MODEL = flags.DEFINE_string("model", None, "Model source: anything lctx.load accepts.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of python -m lctx.train.")
_STEP = flags.DEFINE_integer("step", None, "With --workdir: checkpoint step (default: latest).")
_ROPE = flags.DEFINE_string("rope_scaling", None,
                            'HF-style RoPE scaling JSON replacing the model\'s, e.g. '
                            '\'{"rope_type": "yarn", "factor": 2.0}\' (null: plain RoPE).')
_TASKS = flags.DEFINE_list("tasks", list(DEFAULT_TASKS),
                           "Registered tasks (lctx.eval.tasks.TASKS).")
_LENGTHS = flags.DEFINE_list("lengths", [str(n) for n in DEFAULT_LENGTHS],
                             "Context lengths (tokens).")
_DEPTHS = flags.DEFINE_list("depths", [str(d) for d in DEFAULTS["depths"]],
                            "Needle depths in [0, 1].")
_TRIALS = flags.DEFINE_integer("trials", DEFAULTS["trials"], "Prompts per (length, depth) cell.")
_STRIDE = flags.DEFINE_integer("stride", DEFAULTS["stride"],
                             "Sliding-window stride (scored tokens per window).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", DEFAULTS["max_tokens"],
                                   "Held-out tokens scored per length.")
_BATCH = flags.DEFINE_integer("batch_size", DEFAULTS["batch_size"],
                              "Perplexity windows per forward pass.")
_KV_CACHE = flags.DEFINE_string("kv_cache", DEFAULTS["kv_cache"],
                                "Retrieval tasks decode through this KV-cache policy spec, e.g. "
                                "int8, snapkv:budget=1024 (python -m lctx.kvcache lists them).")
_SEED = flags.DEFINE_integer("seed", DEFAULTS["seed"], "Keys, values and needle depths.")
_CORPUS = flags.DEFINE_string("corpus_dir", None,
                              "With --model: a directory of text files for perplexity and "
                              "haystacks (default: held-out standard-library source).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "With --model: a tokenizer spec replacing the model's own "
                                 "(byte, hf:PATH, PATH.model); needed when it has none.")
_OUT = flags.DEFINE_string("out", None, "With --model: output directory "
                                        "(default eval_results/<source name>/).")


def _numbers(flag: flags.FlagHolder, kind) -> tuple:
    try:
        return tuple(kind(v) for v in flag.value)
    except ValueError:
        raise UsageError(f"--{flag.name}={','.join(flag.value)}: expected comma-separated "
                         f"{kind.__name__}s") from None


_ROPE_EXAMPLE = '{"rope_type": "linear", "factor": 2.0}'


def _rope_scaling() -> dict | None:
    """The --rope_scaling object: None keeps the model's own, JSON null ({}) is plain RoPE."""
    if _ROPE.value is None:
        return None
    try:
        value = json.loads(_ROPE.value)
    except json.JSONDecodeError as err:
        raise UsageError(f"--rope_scaling={_ROPE.value}: not valid JSON ({err.msg} at column "
                         f"{err.colno}); expected an object like {_ROPE_EXAMPLE} or null") from None
    if value is not None and not isinstance(value, dict):
        raise UsageError(f"--rope_scaling={_ROPE.value}: expected a JSON object like "
                         f"{_ROPE_EXAMPLE} or null")
    return value or {}


def _check_source() -> None:
    if bool(_MODEL.value) == bool(_WORKDIR.value):
        raise UsageError("--model=SOURCE or --workdir=RUN: give exactly one (SOURCE: a registered "
                         "name, a .gguf file, a model directory, RUN or RUN@STEP)")
    model_only = {"corpus_dir": _CORPUS, "tokenizer": _TOKENIZER, "out": _OUT}
    if _WORKDIR.value:
        for name, flag in model_only.items():
            if flag.value is not None:
                raise UsageError(f"--{name}={flag.value}: applies to --model; --workdir "
                                 "evaluates on the run's own held-out split into RUN/eval/")
    if _WORKDIR.value and not os.path.isdir(_WORKDIR.value):
        raise UsageError(f"--workdir={_WORKDIR.value}: no such directory; expected a run "
                         "directory of python -m lctx.train")
    if _MODEL.value and _STEP.value is not None:
        raise UsageError(f"--step={_STEP.value}: applies to --workdir; for --model give "
                         "RUN@STEP")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"{' '.join(argv[1:])}: unexpected arguments; give flags as --name=value")
    logging.set_verbosity(logging.WARNING)
    _check_source()
    lengths, depths, scaling = _numbers(_LENGTHS, int), _numbers(_DEPTHS, float), _rope_scaling()
    tasks = tuple(_TASKS.value)
    options = dict(depths=depths, trials=_TRIALS.value, stride=_STRIDE.value,
                   max_tokens=_MAX_TOKENS.value, batch_size=_BATCH.value, seed=_SEED.value,
                   kv_cache=_KV_CACHE.value)
    problems = check_options(tasks, lengths, options)
    if problems:
        raise UsageError(*(f"--{p}" for p in problems))
    try:
        if _MODEL.value:
            results = evaluate_source(_MODEL.value, rope_scaling=scaling,
                                      tokenizer=_TOKENIZER.value, corpus_dir=_CORPUS.value,
                                      out_dir=_OUT.value, tasks=tasks, lengths=lengths, **options)
            where = results["out_dir"]
            print(f"{_MODEL.value}" + (f" rope_scaling={json.dumps(scaling)}" if scaling else ""))
        else:
            results = evaluate(_WORKDIR.value, _STEP.value, tasks, lengths, rope_scaling=scaling,
                               **options)
            where = f"{results['workdir']}/eval"
            print(f"{results['workdir']} step {results['step']} (stage {results['stage']})")
    except ValueError as err:  # a bad source, corpus, tokenizer or scaling: the user's input
        raise UsageError(str(err)) from None
    print(format_table(results))
    print(f"wrote {where}/results.json and {len(results['plots'])} plots")


if __name__ == "__main__":
    run_absl(main, prog="lctx.eval")
