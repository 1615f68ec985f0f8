"""Pallas kernel benchmark: achieved share of the accelerator's peak.

    python -m lctx.bench.attention --impl=pallas --lengths 8192,32768 --dtype bfloat16 \
        --heads 8 --head_dim 128 --block_q 512,1024 --block_k 512

On a TPU or GPU it times `impl="pallas"` forward and forward+backward on one device
and reports useful FLOP/s (forward 4*B*H*S^2*D, halved when causal; backward 2.5x)
as a share of the chip's dense bf16 peak. On a CPU it runs the kernel in interpret
mode as a smoke test of the command (its timings mean nothing).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp

from lctx.bench import common
from lctx.bench.attention_setup import (FWD_BWD_FLOP_FACTOR, Settings, attention_flops,
                                        make_inputs)
from lctx.kernels import attention

# Dense bf16 FLOP/s per device (a megacore v4/v5p device is both TensorCores).
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
_TPU_CORES = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
_MAX_INTERPRET_SEQ = 1024


def device_peak(device) -> tuple[str, float | None]:
    """(label, dense bf16 FLOP/s or None when unknown) for a JAX device."""
    if device.platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        from lctx.kernels.pallas_tpu import generation_of

        gen = generation_of(device.device_kind)
        if gen is None:
            return device.device_kind, None
        cores = _TPU_CORES[gen]
        info = pltpu.get_tpu_info_for_chip(pltpu.ChipVersion(gen), cores)
        return f"TPU {gen}", info.bf16_ops_per_second * cores
    for name, peak in GPU_PEAKS.items():
        if name in device.device_kind:
            return name, peak
    return device.device_kind, None


def run(settings: Settings) -> int:
    """Measures every (length, block_q, block_k) of `settings` (lctx.bench.attention's)."""
    device = jax.devices()[0]
    interpret = device.platform not in ("tpu", "gpu")
    label, peak = device_peak(device)
    if interpret:
        if max(settings.lengths) > _MAX_INTERPRET_SEQ:
            print(f"--lengths={','.join(map(str, settings.lengths))}: without a TPU or GPU the "
                  f"Pallas kernel runs in interpret mode, a smoke test limited to lengths <= "
                  f"{_MAX_INTERPRET_SEQ}", file=sys.stderr)
            return 2
        print("no TPU or GPU: running the Pallas kernel in interpret mode (smoke test only; "
              "timings are not meaningful)")
    rows: list[dict[str, Any]] = []
    for seq in settings.lengths:
        args = make_inputs(0, settings.batch, seq, settings.heads, settings.head_dim,
                           jnp.dtype(settings.dtype), None)
        fwd_flops = attention_flops(settings.batch, settings.heads, seq, settings.head_dim,
                                    settings.causal)
        for bq in settings.block_q:
            for bk in settings.block_k:
                blocks = {k: v for k, v in (("block_q", bq), ("block_k", bk)) if v is not None}
                fn = lambda q, k, v, blocks=blocks: attention(
                    q, k, v, impl="pallas", causal=settings.causal, interpret=interpret,
                    **blocks)
                grad = jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2))
                row = {"seq": seq, "block_q": bq, "block_k": bk, "device": label}
                for name, target, flops in (("fwd", fn, fwd_flops),
                                            ("fwd_bwd", grad, FWD_BWD_FLOP_FACTOR * fwd_flops)):
                    compiled, compile_s = common.compile_fn(jax.jit(target), *args)
                    timing = common.time_compiled(compiled, *args, repeats=settings.repeats,
                                                  max_seconds=settings.max_seconds)
                    rate = flops / timing.median
                    row.update({f"{name}_s": timing.median, f"{name}_compile_s": compile_s,
                                f"{name}_tflops": rate / 1e12,
                                f"{name}_share": None if peak is None else rate / peak})
                rows.append(row)
    share = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    peak_text = "unknown" if peak is None else f"{peak / 1e12:.0f} TFLOP/s bf16"
    print(f"\nPallas attention on {label} (peak {peak_text}), "
          f"batch {settings.batch}, heads {settings.heads}, head_dim {settings.head_dim}, "
          f"{settings.dtype}, causal={settings.causal}")
    print(common.format_table(
        ["seq", "blocks", "fwd ms", "fwd TFLOP/s", "fwd share", "f+b ms", "f+b TFLOP/s",
         "f+b share"],
        [[r["seq"], f"{r['block_q'] or 'default'}x{r['block_k'] or 'default'}",
          f"{1e3 * r['fwd_s']:.2f}", f"{r['fwd_tflops']:.1f}", share(r["fwd_share"]),
          f"{1e3 * r['fwd_bwd_s']:.2f}", f"{r['fwd_bwd_tflops']:.1f}", share(r["fwd_bwd_share"])]
         for r in rows]))
    out = settings.out.replace("attention.json", "pallas.json")
    print(f"\nwrote {common.write_json(out, {'rows': rows, 'interpret': interpret})}")
    return 0
