"""python -m lctx.kvcache memory: the bytes a KV cache takes, and the longest context that fits.

    python -m lctx.kvcache memory --model=llama-70b-mha --tokens=4096,131072 --dtype=bf16
    python -m lctx.kvcache memory --layers=32 --kv_heads=8 --head_dim=128 --params=8e9 \\
        --tokens=8192 --kv_cache=full --batch=4 --fit=80GB --json=kv.json

Two numbers per context length T (tokens per sequence):
  K/V      2 (K and V) x layers x kv_heads x head_dim x T x dtype bytes, per sequence
  policy   layers x `CachePolicy.nbytes(...)` for --kv_cache (lctx.infer.kvcache): its
           storage plus bookkeeping (an int32 position per slot, a fill count per head),
           i.e. what `KVCache.create(...).nbytes()` holds, computed without allocating.
Both are also given for the whole batch (x --batch). GB = 1e9 bytes, GiB = 2^30.
--fit=MEM: the longest T whose cache fits in MEM beside the weights (parameter count x
--weights_dtype bytes, default --dtype). Nothing is loaded: --model names a preset of
shapes (PRESETS), or give --layers, --kv_heads and --head_dim (and --params for --fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Callable, Sequence

from lctx.cli import ArgumentParser, UsageError, did_you_mean, ints, positive_int, run_main
from lctx.infer.generate import DEFAULT_CHUNK
from lctx.infer.kvcache import CachePolicy, parse


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a KV cache's size depends on: layers, KV heads, head_dim (and, for --fit, the
    parameter count, which sets the weights' bytes)."""

    layers: int
    kv_heads: int
    head_dim: int
    params: int | None = None


# Hardcoded so the calculator loads nothing; tests/test_kvcache_memory.py checks the
# real ones (SmolLM2 against its GGUF, Llama 3 8B against lctx.model's llama3_8b preset).
PRESETS = {
    # LLaMA-2-70B's shapes with full multi-head attention (one KV head per query head);
    # the parameter count is the nominal 70B.
    "llama-70b-mha": Shape(layers=80, kv_heads=80, head_dim=128, params=70_000_000_000),
    # ... and as released: grouped-query attention, 8 KV heads.
    "llama-70b-gqa": Shape(layers=80, kv_heads=8, head_dim=128, params=70_000_000_000),
    "llama-3-8b": Shape(layers=32, kv_heads=8, head_dim=128, params=8_030_261_248),
    "smollm2-135m": Shape(layers=30, kv_heads=3, head_dim=64, params=134_515_008),
}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
               "fp8": 1, "int8": 1}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# --fit searches contexts up to this many tokens; a cache that fits even there (an
# evicting policy: its slots stop growing) fits any context.
_FIT_LIMIT = 2**40


def kv_bytes(shape: Shape, tokens: int, dtype_bytes: int, batch: int = 1) -> int:
    """The plain formula: 2 x layers x kv_heads x head_dim x tokens x dtype_bytes x batch."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * dtype_bytes * batch


def policy_bytes(policy: CachePolicy, shape: Shape, tokens: int, dtype_bytes: int,
                 batch: int = 1, chunk: int = DEFAULT_CHUNK) -> int:
    """layers x the policy's bytes per layer, for `tokens` tokens written `chunk` at a time
    (at most `tokens`: a prompt shorter than the chunk is prefilled in one step, as
    `lctx.infer.generate` does)."""
    return shape.layers * policy.nbytes(batch, shape.kv_heads, shape.head_dim, tokens,
                                        min(chunk, tokens), dtype_bytes)


def longest_fit(bytes_of: Callable[[int], int], free: int) -> int | None:
    """The largest T >= 0 with bytes_of(T) <= free (bytes_of nondecreasing), by bisection;
    None when even _FIT_LIMIT tokens fit (the cache stops growing)."""
    if bytes_of(_FIT_LIMIT) <= free:
        return None
    if bytes_of(1) > free:
        return 0
    lo, hi = 1, _FIT_LIMIT  # bytes_of(lo) fits, bytes_of(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bytes_of(mid) <= free else (lo, mid)
    return lo


def memory_size(text: str) -> int:
    """argparse type: "80GB" (1e9), "80GiB" (2^30), "1.5TB", "8e10" (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _UNITS:
        raise _type_error(text, "a size like 80GB (1e9 bytes) or 80GiB (2^30 bytes)")
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    except ValueError:
        raise _type_error(text, "a size like 80GB (1e9 bytes) or 80GiB (2^30 bytes)") from None


def count(text: str) -> int:
    """argparse type: a parameter count >= 1, "8e9" or "8030261248"."""
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise _type_error(text, "a parameter count >= 1, e.g. 8e9")
    return value


def _type_error(text: str, expected: str) -> Exception:
    return argparse.ArgumentTypeError(f"{text!r}: expected {expected}")


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lctx.kvcache", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    memory = commands.add_parser("memory", help="KV cache bytes per context length")
    memory.add_argument("--model", help=f"a preset of shapes: {', '.join(PRESETS)}")
    for name in ("layers", "kv_heads", "head_dim"):
        memory.add_argument(f"--{name}", type=positive_int, help="instead of --model")
    memory.add_argument("--params", type=count, help="parameter count (overrides the preset's)")
    memory.add_argument("--tokens", type=ints, required=True,
                        help="context lengths per sequence, e.g. 4096,131072")
    memory.add_argument("--dtype", default="bf16", help=f"cache dtype: {', '.join(DTYPE_BYTES)}")
    memory.add_argument("--weights_dtype", help="for --fit (default: --dtype)")
    memory.add_argument("--batch", type=positive_int, default=1)
    memory.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK,
                        help="prefill tokens per step (evicting policies keep one chunk more)")
    memory.add_argument("--kv_cache", default="full",
                        help="a cache policy spec (lctx.infer.kvcache)")
    memory.add_argument("--fit", type=memory_size, metavar="MEM",
                        help="longest context that fits in MEM beside the weights, e.g. 80GB")
    memory.add_argument("--json", metavar="PATH", help="also write the numbers here")
    return parser


def _dtype_bytes(flag: str, name: str) -> int:
    if name not in DTYPE_BYTES:
        raise UsageError(f"--{flag}={name}: unknown dtype{did_you_mean(name, DTYPE_BYTES)}; "
                         f"allowed: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _shape(args) -> Shape:
    """The preset --model names, or the shape --layers/--kv_heads/--head_dim give."""
    dims = {name: getattr(args, name) for name in ("layers", "kv_heads", "head_dim")}
    given = [f"--{name}" for name, value in dims.items() if value is not None]
    if args.model is not None:
        if given:
            raise UsageError(f"--model={args.model} and {', '.join(given)}: give either a "
                             "preset or all of --layers, --kv_heads, --head_dim")
        if args.model not in PRESETS:
            raise UsageError(f"--model={args.model}: unknown preset"
                             f"{did_you_mean(args.model, PRESETS)}; known: {', '.join(PRESETS)} "
                             "(or give --layers, --kv_heads, --head_dim)")
        shape = PRESETS[args.model]
    elif len(given) < len(dims):
        missing = [f"--{name}" for name, value in dims.items() if value is None]
        raise UsageError(f"{', '.join(missing)}: required without --model (a preset: "
                         f"{', '.join(PRESETS)})")
    else:
        shape = Shape(**dims)
    shape = dataclasses.replace(shape, params=args.params or shape.params)
    if args.fit is not None and shape.params is None:
        raise UsageError("--fit: needs the weights' size; give --params "
                         "(the parameter count) with --layers/--kv_heads/--head_dim")
    return shape


def _sizes(n: int, batch: int) -> list[str]:
    """bytes, GB and GiB per sequence and per batch, as table cells."""
    return [f"{n:,}", f"{n / 1e9:.2f}", f"{n / 2**30:.2f}", f"{n * batch / 1e9:.2f}",
            f"{n * batch / 2**30:.2f}"]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 1 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))).rstrip())


def memory(args) -> dict:
    """Prints the table (and the --fit lines); returns the numbers --json writes."""
    shape = _shape(args)
    if not args.tokens or min(args.tokens) < 1:
        raise UsageError(f"--tokens={','.join(map(str, args.tokens))}: expected context "
                         "lengths >= 1, e.g. 4096,131072")
    dtype_bytes = _dtype_bytes("dtype", args.dtype)
    weights_dtype = args.weights_dtype or args.dtype
    weight_bytes = _dtype_bytes("weights_dtype", weights_dtype)
    try:
        policy = parse(args.kv_cache)
    except ValueError as err:
        raise UsageError(f"--{err}") from None
    batch = args.batch
    kv_of = lambda t: kv_bytes(shape, t, dtype_bytes, batch)
    policy_of = lambda t: policy_bytes(policy, shape, t, dtype_bytes, batch, args.chunk)

    name = args.model or "custom"
    print(f"{name}: {shape.layers} layers x {shape.kv_heads} KV heads x head_dim "
          f"{shape.head_dim}, {args.dtype} ({dtype_bytes} bytes), batch {batch}, "
          f"kv_cache={policy.spec()}")
    table = [["tokens", "bytes of", "bytes/seq", "GB/seq", "GiB/seq", "GB/batch", "GiB/batch"]]
    rows = []
    for tokens in args.tokens:
        # Both are linear in the batch (nbytes is batch x per-row bytes): exact per sequence.
        kv, pol = kv_of(tokens) // batch, policy_of(tokens) // batch
        table.append([f"{tokens:,}", "K/V 2*L*Hkv*hd*T*bytes", *_sizes(kv, batch)])
        table.append(["", f"{policy.spec()} (L x policy.nbytes)", *_sizes(pol, batch)])
        rows.append({"tokens": tokens, "kv_bytes_per_seq": kv, "kv_bytes": kv * batch,
                     "policy_bytes_per_seq": pol, "policy_bytes": pol * batch})
    _print_table(table)

    fit = None
    if args.fit is not None:
        weights = shape.params * weight_bytes
        free = args.fit - weights
        fit = {"memory_bytes": args.fit, "weights_bytes": weights, "free_bytes": free,
               "kv_tokens": None, "policy_tokens": None}
        print(f"fit in {args.fit / 1e9:.2f} GB beside the weights ({shape.params:,} params x "
              f"{weight_bytes} bytes = {weights / 1e9:.2f} GB):")
        if free < 0:
            print("  nothing fits: the weights alone exceed the memory")
        for key, label, bytes_of in (("kv_tokens", "K/V", kv_of),
                                     ("policy_tokens", policy.spec(), policy_of)):
            fit[key] = longest_fit(bytes_of, free)  # 0 when nothing fits, None: unbounded
            found = "any context (its cache stops growing)" if fit[key] is None else \
                f"{fit[key]:,} tokens per sequence"
            if free >= 0:
                print(f"  {label}: {found} at batch {batch}")
    return {"model": name, **dataclasses.asdict(shape), "dtype": args.dtype,
            "dtype_bytes": dtype_bytes, "weights_dtype": weights_dtype, "batch": batch,
            "chunk": args.chunk, "kv_cache": policy.spec(), "rows": rows, "fit": fit}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    result = memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main, prog="lctx.kvcache")
