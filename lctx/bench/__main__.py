"""`python -m lctx.bench`: lists the benchmarks; each runs as `python -m lctx.bench.<name>`."""

BENCHMARKS = {
    "attention": "reference / blockwise / ring / ulysses attention vs the public ring baseline: "
                 "time, compiled memory, share of matmul rate, ring load balance",
    "memory": "compiled train-step peak memory of `small` from 8K to 1M tokens (blockwise, "
              "reference, ring per device) and one real `tiny` step at 64K",
    "train": "model FLOPs utilisation of a recipe's train steps and the data pipeline's margin",
}


def main() -> None:
    print("lctx benchmarks (run with python -m lctx.bench.<name> --help):")
    for name, about in BENCHMARKS.items():
        print(f"  {name:<10} {about}")


if __name__ == "__main__":
    main()
