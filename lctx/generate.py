"""python -m lctx.generate: continues one prompt, printing the text as it is decoded.

    python -m lctx.generate --model=smollm2-135m --prompt="What is 2+2?" --chat \\
        --max_new_tokens=64 [--kv_cache=full] [--chunk=2048] [--temperature=0] [--seed=0]

--model: any source `lctx.load` takes. --prompt=TEXT or --prompt_file=FILE (exactly
one); --chat wraps it as one user turn of the tokenizer's chat template (the
assistant's turn opened). The prompt is prefilled `--chunk` tokens per step
(`prefill_jit`), then decoded one token per step, each step's text printed at once;
decoding stops at EOS or after --max_new_tokens. The tokens are those
`lctx.infer.generate` gives for the same arguments (the same sampling keys too).
--max_cache_tokens=N caps the cache's slots per sequence: a prompt that a
non-evicting cache (e.g. `full`) cannot hold within N is refused before anything runs.
--json=PATH also writes the prompt and new token ids, the text and timings.
A bad flag, source, spec or prompt is one line on stderr, exit status 2.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lctx.cli import ArgumentParser, UsageError, positive_int, run_main
from lctx.data.tokenizer import Tokenizer
from lctx.eval.ruler import chat_text, has_chat_template
from lctx.infer.generate import (DEFAULT_CHUNK, check_capacity, decode_step, new_cache,
                                 pad_prompts, prefill_jit, rope_length)
from lctx.infer.kvcache import CachePolicy, parse
from lctx.model.config import ModelConfig
from lctx.models import SourceError, load

# One decode step per call, so each token reaches the host as soon as it exists
# (`decode_jit` scans many steps and keeps only the cache, not the next logits).
_step_jit = jax.jit(decode_step, static_argnums=(0,), donate_argnums=(2,),
                    static_argnames=("rope_seq_len",))


def _choose(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """int32 `[b]` from float32 logits `[b, V]`: argmax at 0, else a softmax(l / t) sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def stream_tokens(config: ModelConfig, params: Any, prompt: Sequence[int] | np.ndarray, *,
                  max_new_tokens: int, kv_cache: CachePolicy | str = "full",
                  chunk: int = DEFAULT_CHUNK, temperature: float = 0.0,
                  rng: jax.Array | None = None, pad_id: int = 0, eos_id: int | None = None,
                  max_cache_tokens: int | None = None) -> Iterator[int]:
    """Prefills `prompt` (int ids `[n]`) now, then yields its new token ids one decode
    step at a time: up to `max_new_tokens`, stopping before `eos_id`.

    The arguments mean what they mean for `lctx.infer.generate`, which gives the same
    tokens (its keys: `split(rng, max_new_tokens)`, one per step). Raises ValueError
    (one line) before any work when the prompt is empty, max_new_tokens < 1, or the
    cache would need more than `max_cache_tokens` slots per sequence.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an int >= 1")
    policy = parse(kv_cache) if isinstance(kv_cache, str) else kv_cache
    tokens, lengths = pad_prompts([prompt], pad_id, chunk)
    total = tokens.shape[1] + max_new_tokens
    cache_chunk = min(chunk, tokens.shape[1])
    slots = policy.slots(total, cache_chunk)
    if max_cache_tokens is not None and slots > max_cache_tokens:
        why = ("it does not evict, so it needs a slot for every token" if not policy.evicts()
               else "its budget plus one prefill chunk")
        raise ValueError(f"max_cache_tokens={max_cache_tokens}: kv_cache={policy.spec()!r} needs "
                         f"{slots} slots for a {len(prompt)}-token prompt (padded to "
                         f"{tokens.shape[1]}) plus {max_new_tokens} new tokens ({why}); give a "
                         "shorter prompt, fewer new tokens or an evicting policy")
    if policy.own_path:  # beacon: the prompt is read through the policy's own path
        steps = policy.stream(config, params, np.asarray(prompt), max_new_tokens=max_new_tokens,
                              temperature=float(temperature), rng=rng)
        return itertools.takewhile(lambda token: token != eos_id, (t for t, _ in steps))
    cache = new_cache(config, policy, batch=1, tokens=total, chunk=cache_chunk)
    check_capacity(cache, total, chunk)
    rope_seq_len = rope_length(len(prompt), max_new_tokens)
    logits, cache = prefill_jit(config, params, jnp.asarray(tokens), jnp.asarray(lengths), cache,
                                chunk=chunk, rope_seq_len=rope_seq_len)
    keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)

    def decode() -> Iterator[int]:
        nonlocal logits, cache
        pos = jnp.asarray(lengths)
        for step in range(max_new_tokens):
            token = _choose(logits, keys[step], float(temperature))
            if int(token[0]) == eos_id:
                return
            yield int(token[0])
            if step + 1 < max_new_tokens:  # the last token's logits are never needed
                logits, cache = _step_jit(config, params, cache, token, pos,
                                          rope_seq_len=rope_seq_len)
                pos = pos + 1

    return decode()


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens`, in pieces as they come; the pieces join to
    `tokenizer.decode(all tokens)`. A piece waits while the text so far ends in an
    incomplete UTF-8 character (U+FFFD) or would rewrite what was already given."""
    ids: list[int] = []
    done = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if len(text) > len(done) and text.startswith(done) and not text.endswith("\ufffd"):
            yield text[len(done):]
            done = text
    text = tokenizer.decode(ids)
    if text != done:
        yield text[len(done):] if text.startswith(done) else text  # never expected: see above


def prompt_ids(tokenizer: Tokenizer, text: str, chat: bool) -> np.ndarray:
    """int32 `[n]`: `text` (as one chat user turn when `chat`), BOS first when the
    tokenizer asks for one."""
    if chat:
        text = chat_text(tokenizer, text)
    ids = tokenizer.encode(text)
    if getattr(tokenizer, "add_bos", False):
        ids = np.concatenate([[tokenizer.bos_id], ids])
    return np.asarray(ids, np.int32)


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lctx.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="any source lctx.load takes")
    parser.add_argument("--prompt", help="the prompt text")
    parser.add_argument("--prompt_file", help="a UTF-8 file holding the prompt")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat template")
    parser.add_argument("--max_new_tokens", type=positive_int, required=True)
    parser.add_argument("--kv_cache", default="full",
                        help="a cache policy spec (lctx.infer.kvcache)")
    parser.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK,
                        help="prefill tokens per step")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0, help="sampling key (temperature > 0)")
    parser.add_argument("--max_cache_tokens", type=positive_int,
                        help="most cache slots per sequence (default: as many as needed)")
    parser.add_argument("--json", metavar="PATH", help="also write ids, text and timings here")
    return parser


def _prompt_text(args) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("--prompt=TEXT or --prompt_file=FILE: give exactly one")
    if args.prompt is not None:
        return args.prompt
    if not os.path.isfile(args.prompt_file):
        raise UsageError(f"--prompt_file={args.prompt_file}: no such file")
    with open(args.prompt_file, encoding="utf-8") as f:
        return f.read()


def main(argv: Sequence[str] | None = None) -> int:
    """Streams the continuation to stdout; UsageError (one line, exit 2) on bad input."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        policy = parse(args.kv_cache)
    except ValueError as err:
        raise UsageError(f"--{err}") from None
    if not args.temperature >= 0.0:
        raise UsageError(f"--temperature={args.temperature}: expected a number >= 0 (0: greedy)")
    text = _prompt_text(args)
    try:
        model = load(args.model)
    except SourceError as err:
        raise UsageError(f"--model={args.model}: {err}") from None
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UsageError(f"--model={args.model}: has no tokenizer, so a text prompt cannot be "
                         "encoded; save a tokenizer.json with the checkpoint")
    if args.chat and not has_chat_template(tokenizer):
        raise UsageError(f"--chat: the tokenizer of --model={args.model} has no chat template; "
                         "leave out --chat to continue the prompt as plain text")
    ids = prompt_ids(tokenizer, text, args.chat)
    if ids.size == 0:
        raise UsageError(f"--prompt{'_file' if args.prompt is None else ''}: empty; give at "
                         "least one token of text")
    start = time.perf_counter()
    try:
        tokens = stream_tokens(model.config, model.params, ids, max_new_tokens=args.max_new_tokens,
                               kv_cache=policy, chunk=args.chunk, temperature=args.temperature,
                               rng=jax.random.key(args.seed), pad_id=tokenizer.pad_id,
                               eos_id=tokenizer.eos_id, max_cache_tokens=args.max_cache_tokens)
    except ValueError as err:  # the cache cannot take the prompt: the user's input
        raise UsageError(f"--{err}") from None
    new: list[int] = []
    first_s = None

    def recorded(stream: Iterable[int]) -> Iterator[int]:
        nonlocal first_s
        for token in stream:
            first_s = first_s or time.perf_counter() - start
            new.append(token)
            yield token

    pieces = []
    for piece in stream_text(tokenizer, recorded(tokens)):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.json:
        total_s = time.perf_counter() - start
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "kv_cache": policy.spec(), "chat": args.chat,
                       "prompt_ids": ids.tolist(), "tokens": new, "text": "".join(pieces),
                       "stopped_at_eos": len(new) < args.max_new_tokens,
                       # compiles included: the first call of each jitted half traces it
                       "first_token_s": first_s, "total_s": total_s}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main, prog="lctx.generate")
