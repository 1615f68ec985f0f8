"""The end-of-run summary printed to the terminal."""

from __future__ import annotations

from typing import Any


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"run: {summary['run_dir']}", f"corpus: {summary['corpus']}"]
    for name, stats in summary["stages"].items():
        if stats.get("resumed_complete"):
            lines.append(f"stage {name}: complete (from checkpoint)")
        else:
            lines.append(f"stage {name}: final loss {stats['final_loss']:.4f} nats/token, "
                         f"{stats['tokens_per_sec']:,.0f} tokens/s")
    ev = summary.get("eval")
    if ev:
        lines.append("held-out  length  perplexity  bits/byte")
        for length, r in ev["lengths"].items():
            lines.append(f"          {int(length):6d}  {r['ppl']:10.3f}  {r['bits_per_byte']:9.3f}")
        if "unigram_bits_per_byte" in ev:
            lines.append(f"unigram bits/byte of the corpus: {ev['unigram_bits_per_byte']:.3f}")
    if summary.get("loss_curve"):
        lines.append(f"loss curve: {summary['loss_curve']}")
    return lines


def print_summary(summary: dict[str, Any]) -> None:
    print("\n".join(summary_lines(summary)))
