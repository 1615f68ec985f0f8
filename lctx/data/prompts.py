"""The passkey and needle text formats, shared by training's synthetic documents
(lctx.data.synthetic) and the evaluation's prompts (lctx.eval.retrieval).

They live in data, below both, so that building training documents never imports the
evaluation. Passkey (Landmark Attention; PI, Figure 3): an instruction, filler
sentences, the key line, more filler, the question. Needle (gkamradt): a needle
sentence at depth d of a haystack, moved back to a line or sentence end, then the
question and the start of the answer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
SHORT_INSTRUCTION = "Remember the pass key."
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class Needle:
    """A needle sentence, the question that asks for it, and the answer that must follow."""

    sentence: str = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores "
                     "Park on a sunny day.")
    question: str = "What is the best thing to do in San Francisco?"
    answer_prefix: str = "The best thing to do in San Francisco is"
    answer: str = "eat a sandwich and sit in Dolores Park on a sunny day"


def filler_text(sentences: int) -> str:
    """`sentences` filler sentences, cycling through FILLER (5 make the standard block)."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(sentences))


def passkey_text(key: str, before: int, after: int, instruction: str) -> str:
    """The passkey prompt with `before` / `after` filler sentences (the FILLER cycle,
    restarted after the key line) around the key line."""
    parts = [instruction, filler_text(before), KEY_LINE.format(key=key), filler_text(after),
             QUESTION]
    return " ".join(p for p in parts if p)


def passkey_keys(rng: np.random.Generator, count: int) -> list[str]:
    """`count` random 5-digit keys."""
    return [str(k) for k in rng.integers(10000, 100000, size=count)]


def largest_fitting(fits: Callable[[int], bool], hi: int) -> int:
    """Largest n in [0, hi] with fits(n) (fits is monotone decreasing), or -1: sizes a
    prompt in tokens by bisecting over its number of filler sentences."""
    if not fits(0):
        return -1
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def sentence_boundary(text: str, offset: int) -> int:
    """The largest position <= offset that starts a line or follows a sentence end ('. ')."""
    offset = min(max(offset, 0), len(text))
    line = text.rfind("\n", 0, offset)
    sentence = max(text.rfind(". ", 0, offset - 1), text.rfind("? ", 0, offset - 1),
                   text.rfind("! ", 0, offset - 1))
    candidates = [line + 1 if line >= 0 else 0, sentence + 2 if sentence >= 0 else 0]
    return max(c for c in candidates if c <= offset)


def needle_text(haystack: str, depth: float, needle: Needle) -> tuple[str, int]:
    """(prompt text, needle character offset): the needle at `depth` of the haystack,
    moved back to a line or sentence boundary, then the question and answer prefix."""
    cut = sentence_boundary(haystack, int(depth * len(haystack)))
    before, after = haystack[:cut], haystack[cut:]
    sep = "" if not before or before.endswith(("\n", " ")) else " "
    text = f"{before}{sep}{needle.sentence} {after}"
    if not text.endswith("\n"):
        text += "\n"
    return text + f"{needle.question}\n{needle.answer_prefix}", len(before) + len(sep)
