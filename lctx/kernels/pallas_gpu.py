"""Flash attention for GPUs in Pallas (Triton lowering): forward, dK/dV and dQ kernels.

`fwd_hm` / `bwd_hm` have the signatures of `blockwise.fwd_hm` / `blockwise.bwd_hm`
(the block seam, head-major layout), like `pallas_tpu`.

Design (Triton's programming model: one program per output tile, loops inside):
- Forward and dQ: one program per (batch, query head, query block); a loop over the
  key blocks of the compacted schedule (`pallas_common`), so hidden tiles are
  neither loaded nor computed. K/V are addressed through the kv head `h // groups`
  (GQA without repeated K/V).
- dK/dV: one program per (batch, kv head, key block); loops over the group's query
  heads and the query blocks that see this key block; dK/dV accumulate in registers
  for the whole group, so no atomics are needed.
- Online softmax in float32. Visible tiles always apply the mask (cheap next to the
  two matmuls on a GPU); the schedule's kinds matter only for skipping.
- Rows that see no key: lse = -inf and output 0; the backward uses lse = +inf there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from lctx.kernels import pallas_common as pc
from lctx.kernels.blockwise import MaskSpec

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


class BlockSizes(NamedTuple):
    block_q: int
    block_k: int


# H100/H200 (228 KiB shared memory per SM): 128 x 64 tiles at head_dim 128 keep Q,
# K, V and the f32 score tile in registers/shared memory with 2 pipeline stages.
DEFAULT_BLOCKS = BlockSizes(128, 64)
_NUM_STAGES = 2


def _num_warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def resolve_blocks(block_q, block_k, sq: int, sk: int, head_dim: int):
    """Tile sizes for a call (defaults capped at the sequence lengths). Triton needs
    power-of-two tiles of at least 16 rows; raises ValueError otherwise."""
    bq = min(DEFAULT_BLOCKS.block_q if block_q is None else block_q, sq)
    bk = min(DEFAULT_BLOCKS.block_k if block_k is None else block_k, sk)
    for name, block, seq in (("block_q", bq, sq), ("block_k", bk, sk)):
        if seq % block or not _pow2(block) or block < 16:
            raise ValueError(f"pallas_gpu: {name}={block} is not allowed; it must divide the "
                             f"sequence length {seq} and be a power of two >= 16")
    if not _pow2(head_dim) or head_dim < 16:
        raise ValueError(f"pallas_gpu: head_dim={head_dim} is not allowed; expected a power "
                         f"of two >= 16")
    return bq, bk


def _params(head_dim: int):
    return pltr.CompilerParams(num_warps=_num_warps(head_dim), num_stages=_NUM_STAGES)


def _scores(q, k, scale, keep):
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    return jnp.where(keep, s, -jnp.inf) if keep is not None else s


def _keep(qp, kp, qs, ks, mask: MaskSpec):
    """`[bq, bk]` visibility from `[bq]` query ids and `[bk]` key ids (or None)."""
    return pc.visible(qp[:, None], kp[None, :], None if qs is None else qs[:, None],
                      None if ks is None else ks[None, :], mask)


def _unpack(refs, has_seg):
    """Splits (q-side seg, k-side seg) off the front of `refs` when present."""
    if has_seg:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qp_ref, kp_ref, *refs, mask, scale,
                has_seg, n_rows, n_cols, bk):
    qs_ref, ks_ref, (o_ref, lse_ref) = _unpack(refs, has_seg)
    b, i = pl.program_id(0), pl.program_id(2)
    row = b * n_rows + i
    q = q_ref[...]
    qp = qp_ref[...]
    qs = qs_ref[...] if has_seg else None
    bq, d = q.shape

    def body(t, carry):
        m, l, acc = carry
        j = idx_ref[row * n_cols + t]
        cols = pl.ds(j * bk, bk)
        k, v = k_ref[cols, :], v_ref[cols, :]
        keep = _keep(qp, kp_ref[cols], qs, ks_ref[cols] if has_seg else None, mask)
        s = _scores(q, k, scale, keep)
        m_next = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_next, alpha * l + p.sum(axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, cnt_ref[row], body, init)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _whole(shape):
    """A block covering a whole (small, flattened) array."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def fwd_hm(qh, kh, vh, q_pos, k_pos, q_seg, k_seg, *, mask: MaskSpec, scale: float,
           block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
    """Forward of one query block against one key/value block (the block seam).

    Args/returns as `pallas_tpu.fwd_hm`: o float32 `[b, hkv, g, sq, d]`, lse float32
    `[b, hkv, g, sq]` (-inf, o = 0, where no key is visible), int32 tiles computed.
    """
    b, hkv, g, sq, d = qh.shape
    sk = kh.shape[2]
    bq, bk = resolve_blocks(block_q, block_k, sq, sk, d)
    nq, nk = sq // bq, sk // bk
    by_q, _, tiles = pc.schedules(q_pos, k_pos, q_seg, k_seg, mask, bq, bk)
    has_seg = q_seg is not None
    heads = hkv * g
    q4 = qh.reshape(b, heads, sq, d)
    sched = [by_q.index.reshape(-1), by_q.count.reshape(-1)]
    q_spec = pl.BlockSpec((None, None, bq, d), lambda b_, h, i: (b_, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, sk, d), lambda b_, h, i: (b_, h // g, 0, 0))
    qid_spec = pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))
    kid_spec = pl.BlockSpec((None, sk), lambda b_, h, i: (b_, 0))
    in_specs = [_whole(x.shape) for x in sched] + [q_spec, kv_spec, kv_spec, qid_spec, kid_spec]
    args = sched + [q4, kh, vh, q_pos, k_pos]
    if has_seg:
        in_specs += [qid_spec, kid_spec]
        args += [q_seg, k_seg]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, mask=mask, scale=scale, has_seg=has_seg, n_rows=nq,
                          n_cols=nk, bk=bk),
        grid=(b, heads, nq), in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, heads, sq, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, heads, sq), jnp.float32)],
        compiler_params=_params(d), interpret=interpret, name="lctx_flash_fwd_gpu",
    )(*args)
    return o.reshape(qh.shape), lse.reshape(qh.shape[:-1]), tiles


# ----------------------------------------------------------------------------- backward


def _dkdv_kernel(idx_ref, cnt_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref,
                 kp_ref, *refs, mask, scale, has_seg, groups, n_rows, n_cols, bq):
    qs_ref, ks_ref, (dk_ref, dv_ref) = _unpack(refs, has_seg)
    b, jk = pl.program_id(0), pl.program_id(2)
    row = b * n_rows + jk
    k, v = k_ref[...], v_ref[...]
    kp = kp_ref[...]
    ks = ks_ref[...] if has_seg else None
    bk, d = k.shape

    def body(t, carry):
        dk, dv = carry
        i = idx_ref[row * n_cols + t]
        rows = pl.ds(i * bq, bq)
        keep = _keep(qp_ref[rows], kp, qs_ref[rows] if has_seg else None, ks, mask)
        for j in range(groups):
            q, do = q_ref[j, rows, :], do_ref[j, rows, :]
            p = jnp.exp(_scores(q, k, scale, keep) - lse_ref[j, rows][:, None])
            dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                                      preferred_element_type=jnp.float32)
            dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_ref[j, rows][:, None])
            dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN,
                                      preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(0, cnt_ref[row], body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _dq_kernel(idx_ref, cnt_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qp_ref,
               kp_ref, *refs, mask, scale, has_seg, n_rows, n_cols, bk):
    qs_ref, ks_ref, (dq_ref,) = _unpack(refs, has_seg)
    b, i = pl.program_id(0), pl.program_id(2)
    row = b * n_rows + i
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    qp = qp_ref[...]
    qs = qs_ref[...] if has_seg else None

    def body(t, dq):
        j = idx_ref[row * n_cols + t]
        cols = pl.ds(j * bk, bk)
        k, v = k_ref[cols, :], v_ref[cols, :]
        keep = _keep(qp, kp_ref[cols], qs, ks_ref[cols] if has_seg else None, mask)
        p = jnp.exp(_scores(q, k, scale, keep) - lse[:, None])
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, cnt_ref[row], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq * scale


def bwd_hm(qh, kh, vh, q_pos, k_pos, q_seg, k_seg, do_h, lse_h, delta_h, *, mask: MaskSpec,
           scale: float, block_q: int | None = None, block_k: int | None = None,
           interpret: bool = False):
    """Gradients of one query block / key-value block pair (the block seam); as
    `pallas_tpu.bwd_hm`. Returns float32 (dq `[b, hkv, g, sq, d]`, dk, dv `[b, hkv, sk, d]`)."""
    b, hkv, g, sq, d = qh.shape
    sk = kh.shape[2]
    bq, bk = resolve_blocks(block_q, block_k, sq, sk, d)
    nq, nk = sq // bq, sk // bk
    by_q, by_k, _ = pc.schedules(q_pos, k_pos, q_seg, k_seg, mask, bq, bk)
    has_seg = q_seg is not None
    lse = jnp.where(jnp.isneginf(lse_h), jnp.inf, lse_h).astype(jnp.float32)
    delta = delta_h.astype(jnp.float32)
    do_h = do_h.astype(qh.dtype)
    statics = dict(mask=mask, scale=scale, has_seg=has_seg)

    # dK/dV: programs (b, kv head, key block); the whole group's queries per program.
    sched = [by_k.index.reshape(-1), by_k.count.reshape(-1)]
    grp = pl.BlockSpec((None, None, g, sq, d), lambda b_, h, j: (b_, h, 0, 0, 0))
    grp_stat = pl.BlockSpec((None, None, g, sq), lambda b_, h, j: (b_, h, 0, 0))
    kv_blk = pl.BlockSpec((None, None, bk, d), lambda b_, h, j: (b_, h, j, 0))
    qid_all = pl.BlockSpec((None, sq), lambda b_, h, j: (b_, 0))
    kid_blk = pl.BlockSpec((None, bk), lambda b_, h, j: (b_, j))
    in_specs = [_whole(x.shape) for x in sched] + [grp, grp, grp_stat, grp_stat, kv_blk, kv_blk,
                                                   qid_all, kid_blk]
    ids = [q_pos, k_pos] + ([q_seg, k_seg] if has_seg else [])
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, groups=g, n_rows=nk, n_cols=nq, bq=bq, **statics),
        grid=(b, hkv, nk), in_specs=in_specs + ([qid_all, kid_blk] if has_seg else []),
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, jnp.float32)] * 2,
        compiler_params=_params(d), interpret=interpret, name="lctx_flash_bwd_dkdv_gpu",
    )(*sched, qh, do_h, lse, delta, kh, vh, *ids)

    # dQ: programs (b, query head, query block), like the forward.
    heads = hkv * g
    sched = [by_q.index.reshape(-1), by_q.count.reshape(-1)]
    q_blk = pl.BlockSpec((None, None, bq, d), lambda b_, h, i: (b_, h, i, 0))
    st_blk = pl.BlockSpec((None, None, bq), lambda b_, h, i: (b_, h, i))
    kv_all = pl.BlockSpec((None, None, sk, d), lambda b_, h, i: (b_, h // g, 0, 0))
    qid_blk = pl.BlockSpec((None, bq), lambda b_, h, i: (b_, i))
    kid_all = pl.BlockSpec((None, sk), lambda b_, h, i: (b_, 0))
    in_specs = [_whole(x.shape) for x in sched] + [q_blk, q_blk, st_blk, st_blk, kv_all, kv_all,
                                                   qid_blk, kid_all]
    flat = lambda x: x.reshape(b, heads, *x.shape[3:])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, n_rows=nq, n_cols=nk, bk=bk, **statics),
        grid=(b, heads, nq), in_specs=in_specs + ([qid_blk, kid_all] if has_seg else []),
        out_specs=q_blk, out_shape=jax.ShapeDtypeStruct((b, heads, sq, d), jnp.float32),
        compiler_params=_params(d), interpret=interpret, name="lctx_flash_bwd_dq_gpu",
    )(*sched, flat(qh), flat(do_h), flat(lse), flat(delta), kh, vh, *ids)
    return dq.reshape(qh.shape), dk, dv
