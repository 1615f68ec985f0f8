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

This module is the command line and the sweep; what each part measures lives apart:
attention_speed (time and compiled memory per row), attention_baseline (the public
ring: its correctness and the interleaved head-to-head), attention_balance (ring tiles
per device), attention_targets (the summary's PASS/FAIL), attention_setup (shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

import jax

from lctx import cli
from lctx.bench import common, pallas
from lctx.bench.attention_balance import format_balance, ring_load_balance
from lctx.bench.attention_baseline import head_to_head, mark_best_baseline, verify_baseline
from lctx.bench.attention_setup import (ALL_IMPLS, DEFAULT_LENGTHS, NUM_DEVICES, QUICK_LENGTHS,
                                        Settings, make_mesh)
from lctx.bench.attention_speed import add_shares, build_cases, format_rows, measure_case
from lctx.bench.attention_targets import evaluate_targets, format_summary


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
    balance = ring_load_balance(settings, mesh) if "ring" in settings.impls else []

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
        return pallas.run(settings)
    if jax.device_count() < NUM_DEVICES:
        print(f"needs {NUM_DEVICES} devices, found {jax.device_count()} (was a JAX backend "
              f"started before main?)", file=sys.stderr)
        return 2
    run(settings)
    return 0


if __name__ == "__main__":
    cli.run_main(main, prog="lctx.bench.attention")
