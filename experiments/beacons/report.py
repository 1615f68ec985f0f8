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
from run import CELLS, EVAL_LENGTHS, EVAL_RATIOS, HERE, LONG, RUN, SPEED_LENGTH  # noqa: E402


def read_cells() -> dict[tuple[str, int], dict]:
    cells = {}
    for path in sorted(CELLS.glob("*.json")):
        record = json.loads(path.read_text())
        cells[(record["setting"], record["length"])] = record
    return cells


def table(cells: dict) -> str:
    lengths = (*EVAL_LENGTHS, LONG)
    head = (["setting"] + [f"ppl {n // 1024}K" for n in lengths] +
            [f"KV MiB {n // 1024}K" for n in EVAL_LENGTHS] +
            [f"passkey {n // 1024}K" for n in EVAL_LENGTHS] +
            [f"prefill {SPEED_LENGTH // 1024}K s", "decode ms/token"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = ["full"] + [name for r in EVAL_RATIOS for name in
                        (f"beacon{r}", f"beacon{r}_untrained", f"sink_window{r}", f"snapkv{r}")]
    dash = "—"
    for key in names:
        ppl = [cells.get((key, n)) for n in lengths]
        row = [dash if r is None else f"{r['result']['ppl']:.3f}" for r in ppl]
        row += [dash if r is None else f"{r['result']['kv_bytes'] / 2**20:.0f}" for r in ppl[:2]]
        for n in EVAL_LENGTHS:
            r = cells.get((f"passkey_{key}", n))
            row.append(dash if r is None else
                       f"{sum(r['result']['correct'])}/{len(r['result']['correct'])}")
        speed = cells.get((f"speed_{key}", SPEED_LENGTH))
        row += [dash, dash] if speed is None else [f"{speed['result']['prefill_s']:.1f}",
                                                   f"{speed['result']['decode_ms']:.0f}"]
        lines.append("| " + " | ".join([key] + row) + " |")
    return "\n".join(lines)


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


if __name__ == "__main__":
    main()
