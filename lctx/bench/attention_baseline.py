"""The public ring baseline (`ringattention==0.1.2`'s pure-JAX `ring_attention`):
loading it, checking it against `reference_attention`, and timing it against lctx's
ring in interleaved rounds (rows measured minutes apart on a shared machine see
different loads, so the target's ratio comes from alternating runs).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from lctx.bench import common
from lctx.bench.attention_setup import (NUM_DEVICES, SEQ_AXIS, X_SPEC, Settings, forward_backward,
                                        lctx_attention, make_inputs)
from lctx.bench.attention_targets import TARGET_SEQ, best_row
from lctx.kernels import reference_attention


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
    ring, baseline = best_row(rows, "ring", TARGET_SEQ), best_row(rows, "baseline", TARGET_SEQ)
    if not (ring and baseline) or settings.head_to_head_rounds < 1:
        return None
    candidates = {"ring": lctx_attention("ring", mesh, settings.causal, ring["block_q"],
                                         ring["block_k"], ring["placement"]),
                  "baseline": baseline_attention(mesh, baseline["chunk"], settings.causal)}
    args = make_inputs(0, settings.batch, TARGET_SEQ, settings.heads, settings.head_dim,
                       jnp.dtype(settings.dtype), NamedSharding(mesh, X_SPEC))
    fns = {name: common.compile_fn(jax.jit(forward_backward(fn)), *args)[0]
           for name, fn in candidates.items()}
    timings = common.time_interleaved(fns, {name: args for name in fns},
                                      rounds=settings.head_to_head_rounds)
    return {"seq": TARGET_SEQ, "rounds": settings.head_to_head_rounds,
            "ring_blocks": ring["blocks"], "baseline_chunk": baseline["chunk"],
            "ring_fwd_bwd_s": timings["ring"].median, "ring_runs_s": timings["ring"].runs,
            "baseline_fwd_bwd_s": timings["baseline"].median,
            "baseline_runs_s": timings["baseline"].runs,
            "speedup": timings["baseline"].median / timings["ring"].median}
