"""Every attention implementation against the dense float32 reference.

Runs on 8 virtual CPU devices (conftest.py). Shapes are small so the whole matrix
compiles in a couple of minutes; what the matrix covers: causal and bidirectional,
GQA ratios 1/2/4 and MQA, odd head counts, packed documents crossing device
boundaries, sliding windows, batch > 1, 8-way and 2x4 meshes (Auto and Explicit
axis types), bf16, and the log-sum-exp output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lctx import kernels
from lctx.kernels.registry import IMPLS

AXES = ("data", "fsdp", "sequence", "tensor")


def make_mesh(shape, axis_type=AxisType.Auto):
    return jax.make_mesh(shape, AXES, axis_types=(axis_type,) * 4)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    seq: int = 128
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 16
    causal: bool = True
    packed: bool = False
    window: int | None = None
    mesh: tuple = (1, 1, 8, 1)
    axis_type: AxisType = AxisType.Auto
    dtype: str = "float32"
    block: int = 8


CASES = [
    Case("causal-gqa2-packed-8way", packed=True),
    Case("bidirectional-mha-2x4", kv_heads=8, causal=False, mesh=(2, 1, 4, 1), axis_type=AxisType.Explicit),
    Case("causal-gqa4-window", kv_heads=2, heads=8, window=19, batch=1),
    Case("causal-mqa-packed-window-2x4", kv_heads=1, packed=True, window=40, mesh=(2, 1, 4, 1)),
    Case("bidirectional-packed-explicit", causal=False, packed=True, kv_heads=4, axis_type=AxisType.Explicit),
    Case("causal-odd-heads-3-mqa", heads=3, kv_heads=1),
    Case("causal-odd-heads-5", heads=5, kv_heads=5, batch=1, block=16),
    Case("causal-bf16", dtype="bfloat16", packed=True),
]
# Ulysses splits heads over the sequence axis: odd head counts are rejected by design
# (see the error table) rather than run.
MATRIX = [(impl, case) for impl in ("blockwise", "ring", "ulysses") for case in CASES
          if not (impl == "ulysses" and case.heads % case.mesh[2])]


def packed_segments(batch: int, seq: int, rng) -> np.ndarray:
    """Several documents per row, one of them long enough to cross device boundaries."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=4, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seq), side="right"))
    return np.asarray(rows, np.int32)


def make_inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape_q = (case.batch, case.seq, case.heads, case.head_dim)
    shape_kv = (case.batch, case.seq, case.kv_heads, case.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(s), case.dtype) for s in (shape_q, shape_kv, shape_kv))
    seg = jnp.asarray(packed_segments(case.batch, case.seq, rng)) if case.packed else None
    return q, k, v, seg


def mesh_context(mesh):
    """Explicit meshes type their arrays: run under the mesh, as a jitted model would."""
    if mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.set_mesh(mesh)
    return contextlib.nullcontext()


def loss_of(fn, weight_o, weight_lse):
    """A scalar that depends on every output element and on lse, for gradients."""
    def loss(q, k, v):
        o, lse = fn(q, k, v)
        return (o.astype(jnp.float32) * weight_o).sum() + (lse * weight_lse).sum()
    return loss


def run_case(impl: str, case: Case, **extra):
    q, k, v, seg = make_inputs(case)
    mesh = make_mesh(case.mesh, case.axis_type) if impl in ("ring", "ulysses") else None
    common = dict(causal=case.causal, segment_ids=seg, sliding_window=case.window, return_lse=True)
    blocks = {} if impl == "reference" else dict(block_q=case.block, block_k=case.block)
    under_test = lambda q, k, v: kernels.attention(q, k, v, impl=impl, mesh=mesh, **common, **blocks, **extra)
    oracle = lambda q, k, v: kernels.reference_attention(q, k, v, **common)
    rng = np.random.default_rng(1)
    w_o = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    with mesh_context(mesh):
        got = jax.jit(under_test)(q, k, v)
        got_grads = jax.jit(jax.grad(loss_of(under_test, w_o, w_lse), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(oracle)(q, k, v)
    want_grads = jax.jit(jax.grad(loss_of(oracle, w_o, w_lse), argnums=(0, 1, 2)))(q, k, v)
    return got, want, got_grads, want_grads


def max_abs(a, b):
    # On the host: arrays typed on different meshes cannot meet in one jnp op.
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def rel_err(a, b):
    return max_abs(a, b) / float(jnp.max(jnp.abs(jnp.asarray(b, jnp.float32))))


@pytest.mark.parametrize("impl,case", MATRIX, ids=[f"{i}-{c.name}" for i, c in MATRIX])
def test_matches_reference(impl, case):
    (o, lse), (o_ref, lse_ref), grads, grads_ref = run_case(impl, case)
    assert o.dtype == jnp.dtype(case.dtype) and o.shape == o_ref.shape
    assert lse.dtype == jnp.float32 and lse.shape == (case.batch, case.seq, case.heads)
    if case.dtype == "float32":
        assert max_abs(o, o_ref) < 1e-5
        assert max_abs(lse, lse_ref) < 1e-5
        for g, g_ref in zip(grads, grads_ref):
            assert max_abs(g, g_ref) < 1e-4
    else:
        assert rel_err(o, o_ref) < 2e-2
        assert rel_err(lse, lse_ref) < 2e-2
        for g, g_ref in zip(grads, grads_ref):
            assert g.dtype == jnp.dtype(case.dtype)
            assert rel_err(g, g_ref) < 2e-2


@pytest.mark.parametrize("placement", ["striped", "contiguous"])
def test_ring_other_placements(placement):
    case = Case("placement", packed=True, window=33)
    (o, lse), (o_ref, lse_ref), grads, grads_ref = run_case("ring", case, placement=placement)
    assert max_abs(o, o_ref) < 1e-5 and max_abs(lse, lse_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert max_abs(g, g_ref) < 1e-4


def test_balanced_layout_is_callers_order():
    """layout="balanced": inputs already permuted, output stays in that order."""
    case = Case("balanced", packed=True)
    q, k, v, seg = make_inputs(case)
    mesh = make_mesh(case.mesh)
    shards = case.mesh[2]
    pos = jnp.broadcast_to(jnp.arange(case.seq, dtype=jnp.int32), (case.batch, case.seq))
    perm = kernels.balanced_permutation(case.seq, shards, "zigzag")
    to_bal = lambda x: kernels.to_balanced(x, shards, "zigzag")
    np.testing.assert_array_equal(to_bal(pos), np.asarray(pos)[:, perm])
    out = kernels.attention(to_bal(q), to_bal(k), to_bal(v), impl="ring", causal=True, mesh=mesh,
                            segment_ids=to_bal(seg), positions=to_bal(pos), layout="balanced",
                            block_q=8, block_k=8)
    ref = kernels.reference_attention(q, k, v, causal=True, segment_ids=seg)
    assert max_abs(out, to_bal(ref)) < 1e-5
    assert max_abs(kernels.to_natural(out, shards, "zigzag"), ref) < 1e-5
    np.testing.assert_array_equal(kernels.inverse_permutation(perm)[perm], np.arange(case.seq))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_accepts_inputs_sharded_any_way(axis_type):
    """Inputs committed to an unrelated sharding are resharded, not rejected."""
    case = Case("sharded-inputs", kv_heads=4)
    q, k, v, _ = make_inputs(case)
    mesh = make_mesh((2, 1, 4, 1), axis_type)
    odd = NamedSharding(mesh, P(None, None, "sequence", "data"))  # heads x head_dim split
    qs, ks, vs = (jax.device_put(x, odd) for x in (q, k, v))
    ref = kernels.reference_attention(q, k, v, causal=True)
    with mesh_context(mesh):
        for impl in ("ring", "ulysses", "blockwise"):
            out = kernels.attention(qs, ks, vs, impl=impl, causal=True, mesh=mesh, block_q=16, block_k=16)
            assert max_abs(out, ref) < 1e-5, impl


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("placed", [False, True], ids=["unsharded", "on-mesh"])
def test_ring_forward_and_grad_eager_and_jitted(axis_type, jitted, placed):
    """Ring attention on `jax.make_mesh((8,), ("sequence",))`, forward and gradients
    equal the reference with or without `jax.jit`. Inputs typed on an Explicit mesh
    need `jax.set_mesh` for an eager grad (JAX cannot seed a mesh-typed loss without
    it); unsharded inputs need nothing."""
    case = Case("eager", batch=1, seq=64, heads=4, kv_heads=2)
    q, k, v, _ = make_inputs(case)
    mesh = jax.make_mesh((8,), ("sequence",), axis_types=(axis_type,))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    ring = lambda q, k, v: kernels.attention(q, k, v, impl="ring", causal=True, mesh=mesh,
                                             block_q=8, block_k=8)
    dense = functools.partial(kernels.reference_attention, causal=True)
    grad = lambda fn: jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))
    wrap = jax.jit if jitted else (lambda fn: fn)
    inputs = (q, k, v)
    if placed:
        inputs = tuple(jax.device_put(x, NamedSharding(mesh, P(None, "sequence"))) for x in inputs)
    context = mesh_context(mesh) if placed else contextlib.nullcontext()
    with context:
        out, grads = wrap(ring)(*inputs), wrap(grad(ring))(*inputs)
    assert max_abs(out, dense(q, k, v)) < 1e-5
    for g, g_ref in zip(grads, grad(dense)(q, k, v)):
        assert max_abs(g, g_ref) < 1e-4


def test_shard_shapes_inside_shard_map(monkeypatch):
    """On a 2 (data) x 4 (sequence) mesh each device holds half the batch and a quarter
    of the sequence, so data-parallel replicas never compute the whole batch."""
    seen = {}

    def spy(name):
        entry = IMPLS[name]

        def build(plan):
            local = entry.build(plan)

            def wrapped(q, k, v, pos, seg):
                seen[name] = (q.shape, k.shape, pos.shape)
                return local(q, k, v, pos, seg)
            return wrapped
        return dataclasses.replace(entry, build=build)

    for name in ("ring", "ulysses", "blockwise"):  # each impl's per-device function, spied on
        monkeypatch.setitem(IMPLS, name, spy(name))
    jax.clear_caches()
    batch, seq, heads, kv_heads, dim = 4, 64, 8, 4, 8
    q = jnp.ones((batch, seq, heads, dim))
    k = v = jnp.ones((batch, seq, kv_heads, dim))
    mesh = make_mesh((2, 1, 4, 1))
    for impl in ("ring", "ulysses", "blockwise"):
        kernels.attention(q, k, v, impl=impl, causal=True, mesh=mesh, block_q=16, block_k=16)
    assert seen["ring"] == ((2, 16, 8, 8), (2, 16, 4, 8), (2, 16))
    assert seen["ulysses"] == ((2, 16, 8, 8), (2, 16, 4, 8), (2, 16))  # before its all-to-all
    assert seen["blockwise"] == ((2, 64, 8, 8), (2, 64, 4, 8), (2, 64))
    # With a tensor axis, heads are split too.
    seen.clear()
    jax.clear_caches()
    kernels.attention(q, k, v, impl="ring", causal=True, mesh=make_mesh((2, 1, 2, 2)), block_q=16, block_k=16)
    assert seen["ring"] == ((2, 32, 4, 8), (2, 32, 2, 8), (2, 32))


# ----------------------------------------------------------------------------- the seam


def test_block_seam_merges_and_uses_global_lse():
    """Splitting the keys into blocks: forward partials merge by lse to the full
    attention, and per-block backward with the global lse sums to the full gradient."""
    rng = np.random.default_rng(3)
    b, s, h, hkv, d = 2, 64, 4, 2, 16
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(packed_segments(b, s, rng))
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    opts = dict(causal=True, sliding_window=24)
    halves = [slice(0, s // 2), slice(s // 2, s)]

    block_fwd = jax.jit(functools.partial(kernels.block_fwd, block_q=16, block_k=8, **opts))
    block_bwd = jax.jit(functools.partial(kernels.block_bwd, block_q=16, block_k=8, **opts))
    parts = [block_fwd(q, k[:, sl], v[:, sl], pos, pos[:, sl], seg, seg[:, sl])
             for sl in halves]
    o, lse = kernels.merge_partials(*parts[0], *parts[1])
    o_ref, lse_ref = kernels.reference_attention(q, k, v, segment_ids=seg, return_lse=True, **opts)
    assert max_abs(o, o_ref) < 1e-5 and max_abs(lse, lse_ref) < 1e-5

    do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = [block_bwd(q, k[:, sl], v[:, sl], pos, pos[:, sl], seg, seg[:, sl], o_ref, lse_ref, do)
             for sl in halves]
    dq = grads[0][0] + grads[1][0]
    dk = jnp.concatenate([grads[0][1], grads[1][1]], axis=1)
    dv = jnp.concatenate([grads[0][2], grads[1][2]], axis=1)
    _, vjp = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, segment_ids=seg, **opts), q, k, v)
    for got, want in zip((dq, dk, dv), vjp(do)):
        assert max_abs(got, want) < 1e-4


def test_fully_masked_rows_are_zero_not_nan():
    """Queries that see no key (keys all in their future) get lse -inf and output 0."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 16, 1, 8)), jnp.float32) for _ in range(2))
    q_pos = jnp.arange(16, dtype=jnp.int32)[None]
    k_pos = q_pos + 8  # the first 8 queries precede every key
    o, lse = kernels.block_fwd(q, k, v, q_pos, k_pos, causal=True, block_q=8, block_k=8)
    assert np.all(np.isneginf(lse[:, :8])) and np.all(np.asarray(o[:, :8]) == 0)
    assert np.all(np.isfinite(lse[:, 8:]))
    do = jnp.ones_like(q)
    grads = kernels.block_bwd(q, k, v, q_pos, k_pos, None, None, o, lse, do, causal=True, block_q=8, block_k=8)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0][:, :8]) == 0)
    # The same through the reference, padding tokens in their own segment included.
    o_ref, lse_ref = kernels.reference_attention(q, k, v, positions=q_pos, kv_positions=k_pos,
                                                 causal=True, return_lse=True)
    assert max_abs(o, o_ref) < 1e-5
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))


def test_sliding_window_semantics():
    """Window w: a query sees itself and the w - 1 keys before it (Mistral / HF)."""
    s, w = 12, 3
    v = jnp.eye(s, dtype=jnp.float32)[None, :, None, :]  # value = one-hot of its position
    q = k = jnp.zeros((1, s, 1, s), jnp.float32)  # equal logits: uniform over visible keys
    out = kernels.attention(q, k, v, impl="blockwise", causal=True, sliding_window=w, block_q=4, block_k=4)
    want = np.zeros((s, s))
    for i in range(s):
        lo = max(0, i - w + 1)
        want[i, lo:i + 1] = 1.0 / (i + 1 - lo)
    np.testing.assert_allclose(out[0, :, 0], want, atol=1e-6)


def test_blockwise_feedforward_matches_plain():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 64, 16)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((16, 48)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((48, 16)), jnp.float32)
    ffn = lambda h, w1, w2: jax.nn.silu(h @ w1) @ w2
    plain = lambda x, w1, w2: ffn(x, w1, w2).sum()
    chunked = lambda x, w1, w2: kernels.blockwise_feedforward(lambda h: ffn(h, w1, w2), x, 16).sum()
    np.testing.assert_allclose(chunked(x, w1, w2), plain(x, w1, w2), rtol=1e-5)
    for g, g_ref in zip(jax.grad(chunked, argnums=(0, 1, 2))(x, w1, w2), jax.grad(plain, argnums=(0, 1, 2))(x, w1, w2)):
        assert max_abs(g, g_ref) < 1e-3 * float(jnp.max(jnp.abs(g_ref)))
    with pytest.raises(ValueError, match="chunk_size=24"):
        kernels.blockwise_feedforward(lambda h: h, x, 24)


def test_a_registered_impl_is_taken_by_the_kernels_and_the_model(monkeypatch):
    """One `register` call is all a new implementation needs: `attention` runs it and
    ModelConfig accepts it (here a renamed copy of the reference, checked against a
    float64 NumPy causal attention)."""
    monkeypatch.setitem(IMPLS, "dense_copy", dataclasses.replace(IMPLS["reference"], name="dense_copy"))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 16, 2, 8)).astype(np.float32) for _ in range(3))
    out = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="dense_copy",
                            causal=True)
    logits = np.einsum("qhd,khd->hqk", q[0].astype(np.float64), k[0].astype(np.float64)) / np.sqrt(8)
    logits = np.where(np.tril(np.ones((16, 16), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("hqk,khd->qhd", weights / weights.sum(-1, keepdims=True), v[0])
    np.testing.assert_allclose(np.asarray(out[0]), expected, atol=1e-5)
    from lctx import model
    config = model.preset("tiny", attention_impl="dense_copy")
    assert not config.sequence_parallel
    with pytest.raises(ValueError, match=r"block_q=8 is not allowed; impl 'dense_copy' accepts no options"):
        kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="dense_copy", block_q=8)
