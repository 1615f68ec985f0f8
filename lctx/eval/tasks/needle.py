"""needle: gkamradt's needle sentence in held-out text at a depth (lctx.eval.retrieval)."""

from __future__ import annotations

import numpy as np

from lctx.eval import retrieval
from lctx.eval.tasks.base import EvalContext, RetrievalTask, register


@register
class NeedleInAHaystack(RetrievalTask):
    """The needle is options["needle"] (a retrieval.Needle; the San Francisco one by default)."""

    name = "needle"
    curve_png = None
    heatmap_png = "needle_heatmap.png"
    title = "needle in a haystack"

    @staticmethod
    def _needle(ctx: EvalContext) -> retrieval.Needle:
        return ctx.options.get("needle") or retrieval.Needle()

    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> retrieval.Prompt | None:
        return retrieval.needle_prompt(ctx.tokenizer, ctx.haystack(length, trial), length, depth,
                                       self._needle(ctx))

    def max_new_tokens(self, ctx: EvalContext, prompt: retrieval.Prompt) -> int:
        return retrieval.needle_answer_tokens(ctx.tokenizer, self._needle(ctx))

    def score(self, continuation: str, prompt: retrieval.Prompt) -> float:
        return float(retrieval.score_needle(continuation, prompt.answer))
