"""multikey_needle: RULER's NIAH multi-key: the value of one key among distractor needles.

Four needles "One of the special magic numbers for {key} is: {value}." with distinct
keys and values; the queried one sits at the cell's depth, the three distractors at
random depths. Scored by exact match of the first number of the reply.
"""

from __future__ import annotations

import numpy as np

from lctx.eval import ruler
from lctx.eval.tasks.base import EvalContext, RulerTask, register

NEEDLES = 4


@register
class MultiKeyNeedle(RulerTask):
    name = "multikey_needle"
    title = "multi-key needle"

    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> ruler.RulerPrompt | None:
        keys = ruler.random_keys(rng, NEEDLES)
        values = ruler.random_numbers(rng, NEEDLES)
        depths = [depth] + ruler.other_depths(rng, NEEDLES - 1)
        needles = [(d, ruler.NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"

        def render(haystack: str) -> str:
            context, _ = ruler.insert_sentences(haystack, needles)
            return ruler.task_text(ctx.tokenizer, ruler.NIAH_INSTRUCTION, context, question, prefix)

        return ruler.build_prompt(ctx.tokenizer, ctx.haystack(length, trial), length, depth,
                                  values[:1], render)
