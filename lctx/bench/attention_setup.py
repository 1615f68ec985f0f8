"""What the attention benchmarks share: settings, a row's case, the mesh, inputs, FLOPs.

Shapes are `[batch, seq, heads, head_dim]`; the sharded implementations (ring,
ulysses, baseline) run on 8 virtual devices along the "sequence" axis. FLOPs are the
useful ones: forward 4*B*H*S^2*D (halved when causal), forward+backward 3.5x that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lctx.bench import common
from lctx.kernels import attention
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
