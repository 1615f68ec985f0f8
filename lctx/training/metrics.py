"""Run metrics: metrics.jsonl, TensorBoard event files and the loss-curve PNG.

Only process 0 writes (the others get a writer that does nothing), so multi-host
runs produce one set of files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            from tensorboardX import SummaryWriter  # imported lazily: heavy, process 0 only

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        self._start = time.time()

    def write(self, record: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        record = {**record, "elapsed": round(time.time() - self._start, 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._tb.add_scalar(f"{record.get('stage', 'run')}/{key}", value, global_step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The logged records of a run (resumed runs append; later records win per step)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_key = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_key[(rec.get("stage"), rec.get("step"))] = rec
    return list(by_key.values())


def plot_loss_curve(run_dir: str, stage_order: tuple[str, ...]) -> str | None:
    """Writes `loss_curve.png` (loss against global step, one colour per stage)."""
    records = read_metrics(run_dir)
    if not records or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in stage_order:
        points = sorted((r["global_step"], r["loss"]) for r in records if r.get("stage") == name)
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set_xlabel("global step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(run_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
