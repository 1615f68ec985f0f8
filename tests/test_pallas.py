"""Pallas flash-attention kernels against the dense reference, on CPU.

The kernels run in Pallas interpret mode (the TPU kernel on one device under
`pltpu.force_tpu_interpret_mode()`, inside `shard_map` under the HLO interpreter: see
`lctx.compat.tpu_interpret_context`), which accepts block shapes the real compilers
reject; so each kernel is also lowered for its real target with `jax.export`
(Mosaic for TPU, Triton for GPU) at every TPU generation's default tiles.
Interpret mode is slow: sizes are small (seq 256, tiles 128).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from lctx import kernels
from lctx.kernels import pallas as kp
from lctx.kernels import pallas_common as pc
from lctx.kernels import pallas_tpu
from lctx.kernels.blockwise import MaskSpec
from test_kernels import packed_segments  # the XLA kernels' packed documents

AXES = ("data", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 1
    seq: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = True
    packed: bool = False
    window: int | None = None
    balanced: bool = False  # positions permuted by to_balanced (8 shards, zigzag)
    dtype: str = "float32"
    block_q: int = 128
    block_k: int = 128


CASES = [
    Case("causal-gqa2-packed", packed=True, batch=2),
    Case("bidirectional-mqa-packed", kv_heads=1, causal=False, packed=True),
    Case("causal-window-balanced", window=70, balanced=True),
    Case("causal-bf16-gqa4", heads=8, dtype="bfloat16"),
]
SLOW_CASES = [
    Case("bidirectional-mha", kv_heads=4, causal=False, batch=2),
    Case("causal-mqa-packed-balanced-bf16", kv_heads=1, packed=True, balanced=True,
         dtype="bfloat16"),
]


def make_inputs(case: Case, seed: int = 0):
    """q, k, v, positions, segment ids (permuted to the balanced layout if asked)."""
    rng = np.random.default_rng(seed)
    shape_q = (case.batch, case.seq, case.heads, case.head_dim)
    shape_kv = (case.batch, case.seq, case.kv_heads, case.head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(s), case.dtype) for s in (shape_q, shape_kv, shape_kv))
    pos = jnp.broadcast_to(jnp.arange(case.seq, dtype=jnp.int32), (case.batch, case.seq))
    seg = jnp.asarray(packed_segments(case.batch, case.seq, rng)) if case.packed else None
    if case.balanced:
        q, k, v, pos = (kernels.to_balanced(x, 8, "zigzag") for x in (q, k, v, pos))
        seg = None if seg is None else kernels.to_balanced(seg, 8, "zigzag")
    return q, k, v, pos, seg


def loss_of(fn, w_o, w_lse):
    """A scalar that depends on every output element and on lse (and the outputs as
    aux), so one jitted call gives forward and gradients."""
    def loss(q, k, v):
        o, lse = fn(q, k, v)
        return (o.astype(jnp.float32) * w_o).sum() + (lse * w_lse).sum(), (o, lse)
    return loss


def max_abs(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def rel_err(a, b):
    return max_abs(a, b) / float(jnp.max(jnp.abs(jnp.asarray(b, jnp.float32))))


def check_against_reference(case: Case, under_test, pos, seg, inputs):
    """Forward (out, lse) and gradients of q, k, v equal the dense reference's."""
    q, k, v = inputs
    common = dict(causal=case.causal, segment_ids=seg, sliding_window=case.window,
                  positions=pos, return_lse=True)
    oracle = lambda q, k, v: kernels.reference_attention(q, k, v, **common)
    rng = np.random.default_rng(1)
    w_o = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)
    grad = lambda fn: jax.jit(jax.grad(loss_of(fn, w_o, w_lse), argnums=(0, 1, 2), has_aux=True))
    grads, (o, lse) = grad(under_test)(q, k, v)
    grads_ref, (o_ref, lse_ref) = grad(oracle)(q, k, v)
    assert o.dtype == q.dtype and o.shape == o_ref.shape and lse.dtype == jnp.float32
    if case.dtype == "float32":
        # Interpret mode runs the kernel's own f32 arithmetic on the CPU, so the
        # bounds are those of the XLA kernels.
        assert max_abs(o, o_ref) < 1e-5 and max_abs(lse, lse_ref) < 1e-5
        for g, g_ref in zip(grads, grads_ref):
            assert max_abs(g, g_ref) < 1e-4
    else:
        assert rel_err(o, o_ref) < 2e-2 and rel_err(lse, lse_ref) < 2e-2
        for g, g_ref in zip(grads, grads_ref):
            assert g.dtype == q.dtype and rel_err(g, g_ref) < 2e-2


def run_pallas(case: Case, kernel: str):
    q, k, v, pos, seg = make_inputs(case)
    under_test = lambda q, k, v: kernels.attention(
        q, k, v, impl="pallas", kernel=kernel, interpret=True, causal=case.causal,
        segment_ids=seg, positions=pos, sliding_window=case.window, return_lse=True,
        block_q=case.block_q, block_k=case.block_k)
    check_against_reference(case, under_test, pos, seg, (q, k, v))


# ----------------------------------------------------------------------------- TPU kernel


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tpu_kernel_matches_reference(case):
    run_pallas(case, "tpu")


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.name)
def test_tpu_kernel_matches_reference_more(case):
    run_pallas(case, "tpu")


def test_ring_with_pallas_inner_matches_reference():
    """Ring over 8 virtual devices, each step's local work done by the TPU kernel."""
    case = Case("ring", batch=1, seq=64, heads=2, kv_heads=1, head_dim=32, packed=True,
                block_q=8, block_k=8)
    q, k, v, pos, seg = make_inputs(case)
    mesh = jax.make_mesh((1, 1, 8, 1), AXES, axis_types=(AxisType.Auto,) * 4)
    under_test = lambda q, k, v: kernels.attention(
        q, k, v, impl="ring", ring_inner="pallas", kernel="tpu", interpret=True, mesh=mesh,
        causal=True, segment_ids=seg, return_lse=True, block_q=8, block_k=8)
    check_against_reference(case, under_test, pos, seg, (q, k, v))


@pytest.fixture
def hang_guard():
    """Ends the test process with every thread's stack if the test deadlocks (the ring
    + TPU-interpret hang sat at 0% CPU forever); a passing test takes well under it."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def ring_pallas_inputs(seq: int):
    """The issue's shapes: q `[1, seq, 4, 128]`, k/v with 2 heads, float32."""
    rng = np.random.default_rng(seq)
    shapes = ((1, seq, 4, 128), (1, seq, 2, 128), (1, seq, 2, 128))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def ring_pallas(q, k, v):
    """Causal ring attention over an 8-device sequence mesh, TPU kernel in interpret mode."""
    mesh = jax.make_mesh((8,), ("sequence",), axis_types=(AxisType.Auto,))
    return kernels.attention(q, k, v, impl="ring", ring_inner="pallas", kernel="tpu",
                             interpret=True, causal=True, mesh=mesh, seq_axis="sequence")


# 512 tokens put 128 KiB q blocks through each device's kernel: the size at which TPU
# interpret mode inside shard_map deadlocked (see `lctx.compat.tpu_interpret_context`).
@pytest.mark.parametrize("seq", [512, 2048])
def test_ring_with_pallas_inner_long_forward(seq, hang_guard):
    q, k, v = ring_pallas_inputs(seq)
    out = jax.jit(ring_pallas)(q, k, v)
    assert max_abs(out, kernels.reference_attention(q, k, v, causal=True)) < 1e-5


@pytest.mark.parametrize("seq", [512, 2048])
def test_ring_with_pallas_inner_long_gradients(seq, hang_guard):
    q, k, v = ring_pallas_inputs(seq)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads = lambda fn: jax.jit(jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2)))
    reference = functools.partial(kernels.reference_attention, causal=True)
    for g, g_ref in zip(grads(ring_pallas)(q, k, v), grads(reference)(q, k, v)):
        assert max_abs(g, g_ref) < 1e-4


def test_fully_masked_rows_are_zero_and_gradients_finite():
    """Queries that see no key: lse -inf, output 0, zero and finite gradients."""
    rng = np.random.default_rng(4)
    qh = jnp.asarray(rng.standard_normal((1, 1, 2, 256, 64)), jnp.float32)
    kh, vh = (jnp.asarray(rng.standard_normal((1, 1, 128, 64)), jnp.float32) for _ in range(2))
    q_pos = jnp.arange(256, dtype=jnp.int32)[None]
    k_pos = q_pos[:, :128] + 128  # the first 128 queries precede every key
    seam = kp.PallasSeam("tpu", interpret=True)
    opts = dict(mask=MaskSpec(causal=True), scale=0.125, block_q=128, block_k=128)
    fwd = jax.jit(lambda *a: seam.fwd_hm(*a, None, None, **opts))
    bwd = jax.jit(lambda q, k, v, qp, kp_, *a: seam.bwd_hm(q, k, v, qp, kp_, None, None, *a, **opts))
    o, lse, tiles = fwd(qh, kh, vh, q_pos, k_pos)
    assert int(tiles) == 1  # the first query tile sees no key: skipped
    assert np.all(np.isneginf(lse[..., :128])) and np.all(np.asarray(o[..., :128, :]) == 0)
    assert np.all(np.isfinite(lse[..., 128:]))
    do = jnp.ones_like(qh)
    delta = jnp.einsum("bhgqd,bhgqd->bhgq", o, do)
    dq, dk, dv = bwd(qh, kh, vh, q_pos, k_pos, do, lse, delta)
    assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
    assert np.all(np.asarray(dq[..., :128, :]) == 0)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_block_seam_merges_and_uses_global_lse(kernel):
    """The kernels as the block seam: partials over two key halves merge by lse to the
    full attention, and per-half backward with the *global* lse sums to the gradient."""
    rng = np.random.default_rng(3)
    b, s, h, hkv, d = 1, 256, 4, 2, 32
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(packed_segments(b, s, rng))
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    opts = dict(causal=True, sliding_window=150, block_q=128, block_k=128)
    seam = kp.PallasSeam(kernel, interpret=True)
    fwd, bwd = jax.jit(functools.partial(seam.block_fwd, **opts)), jax.jit(functools.partial(seam.block_bwd, **opts))
    halves = [slice(0, s // 2), slice(s // 2, s)]
    parts = [fwd(q, k[:, sl], v[:, sl], pos, pos[:, sl], seg, seg[:, sl]) for sl in halves]
    o, lse = kernels.merge_partials(*parts[0], *parts[1])
    ref_opts = dict(causal=True, sliding_window=150, segment_ids=seg)
    o_ref, lse_ref = kernels.reference_attention(q, k, v, return_lse=True, **ref_opts)
    assert max_abs(o, o_ref) < 1e-5 and max_abs(lse, lse_ref) < 1e-5
    do = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = [bwd(q, k[:, sl], v[:, sl], pos, pos[:, sl], seg, seg[:, sl], o_ref, lse_ref, do)
             for sl in halves]
    _, vjp = jax.vjp(lambda q, k, v: kernels.reference_attention(q, k, v, **ref_opts), q, k, v)
    want = vjp(do)
    assert max_abs(grads[0][0] + grads[1][0], want[0]) < 1e-4
    for i in (1, 2):
        assert max_abs(jnp.concatenate([grads[0][i], grads[1][i]], axis=1), want[i]) < 1e-4


def test_schedule_never_loads_hidden_tiles():
    """Causal, 4 x 4 tiles: query tile i visits key tiles 0..i, and the padding repeats
    the last visible index (the pipeline then skips the copy); dK/dV the transpose."""
    pos = jnp.arange(512, dtype=jnp.int32)[None]
    by_q, by_k, tiles = pc.schedules(pos, pos, None, None, MaskSpec(causal=True), 128, 128)
    assert int(tiles) == 10
    np.testing.assert_array_equal(by_q.count[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(by_q.index[0, 1], [0, 1, 1, 1])
    np.testing.assert_array_equal(by_q.kind[0, 1], [pc.FULL, pc.MASKED, pc.SKIP, pc.SKIP])
    np.testing.assert_array_equal(by_k.index[0, 1], [1, 2, 3, 3])
    np.testing.assert_array_equal(by_k.kind[0, 1], [pc.MASKED, pc.FULL, pc.FULL, pc.SKIP])


def test_cpu_without_interpret_is_a_clear_error():
    q = jnp.zeros((1, 128, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"interpret=False is not allowed .* on the 'cpu' backend"):
        kernels.attention(q, q, q, impl="pallas")
    mesh = jax.make_mesh((1, 1, 8, 1), AXES, axis_types=(AxisType.Auto,) * 4)
    with pytest.raises(ValueError, match=r"ring_inner='pallas'\) on the 'cpu' backend"):
        kernels.attention(q, q, q, impl="ring", ring_inner="pallas", mesh=mesh)
    with pytest.raises(ValueError, match="kernel='mosaic' is not allowed"):
        kernels.attention(q, q, q, impl="pallas", kernel="mosaic", interpret=True)
    with pytest.raises(ValueError, match="ring_inner='triton' is not allowed"):
        kernels.attention(q, q, q, impl="ring", ring_inner="triton", mesh=mesh)
    with pytest.raises(ValueError, match="block_k=64 is not allowed"):
        kernels.attention(q, q, q, impl="pallas", interpret=True, block_k=64)
    with pytest.raises(ValueError, match="pallas_gpu: block_q=8 is not allowed"):
        kernels.attention(q, q, q, impl="pallas", kernel="gpu", interpret=True, block_q=8)


# ----------------------------------------------------------------------------- GPU kernel


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_kernel_matches_reference(case):
    run_pallas(case, "gpu")


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.name)
def test_gpu_kernel_matches_reference_more(case):
    run_pallas(case, "gpu")


@pytest.mark.slow
def test_ring_with_gpu_kernel_inner_matches_reference():
    case = Case("ring-gpu", batch=1, seq=256, heads=4, kv_heads=2, head_dim=32, causal=True,
                packed=True, block_q=16, block_k=16)
    q, k, v, pos, seg = make_inputs(case)
    mesh = jax.make_mesh((1, 1, 8, 1), AXES, axis_types=(AxisType.Auto,) * 4)
    under_test = lambda q, k, v: kernels.attention(
        q, k, v, impl="ring", ring_inner="pallas", kernel="gpu", interpret=True, mesh=mesh,
        causal=True, segment_ids=seg, return_lse=True, block_q=16, block_k=16)
    check_against_reference(case, under_test, pos, seg, (q, k, v))


# ----------------------------------------------------------------------------- lowering


def _custom_calls(exported) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))


def _lower_tpu(generation, *, b, hkv, g, s, d, causal, packed, window=None):
    """Exports forward and backward of the TPU kernel for the TPU platform (Mosaic)."""
    mask = MaskSpec(causal, window)
    qh = jax.ShapeDtypeStruct((b, hkv, g, s, d), jnp.bfloat16)
    kh = jax.ShapeDtypeStruct((b, hkv, s, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
    stat = jax.ShapeDtypeStruct((b, hkv, g, s), jnp.float32)
    seg = ids if packed else None

    def fwd(qh, kh, vh, pos, seg):
        return pallas_tpu.fwd_hm(qh, kh, vh, pos, pos, seg, seg, mask=mask, scale=0.1,
                                 generation=generation)

    def bwd(qh, kh, vh, pos, seg, do, lse, delta):
        return pallas_tpu.bwd_hm(qh, kh, vh, pos, pos, seg, seg, do, lse, delta, mask=mask,
                                 scale=0.1, generation=generation)

    out = []
    for fn, args in ((fwd, (qh, kh, kh, ids, seg)), (bwd, (qh, kh, kh, ids, seg, qh, stat, stat))):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
        out.append(_custom_calls(exported))
    return out


@pytest.mark.parametrize("generation", pallas_tpu.GENERATIONS)
def test_tpu_kernel_lowers_for_every_generation(generation):
    """Default tiles of each generation, causal GQA with segment ids, bf16, d = 128."""
    bq, bk = pallas_tpu.GENERATION_BLOCKS[generation]
    fwd_calls, bwd_calls = _lower_tpu(generation, b=2, hkv=2, g=4, s=2 * max(bq, bk), d=128,
                                      causal=True, packed=True)
    assert fwd_calls == {"tpu_custom_call"} and bwd_calls == {"tpu_custom_call"}


@pytest.mark.parametrize("variant", [
    dict(g=1, causal=False, packed=False),           # MHA, bidirectional
    dict(g=8, causal=True, packed=False, window=300),  # GQA 8, sliding window
    dict(g=2, causal=False, packed=True, d=64),        # segment ids only, d < 128
])
def test_tpu_kernel_lowers_variants(variant):
    variant = {"d": 128, **variant}
    fwd_calls, bwd_calls = _lower_tpu("v5e", b=1, hkv=2, s=1024, **variant)
    assert fwd_calls == {"tpu_custom_call"} and bwd_calls == {"tpu_custom_call"}


def test_generation_detection_and_blocks():
    assert pallas_tpu.generation_of("TPU v4") == "v4"
    assert pallas_tpu.generation_of("TPU v5 lite") == "v5e"
    assert pallas_tpu.generation_of("TPU v5p") == "v5p"
    assert pallas_tpu.generation_of("TPU v6 lite") == "v6e"
    assert pallas_tpu.generation_of("cpu") is None
    assert pallas_tpu.resolve_blocks(None, None, 4096, 4096, "v6e") == (1024, 1024)
    assert pallas_tpu.resolve_blocks(256, None, 4096, 4096, "v4") == (256, 512)
    assert pallas_tpu.resolve_blocks(None, None, 64, 64, "v5p") == (64, 64)
    # GQA groups of 8 at d = 128 in bf16 overflow v4's 12 MiB at 512 and 256 query rows.
    vmem = lambda bq: max(pallas_tpu.vmem_bytes(8, bq, 512, 128, 2).values())
    assert vmem(256) > pallas_tpu.VMEM_LIMIT["v4"] >= vmem(128)
    assert pallas_tpu.resolve_blocks(None, None, 4096, 4096, "v4", 8, 128, 2) == (128, 512)
    assert pallas_tpu.resolve_blocks(None, None, 4096, 4096, "v5e", 8, 128, 2) == (512, 1024)
    assert pallas_tpu.resolve_blocks(512, None, 4096, 4096, "v4", 8, 128, 2) == (512, 512)
    with pytest.raises(ValueError, match="generation='v3' is not allowed"):
        pallas_tpu.resolve_blocks(None, None, 512, 512, "v3")


# Triton kernels travel as an XLA custom call without a serialisation guarantee;
# lowering (Pallas -> Triton IR) is what is checked, so the check is waived.
_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


@pytest.mark.parametrize("variant", [
    dict(b=2, hkv=2, g=4, s=1024, d=128, causal=True, packed=True),     # GQA, segments
    dict(b=1, hkv=3, g=1, s=384, d=64, causal=False, packed=False),     # MHA, odd sizes
    dict(b=1, hkv=1, g=8, s=512, d=128, causal=True, packed=False, window=100),  # MQA
])
def test_gpu_kernel_lowers_to_triton(variant):
    """The GPU kernel lowers for CUDA (Pallas -> Triton IR) at its default tiles. The
    Triton compiler itself (IR -> PTX) runs only inside XLA on a GPU, not here."""
    from lctx.kernels import pallas_gpu
    v = dict(variant)
    b, hkv, g, s, d = (v.pop(n) for n in ("b", "hkv", "g", "s", "d"))
    mask = MaskSpec(v["causal"], v.get("window"))
    qh = jax.ShapeDtypeStruct((b, hkv, g, s, d), jnp.bfloat16)
    kh = jax.ShapeDtypeStruct((b, hkv, s, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
    stat = jax.ShapeDtypeStruct((b, hkv, g, s), jnp.float32)
    seg = ids if v["packed"] else None
    fwd = lambda qh, kh, vh, pos, seg: pallas_gpu.fwd_hm(
        qh, kh, vh, pos, pos, seg, seg, mask=mask, scale=0.1)
    bwd = lambda qh, kh, vh, pos, seg, do, lse, delta: pallas_gpu.bwd_hm(
        qh, kh, vh, pos, pos, seg, seg, do, lse, delta, mask=mask, scale=0.1)
    for fn, args in ((fwd, (qh, kh, kh, ids, seg)), (bwd, (qh, kh, kh, ids, seg, qh, stat, stat))):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_TRITON)(*args)
        calls = _custom_calls(exported)
        assert calls == {"__gpu$xla.gpu.triton"}, calls


# ----------------------------------------------------------------------------- configs


def test_model_config_accepts_and_checks_pallas_options():
    from lctx import model

    ok = model.preset("tiny", attention_impl="ring",
                      attention_options={"ring_inner": "pallas", "kernel": "tpu", "interpret": True})
    assert ok.attention_options["ring_inner"] == "pallas"
    model.preset("tiny", attention_impl="pallas", attention_options={"kernel": None, "block_q": 128})
    for options, message in [
        ({"ring_inner": "flash"}, r"attention_options.ring_inner='flash': must be one of xla, pallas"),
        ({"kernel": "cuda"}, r"attention_options.kernel='cuda': must be None .* tpu, gpu"),
        ({"interpret": "yes"}, r"attention_options.interpret='yes': must be a bool"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.preset("tiny", attention_impl="ring", attention_options=options)
    with pytest.raises(ValueError, match=r"attention_options.ring_inner='pallas': impl 'blockwise'"):
        model.preset("tiny", attention_impl="blockwise", attention_options={"ring_inner": "pallas"})


def test_training_config_reports_pallas_on_cpu_without_interpret():
    import importlib.util
    from pathlib import Path

    from lctx.training import config as cfg

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = module.get_config()
    recipe.model.attention_impl = "pallas"
    found = cfg.problems(recipe, 8)
    assert any(re.search(r"model: attention: interpret=False is not allowed for Pallas kernels "
                         r".* on the 'cpu' backend", line) for line in found), found
    recipe.model.attention_options.interpret = True
    assert not any("interpret" in line for line in cfg.problems(recipe, 8))


def test_bench_peaks_per_device():
    """Share of peak is taken against the device's dense bf16 rate (megacore v4/v5p: both
    TensorCores), from JAX's own TPU table."""
    from types import SimpleNamespace

    from lctx.bench.pallas import device_peak

    tpu = lambda kind: SimpleNamespace(platform="tpu", device_kind=kind)
    assert device_peak(tpu("TPU v4")) == ("TPU v4", 275e12)
    assert device_peak(tpu("TPU v5 lite")) == ("TPU v5e", 197e12)
    assert device_peak(tpu("TPU v5p")) == ("TPU v5p", 459e12)
    assert device_peak(tpu("TPU v6 lite")) == ("TPU v6e", 920e12)
    assert device_peak(SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")) == ("H100", 989e12)


@pytest.mark.slow
def test_model_with_pallas_attention_matches_blockwise():
    """The tiny model's loss and gradients with attention_impl="pallas" (interpret)."""
    from lctx import model

    pallas = model.preset("tiny", attention_impl="pallas",
                          attention_options={"interpret": True, "block_q": 128, "block_k": 128})
    blockwise = pallas.replace(attention_impl="blockwise",
                               attention_options={"block_q": 128, "block_k": 128})
    params = model.init(blockwise, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 256)), jnp.int32)
    run = lambda cfg: jax.jit(jax.value_and_grad(
        lambda p: model.loss(cfg, p, tokens, tokens)[0]))(params)
    (loss_p, grads_p), (loss_b, grads_b) = run(pallas), run(blockwise)
    assert abs(float(loss_p) - float(loss_b)) < 1e-5
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_b)):
        assert max_abs(a, b) < 1e-5
