"""Orbax checkpoints of the train state plus the run's position (stage, step, data).

Each checkpoint (an Orbax step directory named by the run's global step) holds:
- `state`: params, optimizer state, step and rng (restorable onto any mesh: the
  caller passes the target shardings),
- `meta`: JSON with the stage name and index, the step within the stage, the data
  iterator's state and the config.

Orbax writes into a temporary directory and renames it when complete, so an
interrupted save is never listed; a listed checkpoint that fails to restore
(corrupted files) is skipped with a warning naming it, and the previous one is used.

With several processes every one of them calls save and restore (Orbax writes
each array shard from the process that holds it and the metadata from process 0),
so the directory must be one that all of them see: on a TPU pod slice, a gs:// path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable

import orbax.checkpoint as ocp

from lctx.cli import cause
from lctx.convert.run import drop_stale_orbax_callbacks, orbax_quietly

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A listed checkpoint that cannot be read: truncated, corrupt or of another model."""


class Checkpointer:
    """Asynchronous saves every `every_steps`, keeping the last `keep`."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        with orbax_quietly():  # it reads each step's metadata, damaged or not
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        with orbax_quietly():
            return sorted(self._manager.all_steps())

    def due(self, global_step: int) -> bool:
        return self.every_steps > 0 and global_step % self.every_steps == 0

    def reached_preemption(self, global_step: int) -> bool:
        """True on every process at the same step once any of them got SIGTERM (needs
        jax.distributed; every process must call it at every step)."""
        return self._manager.reached_preemption(global_step)

    def save(self, global_step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving (asynchronously); a later `wait` or save finishes it."""
        if global_step in self._manager.all_steps():
            return
        self._manager.save(global_step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def read_meta(self, global_step: int) -> dict[str, Any]:
        return self._restore(global_step, meta=ocp.args.JsonRestore())["meta"]

    def restore_state(self, global_step: int, abstract_state: Any) -> Any:
        """The state at `global_step`, placed as `abstract_state`'s shardings say."""
        return self._restore(global_step, state=ocp.args.StandardRestore(abstract_state))["state"]

    def _restore(self, global_step: int, **items: Any) -> Any:
        """Orbax's restore; CheckpointError (one line naming the step directory) if it fails."""
        drop_stale_orbax_callbacks()
        try:
            with orbax_quietly():
                return self._manager.restore(global_step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax / tensorstore raise many kinds for damaged files
            raise CheckpointError(
                f"checkpoint {os.path.join(self.directory, str(global_step))} could not be "
                f"restored ({', '.join(items)}: {cause(err)}); it is truncated, corrupt or of "
                "another model") from err

    def restore_latest(self, abstract_state_for: Callable[[dict[str, Any]], Any]
                       ) -> tuple[int, dict[str, Any], Any] | None:
        """(step, meta, state) of the newest checkpoint that restores completely.

        `abstract_state_for(meta)` gives the target structure and shardings (it may
        depend on the stage recorded in meta). Corrupt checkpoints are skipped with a
        warning naming them; None when no checkpoint restores.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
                return step, meta, self.restore_state(step, abstract_state_for(meta))
            except Exception as err:  # corrupt files of any kind: fall back to an older one
                reason = err if isinstance(err, CheckpointError) else (
                    f"checkpoint {os.path.join(self.directory, str(step))} could not be restored "
                    f"({cause(err)})")
                log.warning("%s; trying the previous one", reason)
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

