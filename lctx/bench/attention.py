"""Attention benchmark: lctx's kernels against each other and a public ring baseline.

    python -m lctx.bench.attention                     # the full default sweep
    python -m lctx.bench.attention --quick             # 2K and 4K, fewer repeats
    python -m lctx.bench.attention --impls ring --lengths 8192 --block_q 256,512,1024 \
        --block_k 256,512,1024                         # a block-size sweep

For each implementation and sequence length it measures forward and forward+backward
time (median after warm-up; compile time apart), the compiled executable's memory
(per device for the sharded ones), achieved GFLOP/s against a large fp32 matmul's rate
sampled before and after every row, and, for lctx's ring, the tiles each device
computed (load balance). Rows whose compiled memory would not fit are reported as
OOM and not run. A summary evaluates the project's targets at 8K tokens; the ring vs
baseline ratio is re-timed there in interleaved rounds, since rows measured minutes
apart on a shared machine see different loads.

Implementations: reference, blockwise (single device); ring, ulysses (8 virtual
devices on the "sequence" axis; Ulysses with 8 heads, one per device); baseline
(`ringattention==0.1.2`'s pure-JAX `ring_attention`, with its chunk size swept).
FLOPs are the useful ones: forward 4*B*H*S^2*D (halved when causal),
forward+backward 3.5x that.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lctx import cli
from lctx.bench import common
from lctx.kernels import (attention, balanced_permutation, reference_attention,
                          ring_tiles_computed)
from lctx.kernels.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, effective_block
from lctx.kernels.ring import DEFAULT_RING_BLOCK

NUM_DEVICES = 8
SEQ_AXIS = "sequence"
ALL_IMPLS = ("reference", "blockwise", "ring", "ulysses", "baseline")
SHARDED_IMPLS = ("ring", "ulysses", "baseline")
ULYSSES_HEADS = NUM_DEVICES  # Ulysses splits heads over the sequence axis: one per device.
FWD_BWD_FLOP_FACTOR = 3.5
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (2048, 4096)
# The point at which the summary evaluates the project's targets.
TARGET_SEQ = 8192
TARGET_RING_SPEEDUP = 1.3
TARGET_FWD_SHARE = 0.50
TARGET_FWD_BWD_SHARE = 0.40
TARGET_MEMORY_GROWTH = 2.2
GROWTH_FROM = 2048
X_SPEC = P(None, SEQ_AXIS, None, None)
IDS_SPEC = P(None, SEQ_AXIS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark run's options (from the command line)."""

    impls: tuple[str, ...] = ALL_IMPLS
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    causal: bool = True
    dtype: str = "float32"
    repeats: int = 5
    max_seconds: float = 20.0
    block_q: tuple[int | None, ...] = (None,)
    block_k: tuple[int | None, ...] = (None,)
    baseline_chunks: tuple[int, ...] = (256, 512, 1024)
    ring_placement: str | None = None  # None: the kernel's default (zigzag when causal)
    head_to_head_rounds: int = 5
    memory_limit_gib: float = 20.0
    matmul_size: int = 4096
    out: str = "bench_results/attention.json"


@dataclasses.dataclass
class Case:
    """One row to measure: an implementation at a length with its options."""

    impl: str
    seq: int
    heads: int
    block_q: int | None = None
    block_k: int | None = None
    chunk: int | None = None  # baseline chunk size
    placement: str | None = None  # ring token placement when not the kernel's default

    @property
    def devices(self) -> int:
        return NUM_DEVICES if self.impl in SHARDED_IMPLS else 1

    @property
    def local_seq(self) -> int:
        """The per-device sequence the tiles cut (Ulysses holds the whole sequence)."""
        return self.seq // NUM_DEVICES if self.impl in ("ring", "baseline") else self.seq

    def blocks_label(self) -> str:
        if self.impl == "baseline":
            return f"chunk {self.chunk}"
        if self.impl == "reference":
            return "-"
        default_q, default_k = ((DEFAULT_RING_BLOCK,) * 2 if self.impl == "ring"
                                else (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K))
        bq = effective_block(self.block_q, self.local_seq, default_q)
        bk = effective_block(self.block_k, self.local_seq, default_k)
        return f"{bq}x{bk}" + (f" {self.placement}" if self.placement else "")


# ----------------------------------------------------------------------------- setup


def make_mesh() -> Mesh:
    """The (1, 1, 8, 1) mesh over (data, fsdp, sequence, tensor) with Auto axes."""
    return jax.make_mesh((1, 1, NUM_DEVICES, 1), ("data", "fsdp", SEQ_AXIS, "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Useful forward FLOPs: two matmuls of 2*B*H*S^2*D, halved when causal."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def make_inputs(seed: int, batch: int, seq: int, heads: int, head_dim: int, dtype: Any,
                sharding: NamedSharding | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random q, k, v `[batch, seq, heads, head_dim]`, placed with `sharding` if given."""
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, seq, heads, head_dim)
    arrays = tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    if sharding is not None:
        arrays = tuple(jax.device_put(x, sharding) for x in arrays)
    return common.block(arrays)


@functools.lru_cache(maxsize=1)
def load_baseline_module():
    """`ringattention/ringattention_jax.py` loaded on its own.

    The package's `__init__` calls an API removed from current JAX, so the module
    file is executed directly, without its package.
    """
    spec = importlib.util.find_spec("ringattention")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `ringattention` package (pip install ringattention==0.1.2) is needed "
                          "for the baseline")
    path = Path(list(spec.submodule_search_locations)[0]) / "ringattention_jax.py"
    module_spec = importlib.util.spec_from_file_location("_ringattention_jax_baseline", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def baseline_attention(mesh: Mesh, chunk: int, causal: bool) -> Callable[..., jax.Array]:
    """The public ring attention over the mesh's sequence axis, `(q, k, v) -> out`.

    It needs K/V heads == Q heads, masks by contiguous shard offsets, and takes
    float32 logits; query and key chunks are both `chunk` tokens.
    """
    module = load_baseline_module()
    blockwise_kwargs = dict(
        causal_block_size=1 if causal else None, query_chunk_size=chunk, key_chunk_size=chunk,
        deterministic=True, dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32,
        policy=jax.checkpoint_policies.nothing_saveable, precision=None, prevent_cse=True)

    def local(q, k, v):
        return module.ring_attention(q, k, v, None, None, None, SEQ_AXIS, True, blockwise_kwargs)

    return jax.shard_map(local, mesh=mesh, in_specs=(X_SPEC,) * 3, out_specs=X_SPEC,
                         check_vma=False)


def lctx_attention(impl: str, mesh: Mesh | None, causal: bool, block_q: int | None,
                   block_k: int | None, placement: str | None = None) -> Callable[..., jax.Array]:
    """`(q, k, v) -> out` through `lctx.kernels.attention` (natural layout)."""
    options = {}
    if impl != "reference":
        options = {k: v for k, v in (("block_q", block_q), ("block_k", block_k)) if v is not None}
    if impl == "ring" and placement is not None:
        options["placement"] = placement
    use_mesh = mesh if impl in ("ring", "ulysses") else None
    return lambda q, k, v: attention(q, k, v, impl=impl, causal=causal, mesh=use_mesh, **options)


def forward_backward(fn: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, ...]]:
    """Gradients of `sum(fn(q, k, v))` with respect to q, k and v."""
    loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))


# ----------------------------------------------------------------------------- checks


def verify_baseline(mesh: Mesh, causal: bool, seq: int = 1024, heads: int = 4,
                    head_dim: int = 64) -> dict[str, float]:
    """Max |error| of the baseline's and lctx ring's outputs (and grads) vs the reference."""
    sharding = NamedSharding(mesh, X_SPEC)
    q, k, v = make_inputs(1, 1, seq, heads, head_dim, jnp.float32, sharding)
    chunk = min(256, seq // NUM_DEVICES)
    reference = lambda q, k, v: reference_attention(q, k, v, causal=causal)
    candidates = {"baseline": baseline_attention(mesh, chunk, causal),
                  "ring": lctx_attention("ring", mesh, causal, None, None)}
    want = jax.jit(reference)(q, k, v)
    want_grads = jax.jit(forward_backward(reference))(q, k, v)
    errors = {"seq": seq, "baseline_chunk": chunk}
    for name, fn in candidates.items():
        got = jax.jit(fn)(q, k, v)
        got_grads = jax.jit(forward_backward(fn))(q, k, v)
        errors[f"{name}_out_max_abs_err"] = float(jnp.max(jnp.abs(got - want)))
        errors[f"{name}_grad_max_abs_err"] = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(got_grads, want_grads))
    return errors


def ring_tiles_per_device(mesh: Mesh, settings: Settings, seq: int, placement: str,
                          block_q: int | None, block_k: int | None) -> list[int]:
    """Tiles each device computes in lctx's ring forward with `placement` of the tokens."""
    order = (balanced_permutation(seq, NUM_DEVICES, placement) if placement != "contiguous"
             else np.arange(seq, dtype=np.int32))
    positions = jax.device_put(np.broadcast_to(order, (settings.batch, seq)).astype(np.int32),
                               NamedSharding(mesh, IDS_SPEC))
    shape = (settings.batch, seq, settings.heads, settings.head_dim)
    x = jax.device_put(jnp.zeros(shape, jnp.dtype(settings.dtype)), NamedSharding(mesh, X_SPEC))

    def local(q, k, v, pos):
        count = ring_tiles_computed(q, k, v, axis_name=SEQ_AXIS, causal=settings.causal,
                                    positions=pos, block_q=block_q, block_k=block_k)
        return jnp.reshape(count, (1,))

    counts = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(X_SPEC,) * 3 + (IDS_SPEC,),
                                   out_specs=P(SEQ_AXIS), check_vma=False))(x, x, x, positions)
    return [int(c) for c in np.asarray(counts)]


# ----------------------------------------------------------------------------- rows


def build_cases(settings: Settings) -> list[Case]:
    """Every (impl, length, options) row in run order."""
    cases = []
    for seq in settings.lengths:
        for impl in settings.impls:
            if impl == "baseline":
                cases += [Case(impl, seq, settings.heads, chunk=c) for c in settings.baseline_chunks]
            elif impl == "reference":
                cases.append(Case(impl, seq, settings.heads))
            else:
                heads = ULYSSES_HEADS if impl == "ulysses" else settings.heads
                placement = settings.ring_placement if impl == "ring" else None
                cases += [Case(impl, seq, heads, bq, bk, placement=placement)
                          for bq in settings.block_q for bk in settings.block_k]
    return cases


def case_problem(case: Case) -> str | None:
    """Why a case cannot run at all (shape constraints), or None."""
    if case.seq % (2 * NUM_DEVICES):
        return f"seq must be a multiple of {2 * NUM_DEVICES}"
    if case.impl == "baseline" and case.local_seq % case.chunk:
        return f"chunk {case.chunk} does not divide the per-device {case.local_seq}"
    for block in (case.block_q, case.block_k):
        if block is not None and case.impl != "reference" and case.local_seq % min(block, case.local_seq):
            return f"block {block} does not divide the per-device {case.local_seq}"
    return None


def case_function(case: Case, settings: Settings, mesh: Mesh) -> Callable[..., jax.Array]:
    if case.impl == "baseline":
        return baseline_attention(mesh, case.chunk, settings.causal)
    return lctx_attention(case.impl, mesh, settings.causal, case.block_q, case.block_k,
                          case.placement)


def measure_case(case: Case, settings: Settings, mesh: Mesh,
                 meter: common.MatmulMeter) -> dict[str, Any]:
    """Compiles, checks predicted memory, times forward and forward+backward of one row."""
    row: dict[str, Any] = {"impl": case.impl, "seq": case.seq, "heads": case.heads,
                           "batch": settings.batch, "head_dim": settings.head_dim,
                           "blocks": case.blocks_label(), "block_q": case.block_q,
                           "block_k": case.block_k, "chunk": case.chunk,
                           "placement": case.placement,
                           "devices": case.devices, "status": "ok"}
    problem = case_problem(case)
    if problem:
        row.update(status="skipped", note=problem)
        return row
    fwd_flops = attention_flops(settings.batch, case.heads, case.seq, settings.head_dim,
                                settings.causal)
    row.update(fwd_flops=fwd_flops, fwd_bwd_flops=FWD_BWD_FLOP_FACTOR * fwd_flops)
    sharding = NamedSharding(mesh, X_SPEC) if case.devices > 1 else None
    args = make_inputs(0, settings.batch, case.seq, case.heads, settings.head_dim,
                       jnp.dtype(settings.dtype), sharding)
    fn = case_function(case, settings, mesh)
    limit = settings.memory_limit_gib * common.GIB

    runnable = {}
    for name, target in (("fwd", fn), ("fwd_bwd", forward_backward(fn))):
        compiled, compile_s = common.compile_fn(jax.jit(target), *args)
        memory = common.memory_stats(compiled)
        host_bytes = memory["total"] * case.devices  # virtual devices share the host's RAM
        row[f"{name}_compile_s"] = compile_s
        row[f"{name}_memory"] = memory
        row[f"{name}_memory_gib"] = memory["total"] / common.GIB
        row[f"{name}_host_memory_gib"] = host_bytes / common.GIB
        if host_bytes > limit:
            row[f"{name}_status"] = f"OOM (predicted {host_bytes / common.GIB:.1f} GiB)"
            del compiled
        else:
            runnable[name] = compiled

    rates_before = meter.sample()
    for name, compiled in runnable.items():
        timing = common.time_compiled(compiled, *args, repeats=settings.repeats,
                                      max_seconds=settings.max_seconds)
        row[f"{name}_time"] = timing.as_dict()
        row[f"{name}_s"] = timing.median
        row[f"{name}_gflops"] = row[f"{name}_flops"] / timing.median / 1e9
    del runnable
    rates_after = meter.sample()
    row["matmul_gflops_local"] = (rates_before + rates_after) / 2
    if "fwd_s" not in row and "fwd_bwd_s" not in row:
        row["status"] = "oom"
    return row


def add_shares(rows: list[dict[str, Any]], matmul_median: float) -> None:
    """Fills each row's share of the matmul rate: global median and row-local."""
    for row in rows:
        for name in ("fwd", "fwd_bwd"):
            if f"{name}_gflops" in row:
                row[f"{name}_share"] = row[f"{name}_gflops"] / matmul_median
                row[f"{name}_share_local"] = row[f"{name}_gflops"] / row["matmul_gflops_local"]


def mark_best_baseline(rows: list[dict[str, Any]]) -> None:
    """Flags, per length, the baseline chunk size with the fastest forward+backward."""
    for seq in {r["seq"] for r in rows}:
        timed = [r for r in rows if r["impl"] == "baseline" and r["seq"] == seq and "fwd_bwd_s" in r]
        for r in timed:
            r["best_chunk"] = r is min(timed, key=lambda x: x["fwd_bwd_s"])


def head_to_head(rows: list[dict[str, Any]], settings: Settings, mesh: Mesh) -> dict[str, Any] | None:
    """Re-times the fastest ring and baseline rows at `TARGET_SEQ` in alternating rounds.

    Rows are measured minutes apart; on a shared machine the load changes in between,
    so the target's ratio is taken from interleaved forward+backward runs.
    """
    ring, baseline = _best(rows, "ring", TARGET_SEQ), _best(rows, "baseline", TARGET_SEQ)
    if not (ring and baseline) or settings.head_to_head_rounds < 1:
        return None
    cases = {"ring": Case("ring", TARGET_SEQ, settings.heads, ring["block_q"], ring["block_k"],
                          placement=ring["placement"]),
             "baseline": Case("baseline", TARGET_SEQ, settings.heads, chunk=baseline["chunk"])}
    args = make_inputs(0, settings.batch, TARGET_SEQ, settings.heads, settings.head_dim,
                       jnp.dtype(settings.dtype), NamedSharding(mesh, X_SPEC))
    fns = {name: common.compile_fn(jax.jit(forward_backward(case_function(case, settings, mesh))),
                                   *args)[0]
           for name, case in cases.items()}
    timings = common.time_interleaved(fns, {name: args for name in fns},
                                      rounds=settings.head_to_head_rounds)
    return {"seq": TARGET_SEQ, "rounds": settings.head_to_head_rounds,
            "ring_blocks": ring["blocks"], "baseline_chunk": baseline["chunk"],
            "ring_fwd_bwd_s": timings["ring"].median, "ring_runs_s": timings["ring"].runs,
            "baseline_fwd_bwd_s": timings["baseline"].median,
            "baseline_runs_s": timings["baseline"].runs,
            "speedup": timings["baseline"].median / timings["ring"].median}


# ----------------------------------------------------------------------------- summary


def _best(rows: list[dict[str, Any]], impl: str, seq: int, key: str = "fwd_bwd_s"):
    timed = [r for r in rows if r["impl"] == impl and r["seq"] == seq and key in r]
    return min(timed, key=lambda r: r[key]) if timed else None


def memory_growth(rows: list[dict[str, Any]], impl: str) -> dict[str, Any]:
    """Forward+backward compiled memory per doubling of the length, from 2K up.

    Uses each length's first row of `impl` (the memory depends on the blocks only
    a little); lengths that were not compiled are left out.
    """
    by_seq: dict[int, float] = {}
    for r in rows:
        if r["impl"] == impl and "fwd_bwd_memory" in r and r["seq"] >= GROWTH_FROM:
            by_seq.setdefault(r["seq"], r["fwd_bwd_memory"]["total"])
    seqs = sorted(by_seq)
    ratios = {f"{a}->{b}": by_seq[b] / by_seq[a] for a, b in zip(seqs, seqs[1:]) if b == 2 * a}
    return {"memory_gib": {s: by_seq[s] / common.GIB for s in seqs}, "ratios": ratios,
            "max_ratio": max(ratios.values()) if ratios else None}


def evaluate_targets(rows: list[dict[str, Any]], settings: Settings,
                     interleaved: dict[str, Any] | None = None) -> dict[str, Any]:
    """PASS/FAIL of the project's targets at `TARGET_SEQ` tokens (None when not measured).

    The ring target uses the interleaved head-to-head when there is one, else the rows.
    """
    targets: dict[str, Any] = {}
    standard = (settings.batch == 1 and settings.heads == 4 and settings.head_dim == 64
                and settings.causal and settings.dtype == "float32")
    targets["standard_shape"] = standard

    ring, baseline = _best(rows, "ring", TARGET_SEQ), _best(rows, "baseline", TARGET_SEQ)
    if ring and baseline:
        row_speedup = baseline["fwd_bwd_s"] / ring["fwd_bwd_s"]
        speedup = interleaved["speedup"] if interleaved else row_speedup
        targets["ring_vs_baseline"] = {
            "ring_blocks": ring["blocks"], "ring_fwd_bwd_s": ring["fwd_bwd_s"],
            "baseline_chunk": baseline["chunk"], "baseline_fwd_bwd_s": baseline["fwd_bwd_s"],
            "row_speedup": row_speedup, "interleaved": interleaved,
            "speedup": speedup, "target": TARGET_RING_SPEEDUP,
            "pass": speedup >= TARGET_RING_SPEEDUP}

    fwd = _best(rows, "blockwise", TARGET_SEQ, "fwd_s")
    fwd_bwd = _best(rows, "blockwise", TARGET_SEQ, "fwd_bwd_s")
    if fwd and fwd_bwd:
        targets["blockwise_share"] = {
            "fwd_share": fwd["fwd_share"], "fwd_share_local": fwd["fwd_share_local"],
            "fwd_blocks": fwd["blocks"], "fwd_target": TARGET_FWD_SHARE,
            "fwd_pass": fwd["fwd_share"] >= TARGET_FWD_SHARE,
            "fwd_bwd_share": fwd_bwd["fwd_bwd_share"],
            "fwd_bwd_share_local": fwd_bwd["fwd_bwd_share_local"],
            "fwd_bwd_blocks": fwd_bwd["blocks"], "fwd_bwd_target": TARGET_FWD_BWD_SHARE,
            "fwd_bwd_pass": fwd_bwd["fwd_bwd_share"] >= TARGET_FWD_BWD_SHARE}

    growth = {}
    for impl in ("reference", "blockwise", "ring", "ulysses"):
        g = memory_growth(rows, impl)
        if g["max_ratio"] is not None:
            g["target"] = None if impl == "reference" else TARGET_MEMORY_GROWTH
            g["pass"] = None if impl == "reference" else g["max_ratio"] <= TARGET_MEMORY_GROWTH
            growth[impl] = g
    targets["memory_growth"] = growth
    return targets


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def format_summary(targets: dict[str, Any], matmul: dict[str, Any]) -> str:
    lines = [f"Targets at batch 1, {TARGET_SEQ} tokens, 4 heads, head_dim 64, causal, fp32, "
             f"{NUM_DEVICES} devices" + ("" if targets["standard_shape"] else
                                         " (NOTE: this run used another shape)"),
             f"  matmul yardstick: median {matmul['median_gflops']:.1f} GFLOP/s over "
             f"{len(matmul['samples_gflops'])} samples (min {min(matmul['samples_gflops']):.1f}, "
             f"max {max(matmul['samples_gflops']):.1f})"]
    t = targets.get("ring_vs_baseline")
    if t:
        h2h = t["interleaved"]
        lines.append(f"  (a) ring fwd+bwd speedup vs best baseline: {t['speedup']:.2f}x "
                     f"(target >= {t['target']}x): {_verdict(t['pass'])}")
        if h2h:
            lines.append(f"      interleaved, {h2h['rounds']} rounds: ring {t['ring_blocks']} "
                         f"{h2h['ring_fwd_bwd_s']:.3f} s vs baseline chunk {t['baseline_chunk']} "
                         f"{h2h['baseline_fwd_bwd_s']:.3f} s")
        lines.append(f"      from the rows: ring {t['ring_fwd_bwd_s']:.3f} s vs baseline "
                     f"{t['baseline_fwd_bwd_s']:.3f} s = {t['row_speedup']:.2f}x")
    else:
        lines.append("  (a) ring vs baseline: not measured at this length: n/a")
    t = targets.get("blockwise_share")
    if t:
        lines.append(f"  (b) blockwise fwd share of matmul rate: {t['fwd_share']:.0%} (row-local "
                     f"{t['fwd_share_local']:.0%}; target >= {t['fwd_target']:.0%}): "
                     f"{_verdict(t['fwd_pass'])}")
        lines.append(f"      blockwise fwd+bwd share: {t['fwd_bwd_share']:.0%} (row-local "
                     f"{t['fwd_bwd_share_local']:.0%}; target >= {t['fwd_bwd_target']:.0%}): "
                     f"{_verdict(t['fwd_bwd_pass'])}")
    else:
        lines.append("  (b) blockwise share: not measured at this length: n/a")
    for impl, g in targets["memory_growth"].items():
        ratios = ", ".join(f"{k} x{v:.2f}" for k, v in g["ratios"].items())
        target = "expected ~4x (quadratic)" if g["target"] is None else f"target <= {g['target']}x"
        lines.append(f"  (c) {impl} fwd+bwd memory per doubling: {ratios}; max x{g['max_ratio']:.2f} "
                     f"({target}): {_verdict(g['pass'])}")
    if not targets["memory_growth"]:
        lines.append("  (c) memory growth: needs two lengths a doubling apart from 2K: n/a")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def _ms(row: dict[str, Any], name: str) -> str:
    if f"{name}_s" in row:
        return f"{row[f'{name}_s'] * 1e3:.1f}"
    return row.get(f"{name}_status", "")


def _pct(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.0%}" if key in row else ""


def _num(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else ""


def format_rows(rows: list[dict[str, Any]]) -> str:
    headers = ("impl", "seq", "heads", "blocks", "fwd ms", "fwd+bwd ms", "compile s f/fb",
               "mem GiB fb", "fwd GF/s", "fwd %mm", "fb GF/s", "fb %mm", "mm GF/s", "note")
    body = []
    for r in rows:
        impl = r["impl"] + ("*" if r.get("best_chunk") else "")
        note = r.get("note", "")
        if r["devices"] > 1 and "fwd_bwd_memory_gib" in r:
            note = (note + " " if note else "") + "mem per device"
        if r["impl"] == "ulysses":
            note = (note + "; " if note else "") + f"{r['heads']} heads"
        compile_s = ("" if "fwd_compile_s" not in r else
                     f"{r['fwd_compile_s']:.1f}/{r.get('fwd_bwd_compile_s', float('nan')):.1f}")
        body.append((impl, r["seq"], r["heads"], r["blocks"], _ms(r, "fwd"), _ms(r, "fwd_bwd"),
                     compile_s, _num(r, "fwd_bwd_memory_gib", ".3f"), _num(r, "fwd_gflops", ".1f"),
                     _pct(r, "fwd_share"), _num(r, "fwd_bwd_gflops", ".1f"),
                     _pct(r, "fwd_bwd_share"), _num(r, "matmul_gflops_local", ".0f"), note))
    return common.format_table(headers, body, left=(0, -1))


def format_balance(balance: list[dict[str, Any]]) -> str:
    headers = ("seq", "blocks", "placement", "tiles per device", "max/mean")
    body = [(b["seq"], b["blocks"], b["placement"], " ".join(map(str, b["tiles"])),
             f"{b['max_over_mean']:.2f}") for b in balance]
    return common.format_table(headers, body, left=(0, 2, 3))


# ----------------------------------------------------------------------------- main


def run(settings: Settings) -> dict[str, Any]:
    """Runs the whole benchmark, printing as it goes; returns the JSON payload."""
    mesh = make_mesh()
    payload: dict[str, Any] = {"settings": dataclasses.asdict(settings)}
    if "baseline" in settings.impls:
        check = verify_baseline(mesh, settings.causal)
        payload["baseline_check"] = check
        print(f"correctness at {check['seq']} tokens vs reference_attention (max |err|): "
              f"baseline out {check['baseline_out_max_abs_err']:.2e} grads "
              f"{check['baseline_grad_max_abs_err']:.2e}; lctx ring out "
              f"{check['ring_out_max_abs_err']:.2e} grads {check['ring_grad_max_abs_err']:.2e}",
              flush=True)

    meter = common.MatmulMeter(settings.matmul_size)
    rows = []
    for case in build_cases(settings):
        try:
            row = measure_case(case, settings, mesh, meter)
        except Exception as error:  # noqa: BLE001 - a failing row must not end the sweep
            row = {"impl": case.impl, "seq": case.seq, "heads": case.heads, "devices": case.devices,
                   "blocks": case.blocks_label(), "status": "error",
                   "note": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
        rows.append(row)
        add_shares([row], meter.median)
        print(format_rows([row]).splitlines()[-1], flush=True)

    add_shares(rows, meter.median)  # final shares against the median over the whole run
    mark_best_baseline(rows)
    balance = []
    if "ring" in settings.impls:
        for seq in settings.lengths:
            for bq in settings.block_q:
                for bk in settings.block_k:
                    case = Case("ring", seq, settings.heads, bq, bk)
                    if case_problem(case):
                        continue
                    used = settings.ring_placement or ("zigzag" if settings.causal else "contiguous")
                    placements = tuple(dict.fromkeys((used, "contiguous")))
                    for placement in placements:
                        tiles = ring_tiles_per_device(mesh, settings, seq, placement, bq, bk)
                        balance.append({"seq": seq, "blocks": case.blocks_label(),
                                        "placement": placement, "tiles": tiles,
                                        "max_over_mean": max(tiles) / (sum(tiles) / len(tiles))})

    matmul = {"size": settings.matmul_size, "samples_gflops": meter.samples,
              "median_gflops": meter.median}
    interleaved = None
    if "ring" in settings.impls and "baseline" in settings.impls:
        try:
            interleaved = head_to_head(rows, settings, mesh)
        except Exception as error:  # noqa: BLE001 - the rows still stand
            print(f"head-to-head failed: {type(error).__name__}: {error}", file=sys.stderr)
    targets = evaluate_targets(rows, settings, interleaved)
    payload.update(matmul=matmul, rows=rows, ring_load_balance=balance, targets=targets)

    print("\n" + format_rows(rows))
    print("(* = fastest baseline chunk at that length; %mm = share of the median matmul rate; "
          "mm GF/s = matmul rate sampled around the row; ring/ulysses/baseline memory per device)")
    if balance:
        print("\nlctx ring load balance (forward tiles per device; the first placement per "
              "length is the one timed above)")
        print(format_balance(balance))
    print("\n" + format_summary(targets, matmul))
    path = common.write_json(settings.out, payload)
    print(f"\nwrote {path}")
    return payload


def _blocks(text: str) -> tuple[int | None, ...]:
    return tuple(None if x.strip() in ("", "default") else int(x) for x in text.split(","))


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Command-line flags -> Settings (exits with code 2 and a message on bad values)."""
    parser = cli.ArgumentParser(prog="python -m lctx.bench.attention",
                                     description=__doc__.splitlines()[0])
    d = Settings()
    parser.add_argument("--impls", default=",".join(d.impls),
                        help=f"comma-separated subset of {','.join(ALL_IMPLS)}; or pallas "
                             f"alone (--impl=pallas: the fused kernel on a TPU/GPU, lctx.bench.pallas)")
    parser.add_argument("--lengths", type=cli.ints, default=None,
                        help="sequence lengths (default 2048,...,32768; --quick: 2048,4096)")
    parser.add_argument("--batch", type=cli.positive_int, default=d.batch)
    parser.add_argument("--heads", type=cli.positive_int, default=d.heads,
                        help="(Ulysses always uses 8)")
    parser.add_argument("--head_dim", type=int, default=d.head_dim)
    parser.add_argument("--causal", type=_bool, default=d.causal)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--max_seconds", type=float, default=d.max_seconds,
                        help="stop repeating (after 2 runs) once a measurement took this long")
    parser.add_argument("--block_q", type=_blocks, default=d.block_q,
                        help="lctx tile sizes to sweep, e.g. 256,512,1024 (default: kernel's)")
    parser.add_argument("--block_k", type=_blocks, default=d.block_k)
    parser.add_argument("--baseline_chunks", type=cli.ints, default=d.baseline_chunks)
    parser.add_argument("--ring_placement", choices=("zigzag", "striped", "contiguous"),
                        default=None, help="ring token placement (default: zigzag when causal)")
    parser.add_argument("--head_to_head_rounds", type=int, default=None,
                        help="interleaved ring-vs-baseline rounds at 8K for the target "
                             "(default 5, --quick 3; 0: use the rows)")
    parser.add_argument("--memory_limit_gib", type=float, default=d.memory_limit_gib,
                        help="rows predicted above this (host total) are reported OOM, not run")
    parser.add_argument("--matmul_size", type=int, default=d.matmul_size)
    parser.add_argument("--out", default=d.out, help="JSON results path")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: lengths 2048,4096, 2 repeats, baseline chunks 256,512")
    args = parser.parse_args(argv)

    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    unknown = [i for i in impls if i not in ALL_IMPLS + ("pallas",)]
    if unknown or not impls:
        parser.error(f"--impls={args.impls!r}: unknown {unknown}; allowed {','.join(ALL_IMPLS)}")
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    repeats = args.repeats or (2 if args.quick else d.repeats)
    rounds = args.head_to_head_rounds
    if rounds is None:
        rounds = 3 if args.quick else d.head_to_head_rounds
    chunks = args.baseline_chunks
    if args.quick and args.baseline_chunks == d.baseline_chunks:
        chunks = (256, 512)
    if not lengths or any(s <= 0 or s % (2 * NUM_DEVICES) for s in lengths):
        parser.error(f"--lengths={','.join(map(str, lengths))}: expected positive multiples of "
                     f"{2 * NUM_DEVICES}")
    return Settings(impls=impls, lengths=tuple(lengths), batch=args.batch, heads=args.heads,
                    head_dim=args.head_dim, causal=args.causal, dtype=args.dtype,
                    repeats=repeats, max_seconds=args.max_seconds, block_q=args.block_q,
                    block_k=args.block_k, baseline_chunks=tuple(chunks),
                    ring_placement=args.ring_placement,
                    head_to_head_rounds=rounds,
                    memory_limit_gib=args.memory_limit_gib, matmul_size=args.matmul_size,
                    out=args.out)


def main(argv: Sequence[str] | None = None) -> int:
    # Eight virtual CPU devices, before anything touches a JAX backend.
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    settings = parse_settings(argv)
    if "pallas" in settings.impls:  # one accelerator, not the 8-device CPU sweep
        from lctx.bench import pallas as pallas_bench

        return pallas_bench.run(settings)
    if jax.device_count() < NUM_DEVICES:
        print(f"needs {NUM_DEVICES} devices, found {jax.device_count()} (was a JAX backend "
              f"started before main?)", file=sys.stderr)
        return 2
    run(settings)
    return 0


if __name__ == "__main__":
    cli.run_main(main, prog="lctx.bench.attention")
