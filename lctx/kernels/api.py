"""`lctx.kernels.attention`: the one entry point to every attention implementation.

It validates its arguments (one `ValueError` naming the argument, the value and
what is allowed, before anything is traced), places tokens on the mesh, runs the
chosen strategy under `shard_map` and returns the output in the caller's order.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from lctx import compat
from lctx.kernels.pallas import check_blocks, resolve_kernel
from lctx.kernels.layout import to_balanced, to_natural
from lctx.kernels.reference import default_positions
from lctx.kernels.registry import IMPLS, LAYOUTS, option_problems, sequence_problems
from lctx.kernels.ring import zigzag_to_balanced, zigzag_to_natural

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class _Plan(NamedTuple):
    """Static, hashable description of one attention call (the jit cache key)."""

    impl: str
    causal: bool
    sliding_window: int | None
    scale: float
    mesh: Mesh | None
    seq_axis: str | None
    batch_axes: tuple[str, ...]
    head_axis: str | None
    layout: str
    placement: str | None
    block_q: int | None
    block_k: int | None
    return_lse: bool
    ring_inner: str = "xla"
    kernel: str | None = None  # the Pallas kernel ("tpu" | "gpu"), resolved
    interpret: bool = False

    @property
    def mask_options(self) -> dict:
        return dict(causal=self.causal, sliding_window=self.sliding_window, scale=self.scale,
                    return_lse=self.return_lse)

    @property
    def blocks(self) -> dict:
        return dict(block_q=self.block_q, block_k=self.block_k)


def _fail(name: str, value, allowed: str):
    raise ValueError(f"attention: {name}={value!r} is not allowed; {allowed}")


def _fail_first(problems) -> None:
    if problems:
        _fail(*problems[0])


def _axis_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _check_ids(name: str, ids, batch: int, seq: int):
    if ids is None:
        return
    shape, dtype = getattr(ids, "shape", None), getattr(ids, "dtype", None)
    if shape != (batch, seq):
        _fail(f"{name}.shape", shape, f"expected (batch, seq) = {(batch, seq)}")
    if not jnp.issubdtype(dtype, jnp.integer):
        _fail(f"{name}.dtype", str(dtype), "expected an integer dtype (int32)")


def _check_tensors(q, k, v, segment_ids, positions) -> None:
    """q, k, v: rank, float dtype, matching shapes and a whole number of query groups."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            _fail(f"{name}.shape", getattr(x, "shape", None), "expected [batch, seq, heads, head_dim]")
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            _fail(f"{name}.dtype", str(x.dtype), "expected float32, bfloat16 or float16")
    if not (q.dtype == k.dtype == v.dtype):
        _fail("k.dtype/v.dtype", (str(k.dtype), str(v.dtype)), f"expected q's dtype {q.dtype}")
    batch, seq, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq) or k.shape[3] != head_dim:
        _fail("k.shape/v.shape", (k.shape, v.shape),
              f"expected both [batch={batch}, seq={seq}, kv_heads, head_dim={head_dim}]")
    if heads % k.shape[2]:
        _fail("kv_heads", k.shape[2], f"q's heads ({heads}) must be a multiple of k/v's heads")
    _check_ids("segment_ids", segment_ids, batch, seq)
    _check_ids("positions", positions, batch, seq)


def _check_mask(sliding_window, scale) -> None:
    if sliding_window is not None and (not isinstance(sliding_window, (int, np.integer))
                                       or sliding_window <= 0):
        _fail("sliding_window", sliding_window, "expected None or a positive int")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        _fail("scale", scale, "expected None or a positive float")


def _mesh_axes(q, k, mesh, impl, seq_axis, batch_axes, head_axis):
    """The mesh's batch axes and head axis present, its head-split size and sequence
    shards, after checking that batch and heads divide them."""
    if mesh is None:
        if IMPLS[impl].sequence_parallel:
            _fail("mesh", None, f"impl={impl!r} needs a mesh with a {seq_axis!r} axis")
        return (), None, 1, 1
    if not isinstance(mesh, Mesh):
        _fail("mesh", type(mesh).__name__, "expected a jax.sharding.Mesh (lctx.parallel.make_mesh)")
    batch, heads, kv_heads = q.shape[0], q.shape[2], k.shape[2]
    present_batch = tuple(a for a in batch_axes if a in mesh.axis_names)
    present_head = head_axis if head_axis in mesh.axis_names else None
    if batch % _axis_size(mesh, present_batch):
        _fail("batch", batch, f"it must be divisible by the mesh's batch axes {present_batch} "
              f"(size {_axis_size(mesh, present_batch)})")
    tensor = mesh.shape[present_head] if present_head else 1
    if heads % tensor or kv_heads % tensor:
        _fail("heads/kv_heads", (heads, kv_heads),
              f"both must be divisible by the {head_axis!r} axis size {tensor}")
    shards = 1
    if IMPLS[impl].sequence_parallel:
        if seq_axis not in mesh.axis_names:
            _fail("seq_axis", seq_axis, f"expected one of the mesh axes {mesh.axis_names}")
        shards = mesh.shape[seq_axis]
    return present_batch, present_head, tensor, shards


def _plan(q, k, v, *, impl, causal, segment_ids, positions, sliding_window, scale, mesh,
          seq_axis, batch_axes, head_axis, layout, return_lse, impl_options) -> _Plan:
    """Validates every argument from shapes and dtypes alone; returns the static plan."""
    _fail_first(option_problems(impl, impl_options))
    if layout not in LAYOUTS:
        _fail("layout", layout, f"expected one of {LAYOUTS}")
    _check_tensors(q, k, v, segment_ids, positions)
    _check_mask(sliding_window, scale)
    entry = IMPLS[impl]
    interpret = impl_options.get("interpret", False)
    kernel = (resolve_kernel(impl_options.get("kernel"), interpret)
              if entry.uses_pallas(impl_options) else None)
    present_batch, present_head, tensor, shards = _mesh_axes(q, k, mesh, impl, seq_axis,
                                                             batch_axes, head_axis)
    batch, seq, heads, head_dim = q.shape
    _fail_first(sequence_problems(impl, impl_options, seq=seq, shards=shards, causal=causal,
                                  layout=layout, heads=heads // tensor,
                                  kv_heads=k.shape[2] // tensor, axis=seq_axis))
    if kernel is not None:
        local_seq = seq if entry.whole_sequence else seq // shards
        check_blocks(kernel, impl_options.get("block_q"), impl_options.get("block_k"),
                     local_seq, heads // k.shape[2], head_dim, q.dtype)
    return _Plan(impl=impl, causal=bool(causal), sliding_window=sliding_window,
                 scale=float(head_dim**-0.5 if scale is None else scale), mesh=mesh,
                 seq_axis=seq_axis if entry.sequence_parallel else None,
                 batch_axes=present_batch, head_axis=present_head, layout=layout,
                 placement=entry.placement(impl_options, causal),
                 block_q=impl_options.get("block_q"), block_k=impl_options.get("block_k"),
                 return_lse=bool(return_lse), ring_inner=impl_options.get("ring_inner", "xla"),
                 kernel=kernel, interpret=bool(interpret))


def _specs(plan: _Plan):
    """PartitionSpecs for (q/k/v/out, ids, lse) under the plan's mesh axes."""
    batch = plan.batch_axes or None
    seq = plan.seq_axis
    return P(batch, seq, plan.head_axis, None), P(batch, seq), P(batch, seq, plan.head_axis)


def _zigzag_in_map(local, axis_name: str):
    """`local` on natural contiguous shards: zigzag-placed in, natural order out."""
    def placed(q, k, v, pos, seg):
        q, k, v, pos, seg = (None if x is None else zigzag_to_balanced(x, axis_name)
                             for x in (q, k, v, pos, seg))
        result = local(q, k, v, pos, seg)
        return jax.tree.map(lambda x: zigzag_to_natural(x, axis_name), result)
    return placed


def _compute_mesh(mesh, arrays):
    """The mesh to run on: `mesh` itself, or its Auto-axes twin when it has Explicit axes
    but neither a `jax.set_mesh` context nor any input's type is sharded on them.

    The output's type then follows the inputs' (unsharded in, unsharded out), so an
    eager `jax.grad` works: JAX 0.10 cannot seed the cotangent of a loss typed on an
    Explicit mesh outside a mesh context.
    """
    if not isinstance(mesh, Mesh) or not compat.is_explicit(mesh) or compat.mesh_context():
        return mesh
    if any(compat.typed_on_mesh(x) for x in arrays):
        return mesh
    return compat.with_auto_axes(mesh)


@functools.partial(jax.jit, static_argnames=("plan",))
def _run(q, k, v, positions, segment_ids, *, plan: _Plan):
    local = IMPLS[plan.impl].build(plan)
    if plan.mesh is None:
        return local(q, k, v, positions, segment_ids)

    x_spec, id_spec, lse_spec = _specs(plan)
    permute = plan.placement not in (None, "contiguous") and plan.layout == "natural"
    # Zigzag is placed inside the map by ppermute (no sequence gather); striped by a gather.
    in_map = permute and plan.placement == "zigzag"
    if in_map:
        local = _zigzag_in_map(local, plan.seq_axis)
    elif permute:
        # Gather along a replicated sequence (natural layout is the convenience path;
        # the model permutes once at its input and calls with layout="balanced").
        shards = plan.mesh.shape[plan.seq_axis]
        x_rep, id_rep = P(*x_spec[:1], None, *x_spec[2:]), P(x_spec[0], None)
        place = lambda x, spec: to_balanced(compat.constrain(x, plan.mesh, spec), shards,
                                            plan.placement)
        q, k, v = (place(x, x_rep) for x in (q, k, v))
        positions = place(positions, id_rep)
        if segment_ids is not None:
            segment_ids = place(segment_ids, id_rep)

    q, k, v = (compat.constrain(x, plan.mesh, x_spec) for x in (q, k, v))
    positions = compat.constrain(positions, plan.mesh, id_spec)
    seg_spec = None
    if segment_ids is not None:
        segment_ids, seg_spec = compat.constrain(segment_ids, plan.mesh, id_spec), id_spec
    out_specs = (x_spec, lse_spec) if plan.return_lse else x_spec
    result = compat.shard_map(local, mesh=plan.mesh,
                              in_specs=(x_spec, x_spec, x_spec, id_spec, seg_spec),
                              out_specs=out_specs)(q, k, v, positions, segment_ids)
    if not permute or in_map:
        return result
    # Back in token order, re-split along the sequence so no device keeps a full copy.
    restore = lambda x, spec: compat.constrain(
        to_natural(compat.constrain(x, plan.mesh, P(spec[0], None, *spec[2:])), shards,
                   plan.placement), plan.mesh, spec)
    if plan.return_lse:
        return restore(result[0], x_spec), restore(result[1], lse_spec)
    return restore(result, x_spec)


def attention(q, k, v, *, impl: str, causal: bool = False, segment_ids=None, positions=None,
              sliding_window: int | None = None, scale: float | None = None,
              mesh: Mesh | None = None, seq_axis: str = "sequence",
              batch_axes: tuple[str, ...] = ("data", "fsdp"), head_axis: str = "tensor",
              layout: str = "natural", return_lse: bool = False, **impl_options):
    """Exact attention with the chosen implementation.

    Args:
      q: `[batch, seq, heads, head_dim]`; k, v: `[batch, seq, kv_heads, head_dim]` with
        heads % kv_heads == 0; float32, bfloat16 or float16 (all the same dtype).
      impl: "reference" (materialised fp32 softmax), "blockwise" (tiled, O(seq)
        memory), "ring" (sequence sharded over `seq_axis`, K/V rotating) or "ulysses"
        (all-to-all from sequence to head shards).
      segment_ids, positions: int `[batch, seq]`; the mask is by position and segment.
      mesh: required for ring/ulysses. Batch is sharded over the `batch_axes` and heads
        over `head_axis` that the mesh has. Auto or Explicit axis types; on an Explicit
        mesh without a `jax.set_mesh` context, unsharded inputs run on its Auto twin so
        the output is untyped like them and eager `jax.grad` works (inputs typed on the
        mesh need `jax.set_mesh` or `jax.jit` for an eager grad, as any JAX code does).
      layout: "natural" (token order; ring places tokens load-balanced itself) or
        "balanced" (the caller already permuted tokens, positions and segment ids with
        `lctx.kernels.to_balanced`).
      impl_options: block_q, block_k (tile sizes); placement for ring with the natural
        layout ("zigzag" default for causal, "striped", "contiguous"). impl="pallas"
        (fused Pallas kernel, one device) and impl="ring" with ring_inner="pallas"
        ("xla" default) take kernel ("tpu" | "gpu" | None: the backend decides) and
        interpret (Pallas interpret mode, required on a CPU).
    Returns:
      `[batch, seq, heads, head_dim]` in q's dtype, plus float32 lse
      `[batch, seq, heads]` with `return_lse`.
    """
    plan = _plan(q, k, v, impl=impl, causal=causal, segment_ids=segment_ids,
                 positions=positions, sliding_window=sliding_window, scale=scale,
                 mesh=_compute_mesh(mesh, (q, k, v, segment_ids, positions)),
                 seq_axis=seq_axis, batch_axes=tuple(batch_axes), head_axis=head_axis,
                 layout=layout, return_lse=return_lse, impl_options=impl_options)
    batch, seq = q.shape[:2]
    positions = default_positions(batch, seq) if positions is None else positions.astype(jnp.int32)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _run(q, k, v, positions, segment_ids, plan=plan)
