"""python -m lctx.eval --workdir=RUN [--step=N] --tasks=ppl,passkey,needle --lengths=256,512,1024,2048

Thin entry point: parse and check the flags (a bad one: one line, exit 2), evaluate
the run's checkpoint, print the table; results.json and PNGs go to RUN/eval/.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from lctx.cli import UsageError, run_absl
from lctx.eval.api import DEFAULT_LENGTHS, DEFAULTS, TASKS, check_options, evaluate, format_table

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of python -m lctx.train.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_TASKS = flags.DEFINE_list("tasks", list(TASKS), ", ".join(TASKS) + ".")
_LENGTHS = flags.DEFINE_list("lengths", [str(n) for n in DEFAULT_LENGTHS], "Context lengths (tokens).")
_DEPTHS = flags.DEFINE_list("depths", [str(d) for d in DEFAULTS["depths"]],
                            "Key / needle depths in [0, 1].")
_TRIALS = flags.DEFINE_integer("trials", DEFAULTS["trials"],
                               "Random keys (passkey) / haystacks (needle) per cell.")
_STRIDE = flags.DEFINE_integer("stride", DEFAULTS["stride"],
                               "Sliding-window stride (scored tokens per window).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", DEFAULTS["max_tokens"],
                                   "Held-out tokens scored per length.")
_BATCH = flags.DEFINE_integer("batch_size", DEFAULTS["batch_size"],
                              "Perplexity windows per forward pass.")
_SEED = flags.DEFINE_integer("seed", DEFAULTS["seed"], "Passkey keys.")
_ROPE_SCALING = flags.DEFINE_string(
    "rope_scaling", None, "HF-style rope_scaling JSON evaluated in place of the checkpoint's, "
    'e.g. \'{"rope_type": "dynamic", "factor": 4.0}\' ({"rope_type": "default"}: plain RoPE).')

_ROPE_EXAMPLE = '{"rope_type": "linear", "factor": 2.0}'


def _numbers(name: str, values: list[str], kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise UsageError(f"--{name}={','.join(values)}: expected comma-separated "
                         f"{kind.__name__}s") from None


def _rope_scaling(text: str) -> dict:
    """The --rope_scaling JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--rope_scaling={text}: not valid JSON ({err.msg} at column "
                         f"{err.colno}); expected an object like {_ROPE_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--rope_scaling={text}: expected a JSON object like {_ROPE_EXAMPLE}")
    return value


def _workdir(path: str | None) -> str:
    if not path:
        raise UsageError("--workdir: required; give a run directory of python -m lctx.train")
    if not os.path.isdir(path):
        raise UsageError(f"--workdir={path}: no such directory; expected a run directory of "
                         "python -m lctx.train")
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"{' '.join(argv[1:])}: unexpected arguments; "
                         "give flags as --name=value")
    logging.set_verbosity(logging.WARNING)
    tasks = tuple(_TASKS.value)
    lengths = _numbers("lengths", _LENGTHS.value, int)
    options = dict(depths=_numbers("depths", _DEPTHS.value, float), trials=_TRIALS.value,
                   stride=_STRIDE.value, max_tokens=_MAX_TOKENS.value, batch_size=_BATCH.value,
                   seed=_SEED.value)
    if _ROPE_SCALING.value is not None:
        options["rope_scaling"] = _rope_scaling(_ROPE_SCALING.value)
    problems = check_options(tasks, lengths, options)
    if problems:
        raise UsageError(*(f"--{line}" for line in problems))  # "tasks=[...]: ..." names the flag
    workdir = _workdir(_WORKDIR.value)
    try:
        results = evaluate(workdir, _STEP.value, tasks, lengths, **options)
    except ValueError as err:  # a run, step or checkpoint that does not fit: the user's to fix
        raise UsageError(str(err)) from None
    print(f"{results['workdir']} step {results['step']} (stage {results['stage']})")
    print(format_table(results))
    print(f"wrote {results['workdir']}/eval/results.json and {len(results['plots'])} plots")


if __name__ == "__main__":
    run_absl(main, prog="lctx.eval")
