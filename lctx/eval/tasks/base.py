"""The evaluation task registry: `TASKS` {name: Task}, filled by `@register` on Task classes.

A task computes its section of results.json from an `EvalContext`, draws its plots and
contributes its columns to the terminal table. Retrieval tasks subclass `RetrievalTask`
and only say how to build one prompt and how to score a continuation; the grid over
lengths x depths x trials, batching, per-cell accuracy, effective lengths and plots are
shared here.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from lctx.data.tokenizer import Tokenizer
from lctx.eval import plots, retrieval, ruler

TASKS: dict[str, "Task"] = {}


def register(cls: type["Task"]) -> type["Task"]:
    """Class decorator: adds an instance of `cls` to TASKS under `cls.name`."""
    if cls.name in TASKS:
        raise ValueError(f"evaluation task {cls.name!r} registered twice")
    TASKS[cls.name] = cls()
    return cls


@dataclasses.dataclass
class EvalContext:
    """What a task runs on.

    held_out: documents {text_key: str | bytes} (perplexity text, haystacks).
    options: every evaluation option (api.DEFAULTS merged with the caller's).
    continue_text(prompts, max_new_tokens) -> greedy continuations (text) of int32 `[n]`
      prompt ids; perplexity(length) -> {"ppl", "nll", "bits_per_byte", "tokens", "documents"}.
    advance(task, length): called after each unit of progress.
    """

    tokenizer: Tokenizer
    held_out: Sequence[Mapping[str, Any]]
    text_key: str
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    options: Mapping[str, Any]
    continue_text: Callable[[Sequence[np.ndarray], int], list[str]]
    perplexity: Callable[[int], dict[str, Any]]
    advance: Callable[[str, int], None] = lambda task, length: None

    @functools.cached_property
    def texts(self) -> list[str]:
        """The held-out documents as text."""
        return [_text(self.held_out[i][self.text_key]) for i in range(len(self.held_out))]

    def haystack(self, length: int, trial: int) -> np.ndarray:
        """int32 `[<= length]` ids of held-out text, starting at a different document per trial."""
        start = (trial * 7919) % max(len(self.texts), 1)
        return retrieval.haystack_ids(self.tokenizer, self.texts[start:] + self.texts[:start],
                                      length)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class Task(abc.ABC):
    """One registered evaluation: `name` is what --tasks and config.eval.tasks accept."""

    name: ClassVar[str]

    def units(self, lengths: Sequence[int], depths: Sequence[float]) -> int:
        """Progress-bar units this task takes."""
        return len(lengths)

    @abc.abstractmethod
    def run(self, ctx: EvalContext) -> dict[str, Any]:
        """This task's section of results.json."""

    @abc.abstractmethod
    def plot(self, section: Mapping[str, Any], out_dir: str, label: str,
             training_lengths: Sequence[int]) -> list[str]:
        """Writes this task's PNGs into out_dir; returns their paths."""

    @abc.abstractmethod
    def columns(self, section: Mapping[str, Any]) -> list[tuple[str, dict[int, str]]]:
        """Table columns [(header, {length: formatted value})]; missing lengths print '-'."""

    def notes(self, section: Mapping[str, Any]) -> list[str]:
        """Lines printed under the table."""
        return []


class RetrievalTask(Task):
    """Generation tasks scored per (length, depth) cell over `trials` prompts each.

    Section: {"cells": [{"length", "depth", "correct" (trials fully right), "trials",
    "accuracy" (mean score), "prompt_tokens", "filler_fraction", "reply" (the first
    trial's continuation, to see what was scored), ...}], "accuracy":
    {str(length): mean score}, "skipped": {str(length): reason}, "effective_length":
    {"yarn_80", "pi_20"}}.
    """

    skip_reason: ClassVar[str] = "haystack too short for this length"
    curve_png: ClassVar[str | None] = "{name}.png"  # accuracy against length
    heatmap_png: ClassVar[str | None] = "{name}_heatmap.png"  # length x depth

    def units(self, lengths: Sequence[int], depths: Sequence[float]) -> int:
        return len(lengths) * len(depths)

    @abc.abstractmethod
    def prompt(self, ctx: EvalContext, length: int, depth: float, trial: int,
               rng: np.random.Generator) -> Any:
        """One prompt (with `.ids` int32 `[n]`, `.depth`, `.filler_fraction`) of at most
        `length` tokens including its reply, or None when the length cannot hold one;
        random choices come from `rng` (see `_prompts`)."""

    @abc.abstractmethod
    def max_new_tokens(self, ctx: EvalContext, prompt: Any) -> int:
        """Tokens to generate for `prompt`."""

    @abc.abstractmethod
    def score(self, continuation: str, prompt: Any) -> float:
        """Score in [0, 1] of a continuation (text) of `prompt`."""

    def cell_fields(self, prompt: Any) -> dict[str, Any]:
        """Extra fields of a cell, from one of its prompts."""
        return {}

    def _prompts(self, ctx: EvalContext, length: int) -> list | None:
        """depths x trials prompts of one length (depth-major), or None if any cannot be built.

        Each prompt gets an rng seeded by (seed, length, trial): the depths of one trial
        draw the same keys and values, so within a trial only the depth changes.
        """
        prompts = []
        for depth in ctx.depths:
            for trial in range(ctx.options["trials"]):
                rng = np.random.default_rng((ctx.options["seed"], length, trial))
                prompt = self.prompt(ctx, length, float(depth), trial, rng)
                if prompt is None:
                    return None
                prompts.append(prompt)
        return prompts

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        trials = ctx.options["trials"]
        cells, skipped = [], {}
        for length in ctx.lengths:
            prompts = self._prompts(ctx, length)
            if prompts is None:
                skipped[str(length)] = self.skip_reason
                for _ in ctx.depths:
                    ctx.advance(self.name, length)
                continue
            max_new = max(self.max_new_tokens(ctx, p) for p in prompts)
            texts = ctx.continue_text([p.ids for p in prompts], max_new)
            for i, depth in enumerate(ctx.depths):
                rows = range(i * trials, (i + 1) * trials)
                scores = [self.score(texts[j], prompts[j]) for j in rows]
                example = prompts[rows[0]]
                cells.append({"length": length, "depth": float(depth),
                              "correct": int(sum(s == 1.0 for s in scores)), "trials": trials,
                              "accuracy": float(np.mean(scores)),
                              "prompt_tokens": int(len(example.ids)),
                              "filler_fraction": round(example.filler_fraction, 4),
                              "reply": texts[rows[0]], **self.cell_fields(example)})
                ctx.advance(self.name, length)
        by_length = retrieval.accuracy_by_length(cells)
        return {"cells": cells, "accuracy": {str(n): a for n, a in by_length.items()},
                "skipped": skipped,
                "effective_length": {"yarn_80": retrieval.effective_length_80(by_length),
                                     "pi_20": retrieval.effective_length_20(by_length)}}

    def plot(self, section: Mapping[str, Any], out_dir: str, label: str,
             training_lengths: Sequence[int]) -> list[str]:
        written = []
        if self.curve_png and section["accuracy"]:
            curve = {int(n): a for n, a in section["accuracy"].items()}
            written.append(plots.plot_accuracy(
                {label: curve}, os.path.join(out_dir, self.curve_png.format(name=self.name)),
                training_lengths=training_lengths, title=self.title))
        if self.heatmap_png and section["cells"]:
            grid: dict[int, dict[float, float]] = {int(n): {} for n in section["skipped"]}
            for c in section["cells"]:
                grid.setdefault(c["length"], {})[c["depth"]] = c["accuracy"]
            written.append(plots.plot_heatmap(
                grid, os.path.join(out_dir, self.heatmap_png.format(name=self.name)),
                title=self.title))
        return written

    @property
    def title(self) -> str:
        return self.name.replace("_", " ")

    def columns(self, section: Mapping[str, Any]) -> list[tuple[str, dict[int, str]]]:
        values = {int(n): f"{a:.2f}" for n, a in section["accuracy"].items()}
        values.update({int(n): "skipped" for n in section["skipped"]})
        return [(f"{self.name} acc", values)]

    def notes(self, section: Mapping[str, Any]) -> list[str]:
        e = section["effective_length"]
        return [f"{self.name} effective length: {e['yarn_80']} (>= 80% accuracy), "
                f"{e['pi_20']} (every length up to it >= 20%)"]


class RulerTask(RetrievalTask):
    """Tasks whose prompts are ruler.RulerPrompt: they carry their reply budget, and a reply
    scores the share of the answers among its first matches of `answer_pattern`."""

    answer_pattern: ClassVar[str] = ruler.NUMBER

    def max_new_tokens(self, ctx: EvalContext, prompt: ruler.RulerPrompt) -> int:
        return prompt.max_new_tokens

    def score(self, continuation: str, prompt: ruler.RulerPrompt) -> float:
        return ruler.score_answers(continuation, prompt.answers, self.answer_pattern)
