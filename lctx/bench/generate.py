"""python -m lctx.bench generate: lctx's prefill and decode against transformers, same model.

    python -m lctx.bench generate --model=smollm2-135m [--json=PATH]

For the model lctx.load resolves (a registered name, a .gguf file, a Hugging Face
LLaMA directory, an lctx checkpoint or run), transformers loads the same weights
(the GGUF itself, the HF directory, or an HF export of the lctx params) in float32,
with torch using every CPU core and `torch.inference_mode()`. Both run the same
prompts (the model's tokenizer over Python standard-library source; random ids when
there is no tokenizer), one sequence at a time:

  prefill  the prompt of each --prefill_lengths length, cache filled, logits of the
           last token only (transformers: `logits_to_keep=1`);
  decode   --decode_tokens greedy tokens after a --decode_context-token prompt: that
           many forward passes of one token over the KV cache (lctx: one jitted
           `lax.scan` with the cache donated; transformers: a loop with
           past_key_values), reported as tokens/s.

Warm-up (lctx's compile and first run, transformers' first run) is timed apart and
excluded; then lctx and transformers run alternately --repeats times and the fastest
run of each counts. The speedup is lctx's speed over transformers' (> 1: lctx is
faster). Both continuations are kept: `decode.tokens_match` says whether lctx's
greedy tokens equal transformers'. Prints a table, writes JSON (--json).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lctx.models import load
from lctx import cli
from lctx.bench import common
from lctx.bench.common import format_table
from lctx.convert import save_llama
from lctx.infer.generate import DEFAULT_CHUNK, decode_jit, new_cache, prefill_jit, prefill_length
from lctx.models.registry import REGISTRY, SourceError, registered_file

DEFAULT_JSON = "bench_results/generate.json"


def _lengths(text: str) -> list[int]:
    values = cli.ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive lengths")
    return list(values)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m lctx.bench generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="any source lctx.load accepts")
    parser.add_argument("--prefill_lengths", type=_lengths, default=[2048, 8192])
    parser.add_argument("--decode_context", type=cli.positive_int, default=2048)
    parser.add_argument("--decode_tokens", type=cli.positive_int, default=32)
    parser.add_argument("--repeats", type=cli.positive_int, default=2,
                        help="timed runs of each side (alternating); the fastest counts")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where the results go")
    return parser


# ----------------------------------------------------------------------------- prompts


def prompt_ids(tokenizer: Any, vocab_size: int, length: int) -> np.ndarray:
    """int32 `[length]`: standard-library source through `tokenizer`, else random ids."""
    if tokenizer is None:
        return np.random.default_rng(0).integers(0, vocab_size, length).astype(np.int32)
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(root.glob("*.py")):
        ids.extend(int(t) for t in tokenizer.encode(path.read_text(errors="replace")))
        if len(ids) >= length:
            break
    return np.asarray(ids[:length], np.int32)


# ----------------------------------------------------------------------------- transformers


def hf_model(source: str, model: Any, workdir: str):
    """The transformers LlamaForCausalLM (float32, eval) for the same weights as `model`."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    path = Path(source).expanduser()
    if source in REGISTRY:
        path = registered_file(source)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if path.is_file():  # GGUF: transformers dequantizes it itself
        directory, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir() and (path / "config.json").is_file() and not (
            path / "model_config.json").is_file():
        directory = str(path)
    else:  # an lctx checkpoint or run: export the loaded params

        directory = os.path.join(workdir, "hf")
        save_llama(model.config, model.params, directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


class HFRunner:
    """Prefill and greedy decode with transformers, one sequence, inference mode."""

    def __init__(self, hf: Any):
        import torch

        self.hf, self.torch = hf, torch

    def prefill(self, ids: np.ndarray):
        with self.torch.inference_mode():
            out = self.hf(self.torch.from_numpy(ids[None].astype(np.int64)), use_cache=True,
                          logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def decode(self, logits, past, steps: int) -> np.ndarray:
        tokens = []
        with self.torch.inference_mode():
            token = logits.argmax(-1)[:, None]
            for _ in range(steps):
                tokens.append(token)
                out = self.hf(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]
        return self.torch.cat(tokens, dim=1)[0].numpy().astype(np.int32)


# ----------------------------------------------------------------------------- lctx


class LctxRunner:
    """Prefill and greedy decode through lctx.infer's compiled halves of `generate`."""

    def __init__(self, model: Any):
        self.model = model
        self._rng = jax.random.key(0)

    def prefill(self, ids: np.ndarray, new: int = 0):
        """(logits, cache) of one prompt, the cache sized for `new` more tokens."""
        config = self.model.config
        seq = prefill_length(len(ids), DEFAULT_CHUNK)
        tokens = np.zeros((1, seq), np.int32)
        tokens[0, :len(ids)] = ids
        cache = new_cache(config, "full", batch=1, tokens=seq + new, chunk=min(seq, DEFAULT_CHUNK))
        out = prefill_jit(config, self.model.params, jnp.asarray(tokens),
                          jnp.asarray([len(ids)], jnp.int32), cache, chunk=DEFAULT_CHUNK,
                          rope_seq_len=len(ids) + new)
        return jax.block_until_ready(out)

    def decode(self, ids: np.ndarray, logits, cache, steps: int) -> np.ndarray:
        lengths = jnp.asarray([len(ids)], jnp.int32)
        tokens, _, _ = decode_jit(self.model.config, self.model.params, cache, logits, lengths,
                                  self._rng, steps=steps, temperature=0.0,
                                  rope_seq_len=len(ids) + steps)
        return np.asarray(tokens)[0]

    def copy(self, cache):
        return jax.block_until_ready(jax.tree.map(lambda x: x.copy(), cache))


# ----------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def alternate(runs: dict[str, Callable[[], tuple[float, Any]]], repeats: int
              ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Warm-up once each, then `repeats` alternating rounds (order rotating).

    Each callable returns (seconds of the part that counts, output). Returns the
    warm-up seconds, the timed runs and the last outputs, per name.
    """
    names = list(runs)
    warmup = {}
    for name in names:
        warmup[name] = _timed(runs[name])[0]
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, Any] = {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, outputs[name] = runs[name]()
            times[name].append(seconds)
    return warmup, times, outputs


def measure(lctx: LctxRunner, hf: HFRunner, prompts: dict[int, np.ndarray], decode_ids: np.ndarray,
            decode_tokens: int, repeats: int) -> dict[str, Any]:
    """Every prefill length and the decode rate, lctx and transformers alternately."""
    results: dict[str, Any] = {"prefill": [], "decode": None}
    for length, ids in prompts.items():
        def lctx_run(ids=ids):
            return _timed(lambda: lctx.prefill(ids))[0], None

        def hf_run(ids=ids):
            return _timed(lambda: hf.prefill(ids))[0], None

        warmup, times, _ = alternate({"lctx": lctx_run, "transformers": hf_run}, repeats)
        results["prefill"].append({
            "tokens": length, "lctx_s": min(times["lctx"]),
            "transformers_s": min(times["transformers"]),
            "speedup": min(times["transformers"]) / min(times["lctx"]),
            "runs_s": times, "warmup_s": warmup})
        print(f"prefill {length}: lctx {min(times['lctx']):.3f} s, transformers "
              f"{min(times['transformers']):.3f} s", flush=True)

    ids = decode_ids
    lctx_logits, lctx_cache = lctx.prefill(ids, decode_tokens)
    hf_logits, hf_past = hf.prefill(ids)

    def lctx_decode():
        cache = lctx.copy(lctx_cache)  # decode owns (is donated) its cache
        return _timed(lambda: lctx.decode(ids, lctx_logits, cache, decode_tokens))

    def hf_decode():
        past = copy.deepcopy(hf_past)
        return _timed(lambda: hf.decode(hf_logits, past, decode_tokens))

    warmup, times, outputs = alternate({"lctx": lctx_decode, "transformers": hf_decode}, repeats)
    lctx_rate = decode_tokens / min(times["lctx"])
    hf_rate = decode_tokens / min(times["transformers"])
    results["decode"] = {
        "context": len(ids), "tokens": decode_tokens,
        "lctx_tokens_per_s": lctx_rate, "transformers_tokens_per_s": hf_rate,
        "speedup": lctx_rate / hf_rate, "runs_s": times, "warmup_s": warmup,
        "lctx_tokens": outputs["lctx"].tolist(),
        "transformers_tokens": outputs["transformers"].tolist(),
        "tokens_match": bool(np.array_equal(outputs["lctx"], outputs["transformers"]))}
    return results


def table(results: dict[str, Any]) -> str:
    rows = []
    for row in results["prefill"]:
        rows.append([f"prefill {row['tokens']} tokens (s)", f"{row['lctx_s']:.3f}",
                     f"{row['transformers_s']:.3f}", f"{row['speedup']:.2f}x",
                     f"{row['warmup_s']['lctx']:.1f}", f"{row['warmup_s']['transformers']:.1f}"])
    d = results["decode"]
    rows.append([f"decode at {d['context']} (tokens/s, {d['tokens']} tokens)",
                 f"{d['lctx_tokens_per_s']:.2f}", f"{d['transformers_tokens_per_s']:.2f}",
                 f"{d['speedup']:.2f}x", f"{d['warmup_s']['lctx']:.1f}",
                 f"{d['warmup_s']['transformers']:.1f}"])
    return format_table(["", "lctx", "transformers", "speedup", "lctx warm-up s",
                         "transformers warm-up s"], rows)


# ----------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch


    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model = load(args.model, dtype="float32")
    lengths = sorted(set(args.prefill_lengths))
    limit = model.config.max_position_embeddings
    if max(lengths + [args.decode_context + args.decode_tokens]) > limit and model.config.rope.rope_type == "default":
        print(f"note: {max(lengths + [args.decode_context + args.decode_tokens])} tokens is past the model's "
              f"{limit}-token context (timings still hold)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as workdir:
        hf = hf_model(args.model, model, workdir)
    load_s = time.perf_counter() - start
    longest = prompt_ids(model.tokenizer, model.config.vocab_size,
                         max(lengths + [args.decode_context]))
    prompts = {n: longest[:n] for n in lengths}  # each a prefix of the longest
    results = measure(LctxRunner(model), HFRunner(hf), prompts, longest[:args.decode_context],
                      args.decode_tokens, args.repeats)
    print(table(results))
    if not results["decode"]["tokens_match"]:
        print("warning: lctx's greedy tokens differ from transformers'", file=sys.stderr)
    payload = {"model": args.model, "dtype": "float32", "batch": 1,
               "attention_impl": model.config.attention_impl, "repeats": args.repeats,
               "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
               "transformers_version": _transformers_version(), "load_s": load_s, **results}
    path = common.write_json(args.json, payload)
    print(f"wrote {path}")
    return payload


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; a bad flag or --model raises UsageError (one line, exit 2)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except SourceError as err:
        raise cli.UsageError(f"--model={args.model}: {err}") from None
    return 0


if __name__ == "__main__":
    cli.run_main(main, prog="lctx.bench generate")
