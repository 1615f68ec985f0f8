"""Multi-process JAX: starting the distributed runtime and choosing each process's data.

A TPU pod slice is many hosts, each one JAX process; several CPU processes on one
machine (gloo collectives over loopback) are the same thing in miniature, which is
how it is tested here. `initialize` starts `jax.distributed`:

- explicitly, from `coordinator` / `num_processes` / `process_id` (the `--lctx_*`
  flags of `python -m lctx.train`) or the environment variables LCTX_COORDINATOR,
  LCTX_NUM_PROCESSES, LCTX_PROCESS_ID; flags win over the environment;
- automatically on a Cloud TPU VM (JAX reads the slice's workers from the metadata server);
- not at all for one process.

Data: a process reads only the rows of the global batch its devices hold, chosen
by the data-parallel block of the batch sharding (`process_data_shard`), never by
the process index, so processes that hold one sequence-parallel replica read the
same examples.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

ENV_COORDINATOR = "LCTX_COORDINATOR"
ENV_NUM_PROCESSES = "LCTX_NUM_PROCESSES"
ENV_PROCESS_ID = "LCTX_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "LCTX_HEARTBEAT_TIMEOUT"
# A dead peer is declared after this many seconds without heartbeats (JAX's default,
# 100 s, also holds every survivor in the shutdown barrier that long).
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
    """How this process joins a multi-process run."""

    coordinator: str  # host:port of process 0's coordination service
    num_processes: int
    process_id: int


def explicit_setup(coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, environ: Mapping[str, str] = os.environ
                   ) -> ProcessSetup | None:
    """The setup given by arguments (or else LCTX_* variables); None for one process.

    Raises ValueError naming the missing or bad values: either none of the three or
    all of them must be given (num_processes=1 alone is one process).
    """
    pick = lambda arg, key: arg if arg not in (None, "") else environ.get(key) or None
    given = {"coordinator": pick(coordinator, ENV_COORDINATOR),
             "num_processes": pick(num_processes, ENV_NUM_PROCESSES),
             "process_id": pick(process_id, ENV_PROCESS_ID)}
    names = {"coordinator": f"lctx_coordinator / {ENV_COORDINATOR}",
             "num_processes": f"lctx_num_processes / {ENV_NUM_PROCESSES}",
             "process_id": f"lctx_process_id / {ENV_PROCESS_ID}"}
    if all(v is None for v in given.values()):
        return None
    problems = []
    count = _as_int(given["num_processes"])
    index = _as_int(given["process_id"])
    if given["num_processes"] is not None and (count is None or count < 1):
        problems.append(f"{names['num_processes']}={given['num_processes']!r}: expected an int >= 1")
    if count == 1 and given["coordinator"] is None and index in (None, 0):
        return None
    for key, value in given.items():
        if value is None:
            problems.append(f"{names[key]} is missing: a multi-process run needs the coordinator "
                            "host:port, the process count and this process's id")
    coord = given["coordinator"]
    if coord is not None and (":" not in coord or not coord.rsplit(":", 1)[1].isdigit()):
        problems.append(f"{names['coordinator']}={coord!r}: expected host:port, e.g. 10.0.0.2:8476")
    bad_index = index is None or (count is not None and not 0 <= index < count)
    if given["process_id"] is not None and bad_index:
        problems.append(f"{names['process_id']}={given['process_id']!r}: expected an int in "
                        f"[0, {count if count else 'num_processes'})")
    if problems:
        raise ValueError("; ".join(problems))
    return ProcessSetup(coord, count, index)


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def heartbeat_timeout_s(environ: Mapping[str, str] = os.environ) -> int:
    """Seconds without heartbeats after which a process counts as dead (LCTX_HEARTBEAT_TIMEOUT)."""
    raw = environ.get(ENV_HEARTBEAT_TIMEOUT)
    if raw is None or raw == "":
        return DEFAULT_HEARTBEAT_TIMEOUT_S
    value = _as_int(raw)
    if value is None or value < 1:
        raise ValueError(f"{ENV_HEARTBEAT_TIMEOUT}={raw!r}: expected a whole number of seconds >= 1")
    return value


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM: TPU chips are attached and libtpu is installed."""
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


_STARTED = False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts `jax.distributed` when this is one process of several; call before any device use.

    Returns True when the runtime was started (or was already). With an explicit
    setup, CPU collectives go over gloo (TCP), so CPU processes form one mesh.
    """
    global _STARTED
    if _STARTED:
        return True
    setup = explicit_setup(coordinator, num_processes, process_id)
    timeout = heartbeat_timeout_s()
    if setup is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(setup.coordinator, setup.num_processes, setup.process_id,
                                   cluster_detection_method="deactivate",
                                   heartbeat_timeout_seconds=timeout)
    elif on_cloud_tpu_vm():
        jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
    else:
        return False
    _STARTED = True
    return True


def process_data_shard(sharding: Sharding, global_shape: tuple[int, ...], *,
                       process_index: int | None = None,
                       process_of: Callable[[jax.Device], int] | None = None) -> tuple[int, int]:
    """(shard_index, shard_count) of the rows of a `global_shape` array a process holds.

    A process holds the rows of its devices under `sharding` (batch on axis 0), in
    one block or several (a TPU mesh may interleave hosts along the data axes).
    Processes holding the same rows (replicas, e.g. parts of one sequence) form one
    data shard and read the same examples; the shards, ordered by their first row,
    must split the batch into disjoint equal parts. `process_of` (default
    `device.process_index`) and `process_index` (default this process) let a test
    pretend one host is several.
    """
    process_of = process_of or (lambda device: device.process_index)
    process_index = jax.process_index() if process_index is None else process_index
    global_batch = global_shape[0]
    rows: dict[int, set[tuple[int, int]]] = {}
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        rows.setdefault(process_of(device), set()).add(index[0].indices(global_batch)[:2])
    shards = sorted({frozenset(r) for r in rows.values()}, key=min)
    covered = sorted(block for shard in shards for block in shard)
    sizes = {sum(stop - start for start, stop in shard) for shard in shards}
    tiled = all(a[1] == b[0] for a, b in zip(covered, covered[1:])) and \
        covered[0][0] == 0 and covered[-1][1] == global_batch
    if len(sizes) != 1 or not tiled:
        held = {p: sorted(r) for p, r in sorted(rows.items())}
        raise ValueError(f"batch sharding {sharding}: the processes hold rows {held} of "
                         f"{global_batch}; processes must hold either the same rows or disjoint "
                         "rows of equal count (choose mesh sizes that split the hosts evenly)")
    return shards.index(frozenset(rows[process_index])), len(shards)


def process_batch(sharding: Sharding, local: Mapping[str, np.ndarray], global_batch: int
                  ) -> dict[str, jax.Array]:
    """Global arrays `[global_batch, ...]` from this process's rows (`process_data_shard`)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
            for k, v in local.items()}


def gather_shard_states(state: Any, shard_index: int, shard_count: int) -> list[Any]:
    """Every data shard's JSON-able iterator state, indexed by shard (a collective call).

    Processes holding the same shard hold the same state; any one of them is kept.
    """
    if jax.process_count() == 1:
        return [state]
    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(encoded), shard_index], np.int64))
    padded = np.zeros(int(lengths[:, 0].max()), np.uint8)
    padded[:len(encoded)] = encoded
    everyone = multihost_utils.process_allgather(padded)
    states: list[Any] = [None] * shard_count
    for (length, index), row in zip(lengths, everyone):
        states[int(index)] = json.loads(row[:int(length)].tobytes().decode())
    missing = [i for i, s in enumerate(states) if s is None]
    if missing:
        raise RuntimeError(f"data shards {missing} of {shard_count} are held by no process")
    return states


def run_on_process_zero_first(fn, name: str):
    """`fn()` on process 0, then (after a barrier) on the others: for a build that
    every process needs but only one should write on a shared disk."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(name)
    return result if jax.process_index() == 0 else fn()
