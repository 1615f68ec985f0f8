"""The study's table (Markdown, printed and written to table.md) and its two PNGs, from cells/.

    python experiments/smollm2_extension/report.py

A cell not measured yet shows as "—"; the table's last column is the wall time of
the method's measured cells.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CELLS, HERE, LENGTHS, TRAINED, methods  # noqa: E402

RETRIEVAL = ("passkey", "multikey_needle")


def read_cells() -> dict[tuple[str, str, int], dict]:
    cells = {}
    for path in sorted(CELLS.glob("*.json")):
        record = json.loads(path.read_text())
        cells[(record["method"], record["task"], record["length"])] = record
    return cells


def value(record: dict | None) -> float | None:
    """Perplexity, or retrieval accuracy, of one cell (None: not measured)."""
    if record is None:
        return None
    result = record["result"]
    if record["task"] == "ppl":
        return result[str(record["length"])]["ppl"]
    return result["accuracy"][str(record["length"])]


def _fmt(task: str, x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}" if task == "ppl" else f"{x:.0f}"


def table(cells: dict) -> str:
    columns = [(t, n) for t in LENGTHS for n in LENGTHS[t]]
    names = {"ppl": "ppl", "passkey": "passkey", "multikey_needle": "mk-needle"}
    head = ["method"] + [f"{names[t]} {n // 1024}K" for t, n in columns] + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods():
        row = [method] + [_fmt(t, value(cells.get((method, t, n)))) for t, n in columns]
        wall = sum(r["wall_s"] for (m, _, _), r in cells.items() if m == method)
        lines.append("| " + " | ".join(row + [f"{wall:.0f}"]) + " |")
    return "\n".join(lines)


def plot_ppl(cells: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods():
        points = [(n, value(cells.get((method, "ppl", n)))) for n in LENGTHS["ppl"]]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=method,
                    linestyle="--" if method.endswith("4") else "-")
    ax.axvline(TRAINED, color="grey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)",
           ylabel="perplexity (held-out stdlib code)",
           title="SmolLM2-135M zero-shot: perplexity against length (trained: 8K)")
    ax.set_xticks(LENGTHS["ppl"], [f"{n // 1024}K" for n in LENGTHS["ppl"]])
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_accuracy(cells: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, task in zip(axes, RETRIEVAL):
        for i, method in enumerate(methods()):
            points = [(n, value(cells.get((method, task, n)))) for n in LENGTHS[task]]
            points = [(n, v) for n, v in points if v is not None]
            if points:  # a small offset per method keeps 0/1 points apart
                xs, ys = zip(*points)
                ax.plot(xs, [y + 0.012 * (i - 6) for y in ys], marker="o", label=method,
                        linestyle="--" if method.endswith("4") else "-")
        ax.axvline(TRAINED, color="grey", linewidth=0.8)
        ax.set(xlabel="context length (tokens)", title=task, ylim=(-0.15, 1.15))
        ax.set_xticks(LENGTHS[task], [f"{n // 1024}K" for n in LENGTHS[task]])
    axes[0].set_ylabel("accuracy (1 trial, key at depth 0.5)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M zero-shot: retrieval against length per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    cells = read_cells()
    text = table(cells)
    (HERE / "table.md").write_text(text + "\n")
    print(text)
    plot_ppl(cells, HERE / "ppl_vs_length.png")
    plot_accuracy(cells, HERE / "accuracy_vs_length.png")
    print(f"{len(cells)} cells; wrote table.md, ppl_vs_length.png, accuracy_vs_length.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
