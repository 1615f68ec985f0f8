"""The project's attention targets, read from the measured rows at 8K tokens: lctx's
ring against the best baseline chunk (fwd+bwd), blockwise's share of the matmul rate,
and compiled memory per doubling of the length (linear attention stays near 2x).
"""

from __future__ import annotations

from typing import Any

from lctx.bench import common
from lctx.bench.attention_setup import NUM_DEVICES, Settings

TARGET_SEQ = 8192
TARGET_RING_SPEEDUP = 1.3
TARGET_FWD_SHARE = 0.50
TARGET_FWD_BWD_SHARE = 0.40
TARGET_MEMORY_GROWTH = 2.2
GROWTH_FROM = 2048


def best_row(rows: list[dict[str, Any]], impl: str, seq: int, key: str = "fwd_bwd_s"):
    """The fastest measured row of `impl` at `seq` by `key`, or None."""
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

    ring, baseline = best_row(rows, "ring", TARGET_SEQ), best_row(rows, "baseline", TARGET_SEQ)
    if ring and baseline:
        row_speedup = baseline["fwd_bwd_s"] / ring["fwd_bwd_s"]
        speedup = interleaved["speedup"] if interleaved else row_speedup
        targets["ring_vs_baseline"] = {
            "ring_blocks": ring["blocks"], "ring_fwd_bwd_s": ring["fwd_bwd_s"],
            "baseline_chunk": baseline["chunk"], "baseline_fwd_bwd_s": baseline["fwd_bwd_s"],
            "row_speedup": row_speedup, "interleaved": interleaved,
            "speedup": speedup, "target": TARGET_RING_SPEEDUP,
            "pass": speedup >= TARGET_RING_SPEEDUP}

    fwd = best_row(rows, "blockwise", TARGET_SEQ, "fwd_s")
    fwd_bwd = best_row(rows, "blockwise", TARGET_SEQ, "fwd_bwd_s")
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
