"""`python -m lctx.bench.memory`: train-step memory against sequence length.

For the `small` preset at 8K, 16K, ... 1M tokens (batch 1) it compiles one full
train step — chunked loss, gradients, optax AdamW update, state donated — and
reads the peak from XLA's memory analysis of the compiled executable (nothing is
run): with blockwise attention on one device, with reference attention (dense
scores) while that stays below --reference_max, and per device with ring attention
on an 8-way sequence mesh. Long lengths use remat="full", blockwise feed-forward
(`ffn_chunk`) and the chunked cross-entropy. Targets:

  - blockwise and ring grow at most 2.2x per doubling of the length;
  - the 1M-token step fits in 24 GB;
  - ring per device is within 1.5x of one eighth of the one-device blockwise figure.

It also runs one real train step of `tiny` at 64K tokens on this CPU and reports
its time and the process's peak resident memory (getrusage maxrss). Prints a table
and writes JSON (default bench_results/memory.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lctx import cli, model, parallel
from lctx.bench.common import compile_fn, format_table, memory_stats, write_json
from lctx.model import ModelConfig

NUM_DEVICES = 8
GIB = 1024**3
DEFAULT_LENGTHS = tuple(2**k for k in range(13, 21))  # 8K .. 1M
GROWTH_LIMIT = 2.2  # per doubling
FIT_LIMIT_BYTES = 24e9  # "fits in 24 GB"
RING_LIMIT = 1.5  # ring per device / (one device / 8)


# ----------------------------------------------------------------------------- train step


def train_step(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh | None):
    """`(state, batch) -> (state, metrics)`: loss, gradients and one optimiser update.

    state = (params, opt_state); batch = {"tokens", "targets"} int32 `[b, s]`.
    """
    loss_fn = functools.partial(model.loss, config, mesh=mesh)

    def step(state, batch):
        params, opt_state = state
        (_, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(p, batch["tokens"], batch["targets"]), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    return step


def abstract_inputs(config: ModelConfig, tx: optax.GradientTransformation, batch: int,
                    seq_len: int, mesh: Mesh | None) -> tuple[Any, Any]:
    """ShapeDtypeStructs (sharded on `mesh`) of the train state and one batch."""
    # Adam's moments built from boxed parameters keep their logical axis names.
    boxed = jax.eval_shape(lambda p: (p, tx.init(p)), model.abstract_params(config))
    plain = nn.meta.unbox(boxed)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    if mesh is None:
        return plain, {"tokens": tokens, "targets": tokens}
    shardings = parallel.param_shardings(boxed, mesh)
    plain = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         plain, shardings)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding)
    return plain, {"tokens": tokens, "targets": tokens}


def compiled_train_step(config: ModelConfig, seq_len: int, *, mesh: Mesh | None = None,
                        batch: int = 1):
    """(compiled executable, compile seconds) of the donated train step; nothing runs."""
    tx = optax.adamw(1e-3)
    state, batch_shapes = abstract_inputs(config, tx, batch, seq_len, mesh)
    jitted = jax.jit(train_step(config, tx, mesh), donate_argnums=0)
    return compile_fn(jitted, state, batch_shapes)


def train_step_bytes(config: ModelConfig, seq_len: int, *, mesh: Mesh | None = None,
                     batch: int = 1) -> int:
    """Peak bytes (per device) of the compiled train step: temp + arguments + outputs - aliased."""
    compiled, _ = compiled_train_step(config, seq_len, mesh=mesh, batch=batch)
    return memory_stats(compiled)["total"]


# ----------------------------------------------------------------------------- sweep


@dataclasses.dataclass
class Row:
    """One compiled (or predicted) train step."""

    mode: str  # blockwise | reference | ring
    seq_len: int
    bytes: int  # per device
    predicted: bool = False  # extrapolated, not compiled
    compile_s: float | None = None
    growth: float | None = None  # bytes / bytes at half the length


def long_context_config(attention_impl: str, ffn_chunk: int) -> ModelConfig:
    """`small` set up for long sequences: full remat and blockwise feed-forward."""
    return model.preset("small", attention_impl=attention_impl, remat="full", ffn_chunk=ffn_chunk)


def sweep(mode: str, lengths: Sequence[int], *, ffn_chunk: int, mesh: Mesh | None,
          compile_until: int | None = None) -> list[Row]:
    """Compiles `mode` at each length up to `compile_until`; beyond, predicts x4 per doubling."""
    config = long_context_config(mode, ffn_chunk)
    rows: list[Row] = []
    for seq in lengths:
        if compile_until is not None and seq > compile_until and rows:
            last = rows[-1]
            rows.append(Row(mode, seq, int(last.bytes * (seq / last.seq_len) ** 2), predicted=True))
        else:
            compiled, seconds = compiled_train_step(config, seq, mesh=mesh)
            rows.append(Row(mode, seq, memory_stats(compiled)["total"], compile_s=seconds))
            print(f"  {mode:<9} {seq:>8} tokens: {rows[-1].bytes / GIB:8.2f} GiB "
                  f"(compiled in {seconds:.1f} s)", flush=True)
        if len(rows) > 1 and rows[-1].seq_len == 2 * rows[-2].seq_len:
            rows[-1].growth = rows[-1].bytes / rows[-2].bytes
    return rows


# ----------------------------------------------------------------------------- real step


def real_step(seq_len: int, ffn_chunk: int) -> dict[str, Any]:
    """Runs one train step of `tiny` at `seq_len` tokens; time and resident memory."""
    config = model.preset("tiny", attention_impl="blockwise", remat="full", ffn_chunk=ffn_chunk)
    tx = optax.adamw(1e-3)
    params = model.init(config, jax.random.key(0))
    state = (params, tx.init(params))
    tokens = jax.random.randint(jax.random.key(1), (1, seq_len + 1), 0, config.vocab_size)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    compiled, compile_s = compile_fn(jax.jit(train_step(config, tx, None), donate_argnums=0),
                                     state, batch)
    start = time.perf_counter()
    _, metrics = compiled(state, batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    run_s = time.perf_counter() - start
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"preset": "tiny", "seq_len": seq_len, "compile_s": compile_s, "run_s": run_s,
            "loss": loss, "maxrss_bytes": maxrss,
            "xla_analysis_bytes": memory_stats(compiled)["total"]}


# ----------------------------------------------------------------------------- report


def checks(rows: dict[str, list[Row]]) -> dict[str, dict[str, Any]]:
    """The targets, each {value, limit, pass}."""
    out: dict[str, dict[str, Any]] = {}
    for mode in ("blockwise", "ring"):
        growths = [r.growth for r in rows.get(mode, []) if r.growth is not None]
        if growths:
            worst = max(growths)
            out[f"{mode}_max_growth_per_doubling"] = {
                "value": worst, "limit": GROWTH_LIMIT, "pass": worst <= GROWTH_LIMIT}
    by_len = {r.seq_len: r for r in rows.get("blockwise", [])}
    if 2**20 in by_len:
        value = by_len[2**20].bytes
        out["blockwise_1m_bytes"] = {"value": value, "limit": FIT_LIMIT_BYTES,
                                     "pass": value <= FIT_LIMIT_BYTES}
    ratios = [r.bytes / (by_len[r.seq_len].bytes / NUM_DEVICES)
              for r in rows.get("ring", []) if r.seq_len in by_len]
    if ratios:
        worst = max(ratios)
        out["ring_per_device_over_eighth"] = {"value": worst, "limit": RING_LIMIT,
                                              "pass": worst <= RING_LIMIT}
    return out


def table(rows: dict[str, list[Row]]) -> str:
    def cell(row: Row | None) -> str:
        if row is None:
            return "-"
        text = f"{'~' if row.predicted else ''}{row.bytes / GIB:.2f}"
        notes = [n for n, on in (("predicted", row.predicted),
                                 ("OOM", row.bytes > FIT_LIMIT_BYTES)) if on]
        text += f" ({', '.join(notes)})" if notes else ""
        return text + (f" x{row.growth:.2f}" if row.growth else "")

    lengths = sorted({r.seq_len for rs in rows.values() for r in rs})
    find = lambda mode, seq: next((r for r in rows.get(mode, []) if r.seq_len == seq), None)
    body = []
    for seq in lengths:
        single, ring = find("blockwise", seq), find("ring", seq)
        ratio = f"{ring.bytes / (single.bytes / NUM_DEVICES):.2f}" if single and ring else "-"
        body.append([f"{seq // 1024}K", cell(single), cell(find("reference", seq)), cell(ring),
                     ratio])
    headers = ["tokens", "blockwise GiB (x/doubling)", "reference GiB", "ring/device GiB (8-way)",
               "ring / (blockwise/8)"]
    return format_table(headers, body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m lctx.bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=cli.ints, default=DEFAULT_LENGTHS,
                        help="comma-separated sequence lengths (multiples of 16)")
    parser.add_argument("--reference_max", type=int, default=32768,
                        help="longest length compiled with reference attention; beyond: predicted")
    parser.add_argument("--ffn_chunk", type=int, default=4096,
                        help="blockwise feed-forward tokens per sequence shard")
    parser.add_argument("--run_tokens", type=int, default=65536,
                        help="length of the real tiny train step (0 skips it)")
    parser.add_argument("--out", default="bench_results/memory.json", help="JSON results path")
    args = parser.parse_args(argv)
    bad = [s for s in args.lengths if s <= 0 or s % (2 * NUM_DEVICES)]
    if bad or not args.lengths:
        parser.error(f"--lengths={','.join(map(str, args.lengths))}: expected positive multiples "
                     f"of {2 * NUM_DEVICES} (zigzag ring layout)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    # Eight virtual CPU devices, before anything touches a JAX backend.
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    args = parse_args(argv)
    if jax.device_count() < NUM_DEVICES:
        print(f"needs {NUM_DEVICES} devices, found {jax.device_count()}", file=sys.stderr)
        return 2
    real = None
    if args.run_tokens:
        # First, so the process's peak RSS is this step's, not the compilers' below.
        print(f"running one train step of tiny at {args.run_tokens} tokens ...", flush=True)
        real = real_step(args.run_tokens, min(args.ffn_chunk, args.run_tokens))
        print(f"  {real['run_s']:.1f} s (compile {real['compile_s']:.1f} s), "
              f"maxrss {real['maxrss_bytes'] / GIB:.2f} GiB, "
              f"XLA analysis {real['xla_analysis_bytes'] / GIB:.2f} GiB", flush=True)
    mesh = parallel.make_mesh(sequence=NUM_DEVICES)
    print("compiling train steps of small (batch 1, remat=full, "
          f"ffn_chunk={args.ffn_chunk}) ...", flush=True)
    rows = {
        "blockwise": sweep("blockwise", args.lengths, ffn_chunk=args.ffn_chunk, mesh=None),
        "reference": sweep("reference", args.lengths, ffn_chunk=args.ffn_chunk, mesh=None,
                           compile_until=args.reference_max),
        "ring": sweep("ring", args.lengths, ffn_chunk=args.ffn_chunk, mesh=mesh),
    }
    results = checks(rows)
    print()
    print(table(rows))
    print()
    for name, check in results.items():
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {name}: {check['value']:.4g} "
              f"(limit {check['limit']:.4g})")
    path = write_json(args.out, {
        "benchmark": "memory", "preset": "small", "batch": 1, "remat": "full",
        "ffn_chunk": args.ffn_chunk, "mesh": {"sequence": NUM_DEVICES},
        "rows": [dataclasses.asdict(r) for rs in rows.values() for r in rs],
        "checks": results, "real_step": real})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    cli.run_main(main, prog="lctx.bench.memory")
