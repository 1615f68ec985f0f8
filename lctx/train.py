"""python -m lctx.train --config=configs/<recipe>.py [--config.a.b=value ...]

Thin entry point: parse, validate (exit 2, one line per problem, no traceback),
then hand the config to `lctx.training.run`. Rerunning the same command resumes.
"""

from __future__ import annotations

import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run recipe: configs/<name>.py",
                                          lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        print("lctx.train: --config=configs/<recipe>.py is required", file=sys.stderr)
        sys.exit(2)

    import jax

    from lctx.training import config as cfg
    from lctx.training.loop import TrainingError, run
    from lctx.training.summary import print_summary

    problems = cfg.problems(config, jax.device_count())
    if problems:
        print("lctx.train: invalid config:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        sys.exit(2)
    try:
        summary = run(config)
    except (TrainingError, ValueError) as err:
        print(f"lctx.train: {err}", file=sys.stderr)
        sys.exit(1)
    if "interrupted" in summary:
        sys.exit(143 if summary["interrupted"] == "SIGTERM" else 130)
    print_summary(summary)


if __name__ == "__main__":
    app.run(main)
