"""Reusable benchmark helpers: timing, compiled memory, a matmul-rate yardstick, output.

Every helper works on an already-jitted function and concrete (placed) arrays, so
compile time, run time and memory are measured separately:

    compiled, compile_s = compile_fn(jax.jit(f), *args)
    memory = memory_stats(compiled)          # from XLA's buffer assignment, nothing runs
    timing = time_compiled(compiled, *args)  # warm-up, then the median of several runs

Memory figures are those of XLA's compiled memory analysis; for an SPMD program they
are per device (one partition's buffers).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import jaxlib

GIB = 1024**3


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of repeated runs after warm-up."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "runs_s": self.runs}


def block(tree: Any) -> Any:
    """Waits for every array in `tree` (results of an async dispatch)."""
    return jax.block_until_ready(tree)


def compile_fn(jitted: Any, *args: Any) -> tuple[Any, float]:
    """Lowers and compiles `jitted` for `args`; returns (executable, compile seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_compiled(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1,
                  max_seconds: float = float("inf")) -> Timing:
    """Timings of `fn(*args)` (blocked until ready) after `warmup` runs.

    Stops early once the timed runs have taken `max_seconds` in total, after two runs
    (or after one when a single warm-up run already took `max_seconds`: the slowest
    rows on a small machine).
    """
    warm = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        block(fn(*args))
        warm = time.perf_counter() - start
    least = 1 if warm >= max_seconds else 2
    runs: list[float] = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        block(fn(*args))
        runs.append(time.perf_counter() - start)
        if len(runs) >= least and sum(runs) >= max_seconds:
            break
    return Timing(runs)


def time_interleaved(fns: dict[str, Callable[..., Any]], args: dict[str, tuple], rounds: int = 5,
                     warmup: int = 1) -> dict[str, Timing]:
    """Times several functions in alternating rounds (one run each, order rotating).

    On a shared machine the load drifts; alternating runs expose every candidate to
    the same drift, so their medians compare fairly.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            block(fns[name](*args[name]))
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            block(fns[name](*args[name]))
            runs[name].append(time.perf_counter() - start)
    return {name: Timing(r) for name, r in runs.items()}


# ----------------------------------------------------------------------------- memory


def memory_stats(compiled: Any) -> dict[str, int]:
    """Bytes from `compiled.memory_analysis()` and their peak estimate.

    `total` = temp + argument + output - alias (what the executable holds at once);
    `peak` is XLA's own figure where this JAX reports one (else 0).
    """
    analysis = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    stats = {name.removesuffix("_size_in_bytes"): int(getattr(analysis, name, 0) or 0)
             for name in fields}
    stats["total"] = stats["temp"] + stats["argument"] + stats["output"] - stats["alias"]
    stats["peak"] = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)
    return stats


# ----------------------------------------------------------------------------- yardstick


class MatmulMeter:
    """The rate of a large float32 matmul, sampled repeatedly through a run.

    On a shared, noisy machine the attainable rate drifts; sampling it before and
    after every measured row and taking the median gives a fair denominator.
    """

    def __init__(self, size: int = 4096, repeats: int = 3, dtype: Any = jnp.float32):
        key_a, key_b = jax.random.split(jax.random.key(0))
        self.size = size
        self.repeats = repeats
        self._a = jax.random.normal(key_a, (size, size), dtype)
        self._b = jax.random.normal(key_b, (size, size), dtype)
        self._matmul, _ = compile_fn(jax.jit(jnp.matmul), self._a, self._b)
        self.samples: list[float] = []

    @property
    def flops(self) -> float:
        return 2.0 * self.size**3

    def sample(self) -> float:
        """Measures once (median of `repeats` runs); returns GFLOP/s and records it."""
        timing = time_compiled(self._matmul, self._a, self._b, repeats=self.repeats,
                               warmup=0 if self.samples else 1)
        rate = self.flops / timing.median / 1e9
        self.samples.append(rate)
        return rate

    @property
    def median(self) -> float:
        """Median GFLOP/s over all samples so far."""
        return statistics.median(self.samples)


# ----------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 left: Sequence[int] = (0,)) -> str:
    """A plain-text table: columns right-aligned except those in `left` (indices)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    left = {i % len(headers) for i in left}

    def line(row: Sequence[str]) -> str:
        parts = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def environment_info() -> dict[str, Any]:
    """What the numbers depend on: versions, devices, cores, date."""
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Writes `payload` plus an `environment` block as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"environment": environment_info(), **payload}
    path.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
