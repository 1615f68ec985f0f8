"""The beacon study's table (printed, written to table.md) and PNGs, from cells/ and
the training run's metrics.jsonl.

    python experiments/beacons/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CELLS, EVAL_LENGTHS, EVAL_RATIOS, HERE, LONG, RUN, SPEED_LENGTHS  # noqa: E402


def read_cells() -> dict[tuple[str, int], dict]:
    cells = {}
    for path in sorted(CELLS.glob("*.json")):
        record = json.loads(path.read_text())
        cells[(record["setting"], record["length"])] = record
    return cells


def table(cells: dict) -> str:
    lengths = (*EVAL_LENGTHS, LONG)
    k = [f"{n // 1024}K" for n in lengths]
    head = (["setting"] + [f"ppl {n}" for n in k] + [f"KV MiB {n}" for n in k] +
            [f"passkey {n}" for n in k] +
            [f"{what} {n // 1024}K" for n in SPEED_LENGTHS for what in ("prefill s", "decode ms/tok")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = ["full"] + [name for r in EVAL_RATIOS for name in
                        (f"beacon{r}", f"beacon{r}_untrained", f"sink_window{r}", f"snapkv{r}")]
    dash = "—"
    for key in names:
        ppl = [cells.get((key, n)) for n in lengths]
        row = [dash if r is None else f"{r['result']['ppl']:.3f}" for r in ppl]
        row += [dash if r is None else f"{r['result']['kv_bytes'] / 2**20:.0f}" for r in ppl]
        for n in lengths:
            r = cells.get((f"passkey_{key}", n))
            row.append(dash if r is None else
                       f"{sum(r['result']['correct'])}/{len(r['result']['correct'])}")
        for n in SPEED_LENGTHS:
            speed = cells.get((f"speed_{key}", n))
            row += [dash, dash] if speed is None else [f"{speed['result']['prefill_s']:.1f}",
                                                       f"{speed['result']['decode_ms']:.0f}"]
        lines.append("| " + " | ".join([key] + row) + " |")
    return "\n".join(lines)


def plot_perplexity(cells: dict, path: Path) -> None:
    """Perplexity against length per ratio: trained and untrained beacons, eviction at the
    same memory, the full cache."""
    lengths = (*EVAL_LENGTHS, LONG)
    fig, axes = plt.subplots(1, len(EVAL_RATIOS), figsize=(4 * len(EVAL_RATIOS), 3.5), sharey=True)
    for ax, r in zip(axes, EVAL_RATIOS):
        for key, style in ((f"beacon{r}", "o-"), (f"beacon{r}_untrained", "o:"),
                           (f"sink_window{r}", "s-"), (f"snapkv{r}", "^-"), ("full", "k--")):
            points = [(n // 1024, cells[(key, n)]["result"]["ppl"]) for n in lengths
                      if (key, n) in cells]
            if points:
                ax.plot(*zip(*points), style, label=key.replace(str(r), ""))
        ax.set(title=f"ratio {r} (equal memory)", xlabel="tokens (K)", xticks=[n // 1024 for n in lengths])
        ax.set_yscale("log")
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(path: Path) -> None:
    metrics = RUN / "metrics.jsonl"
    if not metrics.exists():
        return
    log = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    log = list({r["step"]: r for r in log}.values())  # a resumed run repeats steps: the last wins
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], marker=".")
    ax.set(xlabel="step (4096 tokens, ratio drawn per 1024-token chunk from 2, 4, 8, 16)",
           ylabel="next-token loss (nats)", title="Beacon module training, SmolLM2-135M frozen")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    cells = read_cells()
    text = table(cells)
    (HERE / "table.md").write_text(text + "\n")
    print(text)
    plot_training(HERE / "training.png")
    plot_perplexity(cells, HERE / "perplexity.png")


if __name__ == "__main__":
    main()
