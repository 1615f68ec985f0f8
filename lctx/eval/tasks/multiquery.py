"""multiquery: RULER's NIAH multi-query: the values of four keys asked at once.

Six needles with distinct keys and values, four of them queried; the first queried
sits at the cell's depth, every other needle at a random depth. Score: the share of
the four values among the first four numbers of the reply (RULER's string_match_all);
a cell's "correct" counts replies with all four.
"""

from __future__ import annotations

import numpy as np

from lctx.eval import ruler
from lctx.eval.tasks.base import EvalContext, RulerTask, register

QUERIES = 4
DISTRACTORS = 2


@register
class MultiQuery(RulerTask):
    name = "multiquery"
    title = "multi-query needle"

    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> ruler.RulerPrompt | None:
        count = QUERIES + DISTRACTORS
        keys = ruler.random_keys(rng, count)
        values = ruler.random_numbers(rng, count)
        depths = [depth] + ruler.other_depths(rng, count - 1)
        needles = [(d, ruler.NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        asked = ", ".join(keys[:QUERIES - 1]) + f" and {keys[QUERIES - 1]}"
        question = f"What are all the special magic numbers for {asked} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked} mentioned in the provided text are"

        def render(haystack: str) -> str:
            context, _ = ruler.insert_sentences(haystack, needles)
            return ruler.task_text(ctx.tokenizer, ruler.NIAH_INSTRUCTION, context, question, prefix)

        return ruler.build_prompt(ctx.tokenizer, ctx.haystack(length, trial), length, depth,
                                  values[:QUERIES], render)
