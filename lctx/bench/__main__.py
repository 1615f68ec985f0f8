"""`python -m lctx.bench`: lists the benchmarks; `python -m lctx.bench NAME [flags]` (or
`python -m lctx.bench.NAME [flags]`) runs one."""

import importlib
import sys

from lctx.cli import UsageError, did_you_mean, run_main

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
    """Runs the benchmark named first in argv (its flags after it), or lists them all."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("-h", "--help"):
        if argv[0] not in BENCHMARKS:
            raise UsageError(f"{argv[0]}: unknown benchmark{did_you_mean(argv[0], BENCHMARKS)}; "
                             f"known: {', '.join(BENCHMARKS)}")
        module = importlib.import_module(f"lctx.bench.{argv[0]}")
        return module.main(argv[1:]) or 0
    print("lctx benchmarks (run with python -m lctx.bench.<name> --help):")
    for name, about in BENCHMARKS.items():
        print(f"  {name:<10} {about}")
    return 0


if __name__ == "__main__":
    run_main(main, prog="lctx.bench")
