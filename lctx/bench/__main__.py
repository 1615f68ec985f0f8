"""`python -m lctx.bench`: lists the benchmarks; each runs as `python -m lctx.bench.<name>`."""

import sys

from lctx.cli import UsageError, did_you_mean, run_main

BENCHMARKS = {
    "attention": "reference / blockwise / ring / ulysses attention vs the public ring baseline: "
                 "time, compiled memory, share of matmul rate, ring load balance",
    "memory": "compiled train-step peak memory of `small` from 8K to 1M tokens (blockwise, "
              "reference, ring per device) and one real `tiny` step at 64K",
    "train": "model FLOPs utilisation of a recipe's train steps and the data pipeline's margin",
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args:
        raise UsageError(f"{args[0]}: unexpected argument{did_you_mean(args[0], BENCHMARKS)}; "
                         f"run a benchmark as python -m lctx.bench.<name>, name one of "
                         f"{', '.join(BENCHMARKS)}")
    print("lctx benchmarks (run with python -m lctx.bench.<name> --help):")
    for name, about in BENCHMARKS.items():
        print(f"  {name:<10} {about}")


if __name__ == "__main__":
    run_main(main, prog="lctx.bench")
