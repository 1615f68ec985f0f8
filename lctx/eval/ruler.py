"""RULER-style synthetic retrieval (Hsieh et al. 2024), generated locally, sized in tokens.

A needle is RULER's sentence "One of the special magic numbers for {key} is: {value}."
with an adjective-noun key and a 7-digit value, inserted into held-out text (the
haystack) at a depth: the share of the haystack's characters before it, moved back to
the previous line or sentence start as the needle task does. The question follows the
haystack; with a tokenizer that carries a chat template the instruction, haystack and
question form one user turn, and the answer prefix opens the assistant's reply.

The task modules (lctx.eval.tasks.*) choose the needles and the question; this module
holds what they share: random keys, values and names, insertion, chat wrapping, fitting
a prompt to a token budget, and scoring by the answers in the continuation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lctx.data.tokenizer import Tokenizer
from lctx.eval.retrieval import MIN_HAYSTACK_FRACTION, prompt_ids, sentence_boundary

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure "
                    "to memorize it. I will quiz you about the numbers afterwards.")
NUMBER = r"\d+"

_ADJECTIVES = ("amber", "bitter", "brave", "calm", "clever", "crimson", "curly", "dusty", "eager",
               "faint", "fancy", "frozen", "gentle", "giant", "golden", "hollow", "humble",
               "icy", "jolly", "lazy", "lucky", "misty", "noisy", "polite", "quiet", "rapid",
               "rusty", "silent", "sleepy", "tender", "vivid", "wooden")
_NOUNS = ("anchor", "badger", "basket", "beacon", "canyon", "cobalt", "comet", "falcon", "garden",
          "harbor", "island", "jacket", "kettle", "ladder", "lantern", "meadow", "mirror",
          "needle", "orchid", "pebble", "pepper", "pillow", "quarry", "rabbit", "saddle",
          "spider", "teapot", "thunder", "tunnel", "violin", "walnut", "willow")


@dataclasses.dataclass(frozen=True)
class RulerPrompt:
    """Token ids (BOS first where the tokenizer wants it) of one prompt and its scoring.

    answers: what the continuation must contain (in any order); depth: where the
    first queried needle sits; max_new_tokens: the reply's budget, reserved in the length.
    """

    ids: np.ndarray
    answers: tuple[str, ...]
    depth: float
    filler_fraction: float
    max_new_tokens: int


def random_keys(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct adjective-noun keys ("gentle-harbor")."""
    picks = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=count, replace=False)
    return [f"{_ADJECTIVES[i // len(_NOUNS)]}-{_NOUNS[i % len(_NOUNS)]}" for i in picks]


def random_numbers(rng: np.random.Generator, count: int, digits: int = 7) -> list[str]:
    """`count` distinct random numbers of exactly `digits` digits."""
    values = rng.choice(9 * 10 ** (digits - 1), size=count, replace=False) + 10 ** (digits - 1)
    return [str(v) for v in values]


def random_names(rng: np.random.Generator, count: int, letters: int = 5) -> list[str]:
    """`count` distinct random upper-case names of `letters` letters (RULER's variables)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(chr(65 + c) for c in rng.integers(0, 26, size=letters))
        if name not in names:
            names.append(name)
    return names


def insert_sentences(haystack: str, placed: Sequence[tuple[float, str]]) -> tuple[str, list[int]]:
    """(text, offsets): each (depth, sentence) inserted at the line or sentence start at or
    before depth * len(haystack); sentences at one boundary keep the order given.
    offsets[i] is where sentence i starts in the text."""
    cuts = [sentence_boundary(haystack, int(depth * len(haystack))) for depth, _ in placed]
    order = sorted(range(len(placed)), key=lambda i: (cuts[i], i))
    text, offsets, done = "", [0] * len(placed), 0
    for i in order:
        text += haystack[done:cuts[i]]
        if text and not text.endswith(("\n", " ")):
            text += " "
        offsets[i] = len(text)
        text += placed[i][1] + " "
        done = cuts[i]
    return text + haystack[done:], offsets


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_text(tokenizer: Tokenizer, user: str) -> str:
    """`user` as one user turn of the tokenizer's chat template, with the generation prompt
    (the assistant's turn opened); `user` unchanged when the tokenizer has no template."""
    if not has_chat_template(tokenizer):
        return user

    # The settings transformers' apply_chat_template renders with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(tokenizer.chat_template)
    # bos_token is left undefined (renders empty): prompt_ids adds the BOS id itself when
    # the tokenizer asks for one, so a template that starts with it gets it once.
    return template.render(messages=[{"role": "user", "content": user}],
                           add_generation_prompt=True)


def task_text(tokenizer: Tokenizer, instruction: str, context: str, question: str,
              answer_prefix: str) -> str:
    """The whole prompt text: instruction, context and question (one chat user turn when the
    tokenizer has a template), then the answer prefix the continuation completes."""
    user = f"{instruction}\n{context.rstrip()}\n{question}"
    if has_chat_template(tokenizer):
        return chat_text(tokenizer, user) + answer_prefix
    return f"{user} {answer_prefix}"


def answer_tokens(tokenizer: Tokenizer, answers: Sequence[str]) -> int:
    """Tokens to generate for the answers written as " a, b and c." plus a small margin."""
    return len(tokenizer.encode(" " + ", ".join(answers) + ".")) + 4


def fit_prompt(tokenizer: Tokenizer, haystack: np.ndarray, budget: int,
               render: Callable[[str], str]) -> tuple[np.ndarray, float] | None:
    """(ids, haystack fraction) of render(the longest haystack prefix) within `budget` tokens.

    haystack: int32 `[n]` ids; render(text) -> the whole prompt text around a haystack
    text. None when the haystack would fill less than MIN_HAYSTACK_FRACTION of the prompt.
    """
    fixed = len(prompt_ids(tokenizer, render("")))
    take = min(len(haystack), budget - fixed)
    for _ in range(8):  # re-encoding merges across the seams: trim until it fits
        if take <= 0:
            return None
        ids = prompt_ids(tokenizer, render(tokenizer.decode(haystack[:take])))
        if len(ids) <= budget:
            fraction = 1.0 - fixed / len(ids)
            return (ids, fraction) if fraction >= MIN_HAYSTACK_FRACTION else None
        take -= len(ids) - budget
    return None


def build_prompt(tokenizer: Tokenizer, haystack: np.ndarray, length: int, depth: float,
                 answers: Sequence[str], render: Callable[[str], str]) -> RulerPrompt | None:
    """The prompt of at most `length` tokens including the reply's budget (module docstring)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be in [0, 1]")
    max_new = answer_tokens(tokenizer, answers)
    fitted = fit_prompt(tokenizer, haystack, length - max_new, render)
    if fitted is None:
        return None
    return RulerPrompt(fitted[0], tuple(answers), depth, fitted[1], max_new)


def other_depths(rng: np.random.Generator, count: int, low: float = 0.0,
                 high: float = 1.0) -> list[float]:
    """`count` uniform random depths in [low, high], ascending."""
    return sorted(float(d) for d in rng.uniform(low, high, size=count))


def score_answers(continuation: str, answers: Sequence[str], pattern: str = NUMBER) -> float:
    """Share of `answers` among the first len(answers) matches of `pattern` in the continuation.

    Only that many are read, so a reply that lists every number of the prompt does not
    score; with one answer this is an exact match of the first number. RULER's
    string_match_all averages the same share.
    """
    found = re.findall(pattern, continuation)[:len(answers)]
    return len(set(found) & set(answers)) / len(answers)
