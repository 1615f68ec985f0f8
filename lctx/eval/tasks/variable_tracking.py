"""variable_tracking: RULER's variable tracking: every variable a chain assigns one value.

Two chains of five variables, "VAR QKZTM = 48213." then "VAR BWOAX = VAR QKZTM." and
so on; the question gives the first chain's value and asks for all five names. The
first chain starts at the cell's depth and its later links follow at random depths
after it; the distractor chain (another value) is spread at random depths. Score:
the share of the five names among the first five upper-case 5-letter words of the
reply (RULER's string_match_all); a cell's "correct" counts replies with all five.
"""

from __future__ import annotations

import numpy as np

from lctx.eval import ruler
from lctx.eval.tasks.base import EvalContext, RulerTask, register

HOPS = 4  # links after the first assignment: five variables per chain
INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def chain(names: list[str], value: str) -> list[str]:
    """The statements assigning `value` to names[0], then each name to the one before."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


@register
class VariableTracking(RulerTask):
    name = "variable_tracking"
    title = "variable tracking"
    answer_pattern = r"\b[A-Z]{5}\b"

    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> ruler.RulerPrompt | None:
        names = ruler.random_names(rng, 2 * (HOPS + 1))
        asked, other = names[:HOPS + 1], names[HOPS + 1:]
        value, other_value = ruler.random_numbers(rng, 2, digits=5)
        # Ascending depths keep each chain in order (insert_sentences keeps ties in order).
        placed = list(zip([depth] + ruler.other_depths(rng, HOPS, low=depth), chain(asked, value)))
        placed += zip(ruler.other_depths(rng, HOPS + 1), chain(other, other_value))
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
                  f"{HOPS + 1} variables are assigned the value {value}, they are:")

        def render(haystack: str) -> str:
            context, _ = ruler.insert_sentences(haystack, placed)
            return ruler.task_text(ctx.tokenizer, INSTRUCTION, context, question, prefix)

        return ruler.build_prompt(ctx.tokenizer, ctx.haystack(length, trial), length, depth,
                                  asked, render)
