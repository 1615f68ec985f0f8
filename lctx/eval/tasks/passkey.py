"""passkey: the Landmark / PI passkey prompt in filler sentences (lctx.eval.retrieval)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lctx.eval import retrieval
from lctx.eval.tasks.base import EvalContext, RetrievalTask, register

ANSWER_TOKENS = 8  # a 5-digit key and what may precede it


@register
class Passkey(RetrievalTask):
    """A random 5-digit key per (length, trial): every depth of a trial hides the same key."""

    name = "passkey"
    skip_reason = "filler below 75% of the prompt"
    curve_png = "passkey.png"
    heatmap_png = None
    title = "passkey retrieval"

    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> retrieval.Prompt | None:
        return retrieval.passkey_prompt(ctx.tokenizer, length, depth,
                                        retrieval.passkey_keys(rng, 1)[0],
                                        answer_tokens=ANSWER_TOKENS)

    def max_new_tokens(self, ctx: EvalContext, prompt: retrieval.Prompt) -> int:
        return ANSWER_TOKENS

    def score(self, continuation: str, prompt: retrieval.Prompt) -> float:
        return float(retrieval.score_passkey(continuation, prompt.answer))

    def cell_fields(self, prompt: retrieval.Prompt) -> dict[str, Any]:
        return {"instruction": "short" if prompt.instruction == retrieval.SHORT_INSTRUCTION
                else "full"}
