"""Flash attention for TPU in Pallas (Mosaic): forward, dK/dV and dQ kernels.

The functions `fwd_hm` / `bwd_hm` have the signatures of `blockwise.fwd_hm` /
`blockwise.bwd_hm` (the block seam, head-major layout), so blockwise and ring
attention use them unchanged.

Design:
- Grid (batch, kv head, query block, key block) for the forward and dQ passes,
  (batch, kv head, key block, query block) for dK/dV; the last axis is the reduction.
- GQA: one grid step holds all `groups` query heads of a kv head (`[g, bq, d]`), so a
  K/V block is loaded once per group and never repeated in HBM.
- The reduction axis walks a compacted schedule (`pallas_common`) that the index
  maps read from SMEM (scalar prefetch): hidden tiles are neither computed nor
  loaded; fully visible tiles skip the mask arithmetic.
- Online softmax in float32 in VMEM scratch. Row statistics (max, sum, lse, delta)
  are lane-replicated `[rows, 128]` where they stay resident (forward, dQ); the dK/dV
  pass, which streams them, works on transposed tiles `[bk, bq]` and reads them as
  sublane-replicated rows `[8, bq]` (16x fewer bytes).
- A row that sees no key has lse = -inf and output 0; in the backward its lse is
  +inf so its probabilities are exactly 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lctx import compat
from lctx.kernels import pallas_common as pc
from lctx.kernels.blockwise import MaskSpec

NUM_LANES = 128
NUM_SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


class BlockSizes(NamedTuple):
    """Query and key/value tile sizes (rows of q, rows of k) of every pass."""

    block_q: int
    block_k: int


# Per TensorCore, `pltpu.get_tpu_info_for_chip` gives (bf16 FLOP/s) / (HBM B/s) of
# about 224 (v4), 240 (v5e), 187 (v5p) and 561 (v6e). A forward tile does
# 4 * g * bq * bk * d FLOPs per 4 * bk * d bytes of K/V, so g * bq must exceed that
# ratio to be compute bound; bk sets the work per grid step against its fixed cost
# (~0.35 us) and the f32 score tile bq x bk (v4's 16 MiB VMEM keeps it at 512).
# See experiments/pallas_roofline.md.
GENERATION_BLOCKS = {
    "v4": BlockSizes(512, 512),
    "v5e": BlockSizes(512, 1024),
    "v5p": BlockSizes(512, 1024),
    "v6e": BlockSizes(1024, 1024),
}
GENERATIONS = tuple(GENERATION_BLOCKS)
_DEFAULT_GENERATION = "v5e"
# Scoped VMEM the kernels may use (per TensorCore: 16 MiB on v4, 64 on v5p, 128 on
# v5e/v6e); default query tiles shrink until `vmem_bytes` fits (GQA groups share one
# grid step, so their q/o/statistics blocks grow with the group).
VMEM_LIMIT = {"v4": 12 * 2**20, "v5e": 64 * 2**20, "v5p": 48 * 2**20, "v6e": 64 * 2**20}
_MIN_DEFAULT_BQ = 128


def generation_of(device_kind: str) -> str | None:
    """TPU generation ("v4", "v5e", "v5p", "v6e") from a `device_kind` string, or None."""
    kind = device_kind.lower().replace(" ", "")
    if "v6" in kind:
        return "v6e"
    if "v5lite" in kind or "v5e" in kind:
        return "v5e"
    if "v5" in kind:
        return "v5p"
    if "v4" in kind:
        return "v4"
    return None


def current_generation() -> str:
    """The generation of the first device when it is a TPU, else the default (v5e)."""
    device = jax.devices()[0]
    found = generation_of(device.device_kind) if device.platform == "tpu" else None
    return found or _DEFAULT_GENERATION


def _check_generation(generation):
    if generation not in GENERATION_BLOCKS:
        raise ValueError(f"pallas_tpu: generation={generation!r} is not allowed; "
                         f"expected one of {GENERATIONS}")


def vmem_bytes(groups: int, bq: int, bk: int, head_dim: int, itemsize: int,
               segments: bool = True) -> dict[str, int]:
    """Estimated VMEM bytes of each pass at these tiles: double-buffered blocks,
    scratch and the f32 `[bq, bk]` temporaries of one head (s, p; and dp, ds)."""
    g, d, e, lane_row, sub_col = groups, head_dim, itemsize, NUM_LANES * 4, NUM_SUBLANES * 4
    n_ids = 2 if segments else 1
    ids = (bq * lane_row + bk * sub_col) * n_ids  # query ids as columns, key ids as rows
    ids_t = (bq * sub_col + bk * lane_row) * n_ids  # dK/dV: transposed
    kv = 2 * bk * d * e
    q_side = 2 * g * bq * d * e + 2 * g * bq * lane_row  # q, dO, lse, delta
    q_side_t = 2 * g * bq * d * e + 2 * g * bq * sub_col
    return {
        "fwd": 2 * (g * bq * d * e + kv + ids + g * bq * d * 4 + g * bq * lane_row)
        + 2 * g * bq * lane_row + g * bq * d * 4 + 2 * bq * bk * 4,
        "dkdv": 2 * (q_side_t + kv + ids_t + 2 * bk * d * 4) + 2 * bk * d * 4 + 4 * bq * bk * 4,
        "dq": 2 * (q_side + kv + ids + g * bq * d * 4) + g * bq * d * 4 + 4 * bq * bk * 4,
    }


def resolve_blocks(block_q, block_k, sq: int, sk: int, generation: str | None = None,
                   groups: int = 1, head_dim: int = 128, itemsize: int = 2):
    """Tile sizes for a call: explicit ones, else the generation's defaults, capped at
    the sequence lengths (a default block_q halves while the tiles overflow the VMEM
    limit). Raises ValueError for tiles Mosaic cannot lay out."""
    generation = generation or current_generation()
    _check_generation(generation)
    default = GENERATION_BLOCKS[generation]
    bq = min(default.block_q if block_q is None else block_q, sq)
    bk = min(default.block_k if block_k is None else block_k, sk)
    if block_q is None:
        fits = lambda bq: max(vmem_bytes(groups, bq, bk, head_dim, itemsize).values()) <= (
            VMEM_LIMIT[generation])
        while not fits(bq) and bq > _MIN_DEFAULT_BQ and bq % 2 == 0:
            bq //= 2
    # Each pass has one of the two tiles along lanes (the score tile `[bq, bk]`, and
    # `[bk, bq]` in dK/dV), so both follow the lane rule.
    for name, block, seq, what in (("block_q", bq, sq, "query"), ("block_k", bk, sk, "key")):
        if seq % block or (block % NUM_LANES and not (block == seq and block < NUM_LANES)):
            raise ValueError(f"pallas_tpu: {name}={block} is not allowed; it must divide the "
                             f"{what} length {seq} and be a multiple of {NUM_LANES} (or the "
                             f"whole {what} length when that is below {NUM_LANES})")
    return bq, bk


def _lanes(x: jax.Array, n: int) -> jax.Array:
    """A lane-replicated `[rows, 128]` statistic as `[rows, n]`."""
    if n % NUM_LANES == 0:
        return jnp.tile(x, (1, n // NUM_LANES))
    return x[:, :n]


def _q_ids(ids: jax.Array) -> jax.Array:
    """`[b, s]` -> lane-replicated `[b, s, 128]` (query-side ids as columns)."""
    return jnp.broadcast_to(ids[:, :, None], (*ids.shape, NUM_LANES))


def _k_ids(ids: jax.Array) -> jax.Array:
    """`[b, s]` -> sublane-replicated `[b, 8, s]` (key-side ids as rows)."""
    return jnp.broadcast_to(ids[:, None, :], (ids.shape[0], NUM_SUBLANES, ids.shape[1]))


def _stat_in(x: jax.Array) -> jax.Array:
    """Row statistic `[b, hkv, g, s]` -> lane-replicated `[b, hkv, g, s, 128]`."""
    return jnp.broadcast_to(x[..., None].astype(jnp.float32), (*x.shape, NUM_LANES))


def _stat_rows(x: jax.Array) -> jax.Array:
    """Row statistic `[b, hkv, g, s]` -> sublane-replicated `[b, hkv, g, 8, s]`."""
    return jnp.broadcast_to(x[..., None, :].astype(jnp.float32),
                            (*x.shape[:-1], NUM_SUBLANES, x.shape[-1]))


def _tile_mask(qp_ref, kp_ref, qs_ref, ks_ref, mask: MaskSpec, bk: int):
    """Boolean `[bq, bk]` visibility of a tile from its id blocks (`[bq, 128]` query
    ids, `[8, bk]` key ids)."""
    qp = _lanes(qp_ref[...], bk)
    kp = kp_ref[:1, :]
    qs = _lanes(qs_ref[...], bk) if qs_ref is not None else None
    ks = ks_ref[:1, :] if ks_ref is not None else None
    return pc.visible(qp, kp, qs, ks, mask)


def _scores(q, k, scale, keep):
    """Scaled f32 logits `[bq, bk]` of a query tile against a key tile; -inf if hidden."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    return s if keep is None else jnp.where(keep, s, -jnp.inf)


def _split_refs(refs, has_seg: bool):
    """(segment refs (qs, ks) or (None, None), the remaining refs)."""
    if has_seg:
        return refs[:2], refs[2:]
    return (None, None), refs


def _when_kind(kind, body, masked_any: bool):
    """Runs `body(masked)` for the tile kind: nothing for SKIP, unmasked for FULL."""
    pl.when(kind == pc.FULL)(lambda: body(False))
    if masked_any:
        pl.when(kind == pc.MASKED)(lambda: body(True))


def _compiler_params(generation: str | None):
    generation = generation or current_generation()
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=VMEM_LIMIT[generation])


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, *refs, mask, scale,
                has_seg, groups, n_rows, n_cols, bk, head_dim):
    del idx_ref  # read by the index maps
    (qs_ref, ks_ref), (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _split_refs(refs, has_seg)
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kind = kind_ref[(b * n_rows + i) * n_cols + t]

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        k, v = k_ref[...], v_ref[...]
        keep = _tile_mask(qp_ref, kp_ref, qs_ref, ks_ref, mask, bk) if masked else None
        for j in range(groups):
            s = _scores(q_ref[j], k, scale, keep)
            m_prev, l_prev = m_ref[j], l_ref[j]
            m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            p = jnp.exp(s - _lanes(m_safe, bk))
            alpha = jnp.exp(m_prev - m_safe)
            l_ref[j] = alpha * l_prev + p.sum(axis=1, keepdims=True)
            m_ref[j] = m_next
            pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_ref[j] = acc_ref[j] * _lanes(alpha, head_dim) + pv

    _when_kind(kind, update, mask.any_position_mask() or has_seg)

    @pl.when(t == n_cols - 1)
    def _finish():
        for j in range(groups):
            l, m = l_ref[j], m_ref[j]
            seen = l > 0.0
            l_safe = jnp.where(seen, l, 1.0)
            # A row that saw no key has acc = 0, so its output is 0 without a select.
            o_ref[j] = (acc_ref[j] * _lanes(1.0 / l_safe, head_dim)).astype(o_ref.dtype)
            lse_ref[j] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def fwd_hm(qh, kh, vh, q_pos, k_pos, q_seg, k_seg, *, mask: MaskSpec, scale: float,
           block_q: int | None = None, block_k: int | None = None, interpret: bool = False,
           generation: str | None = None):
    """Forward of one query block against one key/value block (the block seam).

    Args: qh `[b, hkv, g, sq, d]`, kh/vh `[b, hkv, sk, d]`, ids int32 `[b, sq]`/`[b, sk]`
      (segments may be None); generation picks default tiles and the VMEM limit.
    Returns: o float32 `[b, hkv, g, sq, d]`, lse float32 `[b, hkv, g, sq]` (-inf and o = 0
      where no key is visible) and the int32 number of tiles computed.
    """
    b, hkv, g, sq, d = qh.shape
    sk = kh.shape[2]
    bq, bk = resolve_blocks(block_q, block_k, sq, sk, generation, g, d,
                            jnp.dtype(qh.dtype).itemsize)
    nq, nk = sq // bq, sk // bk
    by_q, _, tiles = pc.schedules(q_pos, k_pos, q_seg, k_seg, mask, bq, bk)
    has_seg = q_seg is not None

    def at(b_, i, t, idx):
        return idx[(b_ * nq + i) * nk + t]

    q_spec = pl.BlockSpec((None, None, g, bq, d), lambda b_, h, i, t, idx, kd: (b_, h, 0, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, d),
                           lambda b_, h, i, t, idx, kd: (b_, h, at(b_, i, t, idx), 0))
    qid_spec = pl.BlockSpec((None, bq, NUM_LANES), lambda b_, h, i, t, idx, kd: (b_, i, 0))
    kid_spec = pl.BlockSpec((None, NUM_SUBLANES, bk),
                            lambda b_, h, i, t, idx, kd: (b_, 0, at(b_, i, t, idx)))
    stat_spec = pl.BlockSpec((None, None, g, bq, NUM_LANES),
                             lambda b_, h, i, t, idx, kd: (b_, h, 0, i, 0))
    in_specs = [q_spec, kv_spec, kv_spec, qid_spec, kid_spec]
    args = [qh, kh, vh, _q_ids(q_pos), _k_ids(k_pos)]
    if has_seg:
        in_specs += [qid_spec, kid_spec]
        args += [_q_ids(q_seg), _k_ids(k_seg)]
    kernel = functools.partial(_fwd_kernel, mask=mask, scale=scale, has_seg=has_seg, groups=g,
                               n_rows=nq, n_cols=nk, bk=bk, head_dim=d)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hkv, nq, nk), in_specs=in_specs,
        out_specs=[q_spec, stat_spec],
        scratch_shapes=[pltpu.VMEM((g, bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((g, bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((g, bq, d), jnp.float32)])
    context, hlo_interpret = compat.tpu_interpret_context(interpret)
    with context:
        o, lse = pl.pallas_call(
            kernel, grid_spec=grid_spec,
            out_shape=[jax.ShapeDtypeStruct((b, hkv, g, sq, d), jnp.float32),
                       jax.ShapeDtypeStruct((b, hkv, g, sq, NUM_LANES), jnp.float32)],
            compiler_params=_compiler_params(generation), interpret=hlo_interpret,
            name="lctx_flash_fwd",
        )(by_q.index.reshape(-1), by_q.kind.reshape(-1), *args)
    return o, lse[..., 0], tiles


# ----------------------------------------------------------------------------- backward


def _probs(q, k, lse, scale, keep, bk):
    """p = exp(s - lse) `[bq, bk]` for one head; lse lane-replicated (+inf: empty row)."""
    return jnp.exp(_scores(q, k, scale, keep) - _lanes(lse, bk))


def _dkdv_kernel(idx_ref, kind_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref,
                 kp_ref, *refs, mask, scale, has_seg, groups, n_rows, n_cols, bq):
    del idx_ref
    (qs_ref, ks_ref), (dk_ref, dv_ref, dk_acc, dv_acc) = _split_refs(refs, has_seg)
    b, jk, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kind = kind_ref[(b * n_rows + jk) * n_cols + t]

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(masked: bool):
        # Transposed tiles `[bk, bq]`: the query-side statistics and ids are rows, so
        # they stream at 32 bytes per query row and every product is a plain
        # (or `a @ b.T`) matmul, no transposes.
        k, v = k_ref[...], v_ref[...]
        keep = None
        if masked:
            qs = qs_ref[:1, :] if has_seg else None
            ks = _lanes(ks_ref[...], bq) if has_seg else None
            keep = pc.visible(qp_ref[:1, :], _lanes(kp_ref[...], bq), qs, ks, mask)
        for j in range(groups):
            q, do = q_ref[j], do_ref[j]
            pt = jnp.exp(_scores(k, q, scale, keep) - lse_ref[j, :1, :])
            dv_acc[...] += lax.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
            dst = pt * (dpt - delta_ref[j, :1, :])
            dk_acc[...] += lax.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _when_kind(kind, update, mask.any_position_mask() or has_seg)

    @pl.when(t == n_cols - 1)
    def _finish():
        dk_ref[...] = dk_acc[...] * scale
        dv_ref[...] = dv_acc[...]


def _dq_kernel(idx_ref, kind_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref,
               kp_ref, *refs, mask, scale, has_seg, groups, n_rows, n_cols, bk):
    del idx_ref
    (qs_ref, ks_ref), (dq_ref, dq_acc) = _split_refs(refs, has_seg)
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    kind = kind_ref[(b * n_rows + i) * n_cols + t]

    @pl.when(t == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def update(masked: bool):
        k, v = k_ref[...], v_ref[...]
        keep = _tile_mask(qp_ref, kp_ref, qs_ref, ks_ref, mask, bk) if masked else None
        for j in range(groups):
            q, do = q_ref[j], do_ref[j]
            p = _probs(q, k, lse_ref[j], scale, keep, bk)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - _lanes(delta_ref[j], bk))
            dq_acc[j] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when_kind(kind, update, mask.any_position_mask() or has_seg)

    @pl.when(t == n_cols - 1)
    def _finish():
        dq_ref[...] = dq_acc[...] * scale


def bwd_hm(qh, kh, vh, q_pos, k_pos, q_seg, k_seg, do_h, lse_h, delta_h, *, mask: MaskSpec,
           scale: float, block_q: int | None = None, block_k: int | None = None,
           interpret: bool = False, generation: str | None = None):
    """Gradients of one query block / key-value block pair (the block seam).

    `lse_h` `[b, hkv, g, sq]` may be the global log-sum-exp of the rows (a ring's);
    `delta_h` = rowsum(dO * O) of the full output minus any lse cotangent; `do_h`
    `[b, hkv, g, sq, d]`. Returns float32 (dq `[b, hkv, g, sq, d]`, dk, dv
    `[b, hkv, sk, d]`): this key block's contribution.
    """
    b, hkv, g, sq, d = qh.shape
    sk = kh.shape[2]
    bq, bk = resolve_blocks(block_q, block_k, sq, sk, generation, g, d,
                            jnp.dtype(qh.dtype).itemsize)
    nq, nk = sq // bq, sk // bk
    by_q, by_k, _ = pc.schedules(q_pos, k_pos, q_seg, k_seg, mask, bq, bk)
    has_seg = q_seg is not None
    lse_h = jnp.where(jnp.isneginf(lse_h), jnp.inf, lse_h)
    do_h = do_h.astype(qh.dtype)
    kv_args = [kh, vh]
    statics = dict(mask=mask, scale=scale, has_seg=has_seg, groups=g)

    def specs(q_block, k_block, transposed: bool):
        """In-specs given index functions for the query block and the key block; with
        `transposed` the query-side statistics and ids are rows and key ids columns."""
        at_q = lambda *a: (a[0], a[1], 0, q_block(*a), 0)
        qs = pl.BlockSpec((None, None, g, bq, d), at_q)
        kv = pl.BlockSpec((None, None, bk, d), lambda *a: (a[0], a[1], k_block(*a), 0))
        if transposed:
            st = pl.BlockSpec((None, None, g, NUM_SUBLANES, bq),
                              lambda *a: (a[0], a[1], 0, 0, q_block(*a)))
            qid = pl.BlockSpec((None, NUM_SUBLANES, bq), lambda *a: (a[0], 0, q_block(*a)))
            kid = pl.BlockSpec((None, bk, NUM_LANES), lambda *a: (a[0], k_block(*a), 0))
        else:
            st = pl.BlockSpec((None, None, g, bq, NUM_LANES), at_q)
            qid = pl.BlockSpec((None, bq, NUM_LANES), lambda *a: (a[0], q_block(*a), 0))
            kid = pl.BlockSpec((None, NUM_SUBLANES, bk), lambda *a: (a[0], 0, k_block(*a)))
        return [qs, qs, st, st, kv, kv, qid, kid] + ([qid, kid] if has_seg else []), qs, kv

    # dK/dV: grid (b, h, key block, t) over the query blocks that see this key block.
    in_specs, _, kv_out = specs(lambda b_, h, jk, t, idx, kd: idx[(b_ * nk + jk) * nq + t],
                                lambda b_, h, jk, t, idx, kd: jk, transposed=True)
    q_args = [qh, do_h, _stat_rows(lse_h), _stat_rows(delta_h)]
    ids = [_k_ids(q_pos), _q_ids(k_pos)] + ([_k_ids(q_seg), _q_ids(k_seg)] if has_seg else [])
    context, hlo_interpret = compat.tpu_interpret_context(interpret)
    with context:
        dk, dv = pl.pallas_call(
            functools.partial(_dkdv_kernel, n_rows=nk, n_cols=nq, bq=bq, **statics),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2, grid=(b, hkv, nk, nq), in_specs=in_specs,
                out_specs=[kv_out, kv_out],
                scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2),
            out_shape=[jax.ShapeDtypeStruct(kh.shape, jnp.float32)] * 2,
            compiler_params=_compiler_params(generation), interpret=hlo_interpret,
            name="lctx_flash_bwd_dkdv",
        )(by_k.index.reshape(-1), by_k.kind.reshape(-1), *q_args, *kv_args, *ids)

    # dQ: grid (b, h, query block, t) over the key blocks this query block sees.
    in_specs, q_out, _ = specs(lambda b_, h, i, t, idx, kd: i,
                               lambda b_, h, i, t, idx, kd: idx[(b_ * nq + i) * nk + t],
                               transposed=False)
    q_args = [qh, do_h, _stat_in(lse_h), _stat_in(delta_h)]
    ids = [_q_ids(q_pos), _k_ids(k_pos)] + ([_q_ids(q_seg), _k_ids(k_seg)] if has_seg else [])
    context, hlo_interpret = compat.tpu_interpret_context(interpret)
    with context:
        dq = pl.pallas_call(
            functools.partial(_dq_kernel, n_rows=nq, n_cols=nk, bk=bk, **statics),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2, grid=(b, hkv, nq, nk), in_specs=in_specs,
                out_specs=q_out, scratch_shapes=[pltpu.VMEM((g, bq, d), jnp.float32)]),
            out_shape=jax.ShapeDtypeStruct(qh.shape, jnp.float32),
            compiler_params=_compiler_params(generation), interpret=hlo_interpret,
            name="lctx_flash_bwd_dq",
        )(by_q.index.reshape(-1), by_q.kind.reshape(-1), *q_args, *kv_args, *ids)
    return dq, dk, dv
