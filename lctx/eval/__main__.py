"""python -m lctx.eval --workdir=RUN [--step=N] --tasks=ppl,passkey,needle --lengths=256,512,1024,2048

Thin entry point: parse and check the flags (a bad one: one line, exit 2), evaluate
the run's checkpoint, print the table; results.json and PNGs go to RUN/eval/.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of python -m lctx.train.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_TASKS = flags.DEFINE_list("tasks", ["ppl", "passkey", "needle"], "ppl, passkey, needle.")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "512", "1024", "2048"], "Context lengths (tokens).")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"],
                            "Key / needle depths in [0, 1].")
_TRIALS = flags.DEFINE_integer("trials", 4, "Random keys (passkey) / haystacks (needle) per cell.")
_STRIDE = flags.DEFINE_integer("stride", 256, "Sliding-window stride (scored tokens per window).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32768, "Held-out tokens scored per length.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Perplexity windows per forward pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Passkey keys.")


def _fail(message: str) -> None:
    print(f"lctx.eval: {message}", file=sys.stderr)
    sys.exit(2)


def _numbers(name: str, values: list[str], kind):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        _fail(f"--{name}={','.join(values)}: expected comma-separated {kind.__name__}s")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        _fail("--workdir=RUN is required (a run directory of python -m lctx.train)")
    lengths = _numbers("lengths", _LENGTHS.value, int)
    depths = _numbers("depths", _DEPTHS.value, float)
    from lctx.eval.api import check_options, evaluate, format_table

    options = dict(depths=depths, trials=_TRIALS.value, stride=_STRIDE.value,
                   max_tokens=_MAX_TOKENS.value, batch_size=_BATCH.value, seed=_SEED.value)
    problems = check_options(tuple(_TASKS.value), lengths, options)
    if problems:
        _fail("; ".join(problems))
    try:
        results = evaluate(_WORKDIR.value, _STEP.value, tuple(_TASKS.value), lengths, **options)
    except ValueError as err:
        _fail(str(err))
    print(f"{results['workdir']} step {results['step']} (stage {results['stage']})")
    print(format_table(results))
    print(f"wrote {results['workdir']}/eval/results.json and {len(results['plots'])} plots")


if __name__ == "__main__":
    app.run(main)
