"""python -m lctx.train --config=configs/<recipe>.py [--config.a.b=value ...]

Thin entry point: parse, validate (exit 2, one line per problem, no traceback),
then hand the config to `lctx.training.loop.run`. Rerunning the same command resumes.

Multi-process (one process per host of a TPU pod slice, or several CPU processes):
the distributed runtime starts by itself on Cloud TPU VMs; elsewhere pass
--lctx_coordinator=host:port --lctx_num_processes=N --lctx_process_id=i (or set
LCTX_COORDINATOR, LCTX_NUM_PROCESSES, LCTX_PROCESS_ID). If any process fails, the
others stop with a message and exit at once instead of waiting for the dead one.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run recipe: configs/<name>.py",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string("lctx_coordinator", None,
                                   "host:port of process 0 (else $LCTX_COORDINATOR)")
_NUM_PROCESSES = flags.DEFINE_integer("lctx_num_processes", None,
                                      "processes in the run (else $LCTX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer("lctx_process_id", None,
                                   "this process's id in [0, N) (else $LCTX_PROCESS_ID)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        print("lctx.train: --config=configs/<recipe>.py is required", file=sys.stderr)
        sys.exit(2)

    import jax

    from lctx.parallel import distributed
    from lctx.training import config as cfg
    from lctx.training.loop import TrainingError, run
    from lctx.training.summary import print_summary

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as err:
        print(f"lctx.train: {err}", file=sys.stderr)
        sys.exit(2)
    problems = cfg.problems(config, jax.device_count())
    if problems:
        print("lctx.train: invalid config:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        sys.exit(2)
    try:
        summary = run(config)
    except BaseException as err:
        known = isinstance(err, (TrainingError, ValueError))
        if jax.process_count() > 1:
            _exit_now(err, known, jax.process_index(), jax.process_count())
        if known:
            print(f"lctx.train: {err}", file=sys.stderr)
            sys.exit(1)
        raise
    if "interrupted" in summary:
        sys.exit(143 if summary["interrupted"] == "SIGTERM" else 130)
    if jax.process_index() == 0:
        print_summary(summary)


def _exit_now(err: BaseException, known: bool, index: int, count: int) -> None:
    """Ends this process of a multi-process run at once, skipping JAX's shutdown
    barrier (it would wait for a dead peer until the heartbeat timeout)."""
    if known:
        print(f"lctx.train: process {index} of {count}: {err}", file=sys.stderr)
    else:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"lctx.train: process {index} of {count} stopped: {type(err).__name__}: {first}\n"
              "lctx.train: in a multi-process run this usually means another process failed or "
              "was killed (see its log); exiting now without waiting for the others",
              file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    app.run(main)
