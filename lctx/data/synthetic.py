"""Synthetic retrieval documents mixed into the training stream (`data.mix.*`).

A small model trained on code alone has never been asked to copy a number or a
sentence from far back in its context, so passkey and needle scores would measure
the task format rather than the context. A share of the stream is therefore made
of documents in the evaluation formats (lctx.data.prompts), each ending with its answer:

  passkey  the passkey prompt with a random 5-digit key at a random depth in the
           evaluation's fixed 5-sentence filler cycle, then " N." (answer)
  needle   a random window of a real training document as haystack, a needle
           "The best thing to do in {city} is {activity}." at a random depth (moved
           back to a line or sentence end), the question, the answer prefix and
           the activity. Cities and activities are drawn independently, so the
           answer can only come from the context (the evaluation's needle is one
           fixed pair, never a memorised one).

Each document has a random length in [seq_len / 4, seq_len] tokens (at least the
stage's min_doc_len). Every document is a pure function of (seed, shard, index): the
stream stays deterministic and its iterator state checkpointable. (The RoPE study
also tried shuffled filler, copy documents and whole-row documents; none helped and
they were removed: experiments/rope_scaling/README.md.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import grain
import numpy as np

from lctx.data import prompts
from lctx.data.tokenizer import Tokenizer, encode_document

CITIES = ("San Francisco", "Paris", "Lagos", "Lima", "Oslo", "Hanoi", "Denver", "Porto",
          "Nairobi", "Kyoto", "Quito", "Dublin", "Perth", "Austin", "Seville", "Tbilisi")
ACTIVITIES = (
    "eat a sandwich and sit in Dolores Park on a sunny day", "walk along the river at dawn",
    "visit the old market and buy fresh bread", "take a boat to the small island",
    "climb the hill behind the cathedral", "listen to music in the main square",
    "ride a bicycle through the botanical garden", "drink coffee on a rooftop terrace",
    "watch the sunset from the harbour wall", "read a book in the public library",
    "try the grilled fish at a street stall", "swim in the lake before breakfast",
    "explore the museum of modern art", "hike the coastal path to the lighthouse",
    "play chess with strangers in the park", "taste the local cheese at the market",
)


@dataclasses.dataclass(frozen=True)
class Mix:
    """fraction: share of training tokens from synthetic documents (0 turns mixing off);
    passkey_share: share of the synthetic documents in the passkey format (the rest
    needle)."""

    fraction: float = 0.0
    passkey_share: float = 0.5

    @classmethod
    def from_config(cls, mix: Mapping[str, Any] | None) -> Mix | None:
        if not mix or not mix.get("fraction"):
            return None
        return cls(**{f.name: type(f.default)(mix[f.name])
                      for f in dataclasses.fields(cls) if f.name in mix})


def mix_problems(mix: Mapping[str, Any], prefix: str = "data.mix") -> list[str]:
    """One line per bad `data.mix.*` value."""
    fraction = mix.get("fraction", Mix.fraction)
    share = mix.get("passkey_share", Mix.passkey_share)
    problems = []
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        problems.append(f"{prefix}.fraction={fraction!r}: expected a share of tokens in [0, 1)")
    if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        problems.append(f"{prefix}.passkey_share={share!r}: expected a value in [0, 1]")
    return problems


def _budget(rng: np.random.Generator, seq_len: int, min_doc_len: int) -> int:
    low = max(seq_len // 4, min_doc_len + 2, 16)
    return int(rng.integers(low, max(low, seq_len) + 1))


def passkey_document(tokenizer: Tokenizer, rng: np.random.Generator, tokens: int) -> str:
    """A passkey prompt of about `tokens` tokens (key at a random depth) and its answer."""
    key = prompts.passkey_keys(rng, 1)[0]
    depth = float(rng.uniform())
    answer = f" {key}."
    instructions = [prompts.INSTRUCTION, prompts.SHORT_INSTRUCTION]
    if rng.uniform() < 0.5:
        instructions.reverse()
    for instruction in instructions:  # the short one when the full one leaves no room
        def text(n):
            before = int(round(depth * n))
            return prompts.passkey_text(key, before, n - before, instruction) + answer

        # A sentence is at least one token, so `tokens` of them always overfill.
        n = prompts.largest_fitting(lambda n: len(tokenizer.encode(text(n))) + 2 <= tokens,
                                    tokens)
        if n >= 0:
            break
    return text(max(n, 0))


def needle_document(tokenizer: Tokenizer, rng: np.random.Generator, tokens: int,
                    haystack: str) -> str:
    """A random needle in a window of `haystack`, the question and the answer."""
    city, activity = CITIES[rng.integers(len(CITIES))], ACTIVITIES[rng.integers(len(ACTIVITIES))]
    needle = prompts.Needle(sentence=f"The best thing to do in {city} is {activity}.",
                            question=f"What is the best thing to do in {city}?",
                            answer_prefix=f"The best thing to do in {city} is", answer=activity)
    ids = tokenizer.encode(haystack)
    fixed = len(tokenizer.encode(f"{needle.sentence} \n{needle.question}\n{needle.answer_prefix} "
                                 f"{activity}.")) + 4
    take = max(tokens - fixed, 0)
    start = int(rng.integers(0, max(len(ids) - take, 0) + 1))
    window = tokenizer.decode(ids[start:start + take]) if take else ""
    text, _ = prompts.needle_text(window, float(rng.uniform()), needle)
    return f"{text} {activity}."


def synthetic_record(index: int, record: Mapping[str, Any], *, tokenizer: Tokenizer,
                     text_key: str, seq_len: int, min_doc_len: int, passkey_share: float,
                     seed: int) -> np.ndarray:
    """int32 `[n]` BOS ... EOS of synthetic document `index` (a module-level function so
    that grain worker processes can pickle it). `record` supplies a needle's haystack."""
    rng = np.random.default_rng([seed, index])
    tokens = _budget(rng, seq_len, min_doc_len)
    if rng.uniform() < passkey_share:
        text = passkey_document(tokenizer, rng, tokens)
    else:
        value = record[text_key]
        haystack = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        text = needle_document(tokenizer, rng, tokens, haystack)
    return encode_document(tokenizer, text)


def mean_tokens(docs: grain.MapDataset, sample: int = 32) -> float:
    """Mean token count of the first `sample` documents of a tokenized dataset."""
    n = min(sample, len(docs))
    return float(np.mean([len(docs[i]) for i in range(n)])) if n else 1.0


def mix_documents(real: grain.MapDataset, source: grain.MapDataset, mix: Mix, *,
                  tokenizer: Tokenizer, text_key: str, seq_len: int, min_doc_len: int,
                  seed: int) -> tuple[grain.MapDataset, float]:
    """The tokenized document stream `real` with synthetic documents mixed in.

    source: the (shard's) records the needle haystacks come from. Documents are mixed
    by count with weights that make `mix.fraction` of the tokens synthetic, given the
    mean lengths of a sample of each (a short budget can be overshot: the fixed text of a
    prompt does not shrink). Returns the
    mixed stream and the share of its documents that are real.
    """
    synthetic = source.shuffle(seed=seed + 7).repeat(None).map_with_index(functools.partial(
        synthetic_record, tokenizer=tokenizer, text_key=text_key, seq_len=seq_len,
        min_doc_len=min_doc_len, passkey_share=mix.passkey_share, seed=seed))
    synthetic_mean, real_mean = mean_tokens(synthetic), mean_tokens(real)
    f = mix.fraction
    weights = [(1 - f) / real_mean, f / synthetic_mean]
    return grain.MapDataset.mix([real, synthetic], weights=weights), weights[0] / sum(weights)
