"""The study's table (Markdown, printed and written to table.md) and PNGs, from cells/.

    python experiments/kv_cache/report.py

A cell not measured yet shows as "—".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (BUDGETS, CELLS, CHUNK_STREAM, HERE, QUANTIZED, SEGMENT, SPECS, SPEED,  # noqa: E402
                 STREAM_TOKENS, evicting)

from lctx.infer.kvcache import parse  # noqa: E402

TRAINED = 8192
SMOLLM2 = dict(layers=30, kv_heads=3, head_dim=64, dtype_bytes=4)  # float32 cache


def read_cells() -> dict[tuple[str, str, int], dict]:
    cells = {}
    for path in sorted(CELLS.glob("*.json")):
        record = json.loads(path.read_text())
        cells[(record["task"], record["setting"], record["length"])] = record
    return cells


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _geo(values: list[float]) -> float:
    product = 1.0
    for v in values:
        product *= v
    return product ** (1.0 / len(values))


def stream_ppl(cells, name: str, part: str) -> float | None:
    """Perplexity of the first (in-length, <8K) or second (8K-16K) half of the stream."""
    record = cells.get(("stream", name, STREAM_TOKENS))
    if record is None:
        return None
    segments = record["result"]["segment_ppl"]
    half = TRAINED // SEGMENT
    return _geo(segments[:half] if part == "in" else segments[half:])


def accuracy(cells, task: str, name: str, length: int) -> str:
    record = cells.get((task, name, length))
    if record is None:
        return "—"
    hits = [c["correct"] for c in record["result"]["cells"]]
    return f"{sum(hits)}/{len(hits)}"


def quant(cells, name: str, length: int, key: str) -> float | None:
    record = cells.get(("quant", "all", length))
    return None if record is None or name not in QUANTIZED else record["result"][name][key]


def cache_mb(name: str) -> float:
    """Cache bytes of SmolLM2 holding STREAM_TOKENS tokens written CHUNK_STREAM at a time
    (the calculator's prediction, which the tests check against measured caches)."""
    per_layer = parse(SPECS[name]).nbytes(1, SMOLLM2["kv_heads"], SMOLLM2["head_dim"],
                                          STREAM_TOKENS, CHUNK_STREAM, SMOLLM2["dtype_bytes"])
    return per_layer * SMOLLM2["layers"] / 2**20


def rows() -> list[str]:
    return ["full", *QUANTIZED, *[n for b in BUDGETS for n in evicting(b)]]


def table(cells: dict) -> str:
    head = ["setting", "spec", "cache MiB @16K", "stream ppl 0-8K", "stream ppl 8-16K",
            "passkey 4K", "passkey 8K", "mk-needle 4K", "mk-needle 8K",
            "Δppl 2K", "KL 2K", "Δppl 8K", "KL 8K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in rows():
        row = [name, f"`{SPECS[name]}`", f"{cache_mb(name):.0f}",
               _fmt(stream_ppl(cells, name, "in")), _fmt(stream_ppl(cells, name, "out")),
               *[accuracy(cells, t, name, n) for t in ("passkey", "multikey_needle")
                 for n in (4096, 8192)]]
        for n in (2048, 8192):
            change = quant(cells, name, n, "ppl_change")
            row += [_fmt(None if change is None else 100 * change, "+.2f") + ("%" if change is not None else ""),
                    _fmt(quant(cells, name, n, "mean_kl"), ".4f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def keyscale_lines(cells: dict) -> str:
    record = cells.get(("keyscale", "all", 2048))
    if record is None:
        return "keyscale: not measured"
    r = record["result"]
    out = [f"channel outlier ratio (max / median channel |k|max, median over layers and heads): "
           f"{r['outlier_ratio']:.2f}",
           "| key scales | 4-bit rel. error | 2-bit rel. error |", "|---|---|---|"]
    for layout in ("per_channel", "per_token", "hadamard_per_channel", "hadamard_per_token"):
        out.append(f"| {layout} | {r[f'{layout}_4bit']:.4f} | {r[f'{layout}_2bit']:.4f} |")
    return "\n".join(out)


def speed_lines(cells: dict) -> str:
    lengths = sorted({n for (t, _, n) in cells if t == "speed"})
    if not lengths:
        return "speed: not measured"
    out = ["| setting | " + " | ".join(f"{n // 1024}K prefill s / decode ms" for n in lengths) + " |",
           "|" + "---|" * (len(lengths) + 1)]
    for name in SPEED:
        row = [name]
        for n in lengths:
            r = cells.get(("speed", name, n))
            row.append("—" if r is None else
                       f"{r['result']['prefill_s']:.1f} / {r['result']['decode_ms_per_token']:.0f}")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def plot_stream(cells: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ["full", *evicting(1024)]:
        record = cells.get(("stream", name, STREAM_TOKENS))
        if record is None:
            continue
        seg = record["result"]["segment_ppl"]
        ax.plot([(i + 1) * SEGMENT for i in range(len(seg))], seg, marker="o", label=name)
    ax.axvline(TRAINED, color="grey", linestyle=":", label="trained length")
    ax.set(xlabel="tokens streamed", ylabel=f"perplexity of each {SEGMENT}-token segment",
           yscale="log", title="SmolLM2-135M streaming through a 1024-token cache")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speed(cells: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in SPEED:
        points = sorted((n, r["result"]) for (t, s, n), r in cells.items()
                        if t == "speed" and s == name)
        if not points:
            continue
        xs = [n for n, _ in points]
        left.plot(xs, [r["prefill_s"] for _, r in points], marker="o", label=name)
        right.plot(xs, [r["decode_ms_per_token"] for _, r in points], marker="o", label=name)
    left.set(xlabel="context tokens", ylabel="prefill s", xscale="log", yscale="log")
    right.set(xlabel="context tokens", ylabel="decode ms / token", xscale="log")
    right.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M on 2 CPU cores, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    cells = read_cells()
    text = "\n\n".join([table(cells), keyscale_lines(cells), speed_lines(cells)])
    (HERE / "table.md").write_text(text + "\n")
    print(text)
    plot_stream(cells, HERE / "stream_ppl.png")
    plot_speed(cells, HERE / "speed.png")
    wall = sum(r["wall_s"] for r in cells.values())
    print(f"\n{len(cells)} cells, {wall / 3600:.2f} CPU-hours of wall time")


if __name__ == "__main__":
    main()
