"""Time and compiled memory of one row: an implementation at a length with its blocks.

Forward and forward+backward are compiled apart (compile time reported), rows whose
compiled memory would not fit the host are reported OOM and not run, and each row's
GFLOP/s is set against a large fp32 matmul's rate sampled before and after it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from lctx.bench import common
from lctx.bench.attention_baseline import baseline_attention
from lctx.bench.attention_setup import (FWD_BWD_FLOP_FACTOR, NUM_DEVICES, ULYSSES_HEADS, X_SPEC,
                                        Case, Settings, attention_flops, forward_backward,
                                        lctx_attention, make_inputs)


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
