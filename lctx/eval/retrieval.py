"""Passkey retrieval and needle-in-a-haystack prompts, scoring and effective length.

Passkey (Landmark Attention; PI, Figure 3): an instruction, filler sentences, the key
line "The pass key is N. Remember it. N is the pass key.", more filler, and "What is
the pass key? The pass key is". The prompt is sized in tokens of the tokenizer in
use; a length is only evaluated where the filler is at least 75% of the prompt (a
short instruction is tried first when the full one is too long for that).

Needle in a haystack (gkamradt): a needle sentence placed at depth d of held-out
text, moved back to the previous line or sentence end, then the question and the
start of the answer; the continuation must begin with the answer exactly.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

# The text formats live in data (training's synthetic documents use them too); they are
# re-exported here as the evaluation's formats.
from lctx.data.prompts import (FILLER, INSTRUCTION, KEY_LINE, QUESTION,  # noqa: F401
                               SHORT_INSTRUCTION, Needle, filler_text, largest_fitting,
                               needle_text, passkey_keys, passkey_text, sentence_boundary)
from lctx.data.tokenizer import Tokenizer

MIN_FILLER_FRACTION = 0.75
# The needle, question and answer are long; below half the prompt it is no haystack.
MIN_HAYSTACK_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Prompt:
    """Token ids (BOS first unless the tokenizer takes none) of one prompt and its answer."""

    ids: np.ndarray
    answer: str
    depth: float
    filler_fraction: float
    instruction: str = ""


def prompt_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """int32 `[n]`: BOS and the ids of `text`; no BOS where the tokenizer says it takes none (`add_bos`)."""
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []
    return np.concatenate([bos, tokenizer.encode(text)]).astype(np.int32)


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: str, *,
                   answer_tokens: int = 8) -> Prompt | None:
    """The passkey prompt of at most `length - answer_tokens` tokens with the key at `depth`.

    depth in [0, 1]: the share of the filler sentences placed before the key line.
    Tries the full instruction, then the short one; None when neither leaves filler
    at least MIN_FILLER_FRACTION of the prompt's tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be in [0, 1]")
    budget = length - answer_tokens
    for instruction in (INSTRUCTION, SHORT_INSTRUCTION):
        def text(n):
            before = int(round(depth * n))
            return passkey_text(key, before, n - before, instruction)

        n = largest_fitting(lambda n: len(prompt_ids(tokenizer, text(n))) <= budget, 4 * max(budget, 1))
        if n <= 0:
            continue
        ids = prompt_ids(tokenizer, text(n))
        fixed = len(prompt_ids(tokenizer, passkey_text(key, 0, 0, instruction)))
        fraction = 1.0 - fixed / len(ids)
        if fraction >= MIN_FILLER_FRACTION:
            return Prompt(ids, key, depth, fraction, instruction)
    return None


def score_passkey(continuation: str, key: str) -> bool:
    """Exact match of the first number in the continuation with the key."""
    found = re.match(r"\s*(\d+)", continuation)
    return found is not None and found.group(1) == key


def haystack_ids(tokenizer: Tokenizer, texts: Iterable[str], tokens: int) -> np.ndarray:
    """The first `tokens` ids of the texts joined by newlines (fewer if they run out)."""
    pieces, total = [], 0
    for text in texts:
        ids = tokenizer.encode(text + "\n")
        pieces.append(ids)
        total += len(ids)
        if total >= tokens:
            break
    return np.concatenate(pieces)[:tokens] if pieces else np.zeros(0, np.int32)


def needle_prompt(tokenizer: Tokenizer, haystack: np.ndarray, length: int, depth: float,
                  needle: Needle = Needle(), *, answer_tokens: int | None = None) -> Prompt | None:
    """The needle prompt of at most `length - answer_tokens` tokens; None if the haystack
    is too short to fill MIN_HAYSTACK_FRACTION of it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: must be in [0, 1]")
    answer_tokens = answer_tokens or needle_answer_tokens(tokenizer, needle)
    budget = length - answer_tokens
    fixed = len(prompt_ids(tokenizer, f"{needle.sentence} \n{needle.question}\n{needle.answer_prefix}"))
    take = min(len(haystack), budget - fixed)
    for _ in range(8):  # re-encoding merges across the seams: trim until it fits
        if take <= 0:
            return None
        text, _ = needle_text(tokenizer.decode(haystack[:take]), depth, needle)
        ids = prompt_ids(tokenizer, text)
        if len(ids) <= budget:
            fraction = 1.0 - fixed / len(ids)
            if fraction < MIN_HAYSTACK_FRACTION:
                return None
            return Prompt(ids, needle.answer, depth, fraction)
        take -= len(ids) - budget
    return None


def needle_answer_tokens(tokenizer: Tokenizer, needle: Needle) -> int:
    """Tokens to generate: the answer's tokens plus a margin for a leading space."""
    return len(tokenizer.encode(" " + needle.answer)) + 2


def score_needle(continuation: str, answer: str) -> bool:
    """Exact match: the continuation (whitespace normalised) starts with the answer."""
    normal = lambda s: " ".join(s.split())
    return normal(continuation).startswith(normal(answer))


# ----------------------------------------------------------------------------- effective length


def effective_length_80(accuracy: Mapping[int, float], threshold: float = 0.8) -> int:
    """YaRN's definition: the largest length with accuracy >= 80% (0 if none)."""
    return max((n for n, acc in accuracy.items() if acc >= threshold), default=0)


def effective_length_20(accuracy: Mapping[int, float], threshold: float = 0.2) -> int:
    """PI's definition: the largest k such that every evaluated k' <= k succeeds at least
    20% of the time (0 if the shortest already fails)."""
    best = 0
    for n in sorted(accuracy):
        if accuracy[n] < threshold:
            break
        best = n
    return best


def accuracy_by_length(cells: Sequence[Mapping]) -> dict[int, float]:
    """Mean accuracy per length of cells {"length", "accuracy" (mean score), "trials"},
    weighted by trials (tasks scored by a share of answers have fractional scores)."""
    totals: dict[int, list[float]] = {}
    for c in cells:
        t = totals.setdefault(int(c["length"]), [0.0, 0])
        t[0] += c["accuracy"] * c["trials"]
        t[1] += c["trials"]
    return {n: hit / max(trials, 1) for n, (hit, trials) in sorted(totals.items())}
