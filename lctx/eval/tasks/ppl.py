"""ppl: held-out perplexity and bits per byte against context length (sliding windows)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from lctx.eval import plots
from lctx.eval.tasks.base import EvalContext, Task, register


@register
class Perplexity(Task):
    """Section: {str(length): {"ppl", "nll", "bits_per_byte", "tokens", "documents"}}."""

    name = "ppl"

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        section = {}
        for length in ctx.lengths:
            section[str(length)] = ctx.perplexity(length)
            ctx.advance(self.name, length)
        return section

    def plot(self, section: Mapping[str, Any], out_dir: str, label: str,
             training_lengths: Sequence[int]) -> list[str]:
        curve = {int(n): r["ppl"] for n, r in section.items()}
        return [plots.plot_perplexity({label: curve}, os.path.join(out_dir, "ppl_vs_length.png"),
                                      training_lengths=training_lengths)]

    def columns(self, section: Mapping[str, Any]) -> list[tuple[str, dict[int, str]]]:
        return [("ppl", {int(n): f"{r['ppl']:.3f}" for n, r in section.items()}),
                ("bits/byte", {int(n): f"{r['bits_per_byte']:.4f}" for n, r in section.items()})]
