"""Synthetic retrieval documents mixed into the training stream (`data.mix.*`).

A small model trained on code alone has never been asked to copy a number or a
sentence from far back in its context, so passkey and needle scores would measure
the task format rather than the context. A share of the stream is therefore made
of documents in the evaluation formats, each ending with its answer:

  passkey  the passkey prompt (lctx.eval.retrieval) with a random 5-digit key at a
           random depth, then " N." (answer). filler="cycle" uses the evaluation's
           fixed 5-sentence cycle; "shuffled" draws each filler sentence at random
           from the same five, so the text between key and question never repeats
           one pattern the model could key its lookup on
  needle   a random window of a real training document as haystack, a needle
           "The best thing to do in {city} is {activity}." at a random depth (moved
           back to a line or sentence end), the question, the answer prefix and
           the activity. Cities and activities are drawn independently, so the
           answer can only come from the context (the evaluation's needle is one
           fixed pair, never a memorised one).
  copy     (copy_share of the synthetic documents; 0 by default) a random sequence of
           5-digit numbers and filler sentences, then the same sequence again. Its
           second half can only be predicted by finding where the current token
           occurred before and copying what followed (an induction head), at random
           offsets; the passkey format alone can be fitted by a first-layer head that
           picks the key's digits by relative position, which fails at some
           distances. Neither shuffled filler nor copy documents made the RoPE
           study's small model retrieve better (experiments/rope_scaling/README.md).

Each document has a random length in [seq_len / 4, seq_len] tokens (at least the
stage's min_doc_len; doc_length="random"), or fills a whole row (doc_length="full").
With random lengths and a uniform depth, the key sits more than half a row before the
question in under a fifth of the passkey documents and more than 0.8 rows before it in
under 3%; full rows make that distance uniform over the whole training
length, which is what the evaluation's full-length prompts ask for (it slowed the RoPE
study's small model's learning of retrieval: experiments/rope_scaling/README.md,
follow-up 7). Every document is
a pure function of (seed, shard, index): the stream stays deterministic and its
iterator state checkpointable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import grain
import numpy as np

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


FILLERS = ("cycle", "shuffled")
DOC_LENGTHS = ("random", "full")


@dataclasses.dataclass(frozen=True)
class Mix:
    """fraction: share of training tokens from synthetic documents (0 turns mixing off);
    passkey_share: share of the other synthetic documents in the passkey format (the rest
    needle); filler: "cycle" or "shuffled" passkey filler; copy_share: share of the
    synthetic documents in the copy format; doc_length: "random" or "full" (module
    docstring)."""

    fraction: float = 0.0
    passkey_share: float = 0.5
    filler: str = "cycle"
    copy_share: float = 0.0
    doc_length: str = "random"

    @classmethod
    def from_config(cls, mix: Mapping[str, Any] | None) -> Mix | None:
        if not mix or not mix.get("fraction"):
            return None
        return cls(**{f.name: type(f.default)(mix[f.name])
                      for f in dataclasses.fields(cls) if f.name in mix})


def mix_problems(mix: Mapping[str, Any], prefix: str = "data.mix") -> list[str]:
    """One line per bad `data.mix.*` value."""
    def value(name):
        return mix.get(name, getattr(Mix, name))

    problems = []
    fraction = value("fraction")
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        problems.append(f"{prefix}.fraction={fraction!r}: expected a share of tokens in [0, 1)")
    for name in ("passkey_share", "copy_share"):
        share = value(name)
        if not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            problems.append(f"{prefix}.{name}={share!r}: expected a value in [0, 1]")
    if value("filler") not in FILLERS:
        problems.append(f"{prefix}.filler={value('filler')!r}: expected one of {FILLERS}")
    if value("doc_length") not in DOC_LENGTHS:
        problems.append(f"{prefix}.doc_length={value('doc_length')!r}: expected one of "
                        f"{DOC_LENGTHS}")
    return problems


def _budget(rng: np.random.Generator, seq_len: int, min_doc_len: int, doc_length: str) -> int:
    low = max(seq_len // 4, min_doc_len + 2, 16)
    if doc_length == "full":
        return max(low, seq_len)
    return int(rng.integers(low, max(low, seq_len) + 1))


def passkey_document(tokenizer: Tokenizer, rng: np.random.Generator, tokens: int,
                     filler: str = "cycle") -> str:
    """A passkey prompt of about `tokens` tokens (key at a random depth) and its answer."""
    from lctx.eval import retrieval

    key = retrieval.passkey_keys(rng, 1)[0]
    depth = float(rng.uniform())
    answer = f" {key}."
    instructions = [retrieval.INSTRUCTION, retrieval.SHORT_INSTRUCTION]
    if rng.uniform() < 0.5:
        instructions.reverse()
    # Drawn once, so that the length search sees prefixes of one filler text.
    sentences = ([retrieval.FILLER[i] for i in rng.integers(len(retrieval.FILLER), size=tokens)]
                 if filler == "shuffled" else None)
    for instruction in instructions:  # the short one when the full one leaves no room
        def text(n):
            before = int(round(depth * n))
            return retrieval.passkey_text(key, before, n - before, instruction,
                                          sentences) + answer

        # A sentence is at least one token, so `tokens` of them always overfill.
        n = retrieval._largest(lambda n: len(tokenizer.encode(text(n))) + 2 <= tokens, tokens)
        if n >= 0:
            break
    return text(max(n, 0))


def copy_document(tokenizer: Tokenizer, rng: np.random.Generator, tokens: int) -> str:
    """A random sequence of numbers and filler sentences twice, about `tokens` tokens."""
    from lctx.eval import retrieval

    items = [retrieval.FILLER[rng.integers(len(retrieval.FILLER))] if rng.uniform() < 0.5
             else f"{rng.integers(10000, 100000)}." for _ in range(tokens)]

    def text(n):
        return " ".join(items[:n] + items[:n])

    n = retrieval._largest(lambda n: len(tokenizer.encode(text(n))) + 2 <= tokens, tokens // 2)
    return text(max(n, 1))


def needle_document(tokenizer: Tokenizer, rng: np.random.Generator, tokens: int,
                    haystack: str) -> str:
    """A random needle in a window of `haystack`, the question and the answer."""
    from lctx.eval import retrieval

    city, activity = CITIES[rng.integers(len(CITIES))], ACTIVITIES[rng.integers(len(ACTIVITIES))]
    needle = retrieval.Needle(sentence=f"The best thing to do in {city} is {activity}.",
                              question=f"What is the best thing to do in {city}?",
                              answer_prefix=f"The best thing to do in {city} is", answer=activity)
    ids = tokenizer.encode(haystack)
    fixed = len(tokenizer.encode(f"{needle.sentence} \n{needle.question}\n{needle.answer_prefix} "
                                 f"{activity}.")) + 4
    take = max(tokens - fixed, 0)
    start = int(rng.integers(0, max(len(ids) - take, 0) + 1))
    window = tokenizer.decode(ids[start:start + take]) if take else ""
    text, _ = retrieval.needle_text(window, float(rng.uniform()), needle)
    return f"{text} {activity}."


def synthetic_record(index: int, record: Mapping[str, Any], *, tokenizer: Tokenizer,
                     text_key: str, seq_len: int, min_doc_len: int, passkey_share: float,
                     seed: int, filler: str = "cycle", copy_share: float = 0.0,
                     doc_length: str = "random") -> np.ndarray:
    """int32 `[n]` BOS ... EOS of synthetic document `index` (a module-level function so
    that grain worker processes can pickle it). `record` supplies a needle's haystack."""
    rng = np.random.default_rng([seed, index])
    tokens = _budget(rng, seq_len, min_doc_len, doc_length)
    if copy_share and rng.uniform() < copy_share:  # no draw when off: streams stay as they were
        text = copy_document(tokenizer, rng, tokens)
    elif rng.uniform() < passkey_share:
        text = passkey_document(tokenizer, rng, tokens, filler)
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
        min_doc_len=min_doc_len, passkey_share=mix.passkey_share, seed=seed, filler=mix.filler,
        copy_share=mix.copy_share, doc_length=mix.doc_length))
    synthetic_mean, real_mean = mean_tokens(synthetic), mean_tokens(real)
    f = mix.fraction
    weights = [(1 - f) / real_mean, f / synthetic_mean]
    return grain.MapDataset.mix([real, synthetic], weights=weights), weights[0] / sum(weights)
