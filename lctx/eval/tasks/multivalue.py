"""multivalue: RULER's NIAH multi-value: one key with four values; all must be returned.

The four needles share the key; the first sits at the cell's depth, the others at
random depths. Score: the share of the four values among the first four numbers of
the reply (RULER's string_match_all); a cell's "correct" counts replies with all four.
"""

from __future__ import annotations

import numpy as np

from lctx.eval import ruler
from lctx.eval.tasks.base import EvalContext, RulerTask, register

VALUES = 4


@register
class MultiValue(RulerTask):
    name = "multivalue"
    title = "multi-value needle"

    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> ruler.RulerPrompt | None:
        key = ruler.random_keys(rng, 1)[0]
        values = ruler.random_numbers(rng, VALUES)
        depths = [depth] + ruler.other_depths(rng, VALUES - 1)
        needles = [(d, ruler.NEEDLE.format(key=key, value=v)) for d, v in zip(depths, values)]
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"

        def render(haystack: str) -> str:
            context, _ = ruler.insert_sentences(haystack, needles)
            return ruler.task_text(ctx.tokenizer, ruler.NIAH_INSTRUCTION, context, question, prefix)

        return ruler.build_prompt(ctx.tokenizer, ctx.haystack(length, trial), length, depth,
                                  values, render)
