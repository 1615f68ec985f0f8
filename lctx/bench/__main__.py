"""`python -m lctx.bench`: lists the benchmarks; `python -m lctx.bench NAME [flags]` (or
`python -m lctx.bench.NAME [flags]`) runs one."""

import importlib
import sys

BENCHMARKS = {
    "attention": "reference / blockwise / ring / ulysses attention vs the public ring baseline: "
                 "time, compiled memory, share of matmul rate, ring load balance",
    "memory": "compiled train-step peak memory of `small` from 8K to 1M tokens (blockwise, "
              "reference, ring per device) and one real `tiny` step at 64K",
    "generate": "prefill seconds and decode tokens/s of a loaded model (--model), lctx against "
                "transformers on the same weights and prompts",
    "train": "model FLOPs utilisation of a recipe's train steps and the data pipeline's margin",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-"):
        if argv[0] not in BENCHMARKS:
            print(f"lctx.bench: unknown benchmark {argv[0]!r}; known: {', '.join(BENCHMARKS)}",
                  file=sys.stderr)
            return 2
        module = importlib.import_module(f"lctx.bench.{argv[0]}")
        return module.main(argv[1:]) or 0
    print("lctx benchmarks (run with python -m lctx.bench.<name> --help):")
    for name, about in BENCHMARKS.items():
        print(f"  {name:<10} {about}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
