"""lctx.bench: benchmark entry points (`python -m lctx.bench` lists them).

`lctx.bench.common` holds the reusable pieces (timing, compiled memory, matmul-rate
yardstick, tables, JSON with environment info); each benchmark module is runnable
with `python -m lctx.bench.<name>` and importable without side effects.
"""
