"""The Pallas kernels behind the block seam: choosing one, and single-device attention.

`PallasSeam(kernel, interpret)` has `fwd_hm` / `bwd_hm` with the signatures of
`lctx.kernels.blockwise.fwd_hm` / `bwd_hm`; ring attention takes it as its `seam`.
It is a frozen dataclass, so it can be a static (hashable) argument.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from lctx.kernels import blockwise as bw
from lctx.kernels.blockwise import MaskSpec
from lctx.kernels.reference import default_positions
from lctx.kernels.registry import KERNELS, AttentionImpl, register

_BACKEND_KERNEL = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def resolve_kernel(kernel: str | None, interpret: bool, backend: str | None = None) -> str:
    """The kernel to run: `kernel` if given, else the backend's (the TPU kernel on a CPU).

    Raises ValueError for an unknown kernel, or on a CPU without `interpret=True` (a CPU
    can only run Pallas kernels in interpret mode).
    """
    backend = backend or jax.default_backend()
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"attention: kernel={kernel!r} is not allowed; expected None "
                         f"(the backend decides) or one of {KERNELS}")
    if not isinstance(interpret, bool):
        raise ValueError(f"attention: interpret={interpret!r} is not allowed; expected a bool")
    if backend not in _BACKEND_KERNEL and not interpret:
        raise ValueError(f"attention: interpret=False is not allowed for Pallas kernels "
                         f"(impl='pallas' or ring_inner='pallas') on the {backend!r} backend; "
                         f"they run natively only on TPU or GPU, elsewhere only with "
                         f"interpret=True")
    return kernel or _BACKEND_KERNEL.get(backend, "tpu")


def check_blocks(kernel: str, block_q, block_k, seq: int, groups: int, head_dim: int,
                 dtype) -> tuple[int, int]:
    """The (block_q, block_k) the kernel will use on `seq`-long blocks, from shapes
    alone (so bad tiles fail before tracing). Raises the kernel's ValueError."""
    if kernel == "tpu":
        from lctx.kernels import pallas_tpu

        return pallas_tpu.resolve_blocks(block_q, block_k, seq, seq, None, groups, head_dim,
                                         jnp.dtype(dtype).itemsize)
    from lctx.kernels import pallas_gpu

    return pallas_gpu.resolve_blocks(block_q, block_k, seq, seq, head_dim)


@dataclasses.dataclass(frozen=True)
class PallasSeam:
    """The block seam implemented by a Pallas kernel ("tpu" or "gpu")."""

    kernel: str = "tpu"
    interpret: bool = False

    def _module(self):
        return importlib.import_module(f"lctx.kernels.pallas_{self.kernel}")

    def fwd_hm(self, *args, **kwargs):
        """`blockwise.fwd_hm` computed by the kernel: (o f32, lse f32, tiles)."""
        return self._module().fwd_hm(*args, interpret=self.interpret, **kwargs)

    def bwd_hm(self, *args, **kwargs):
        """`blockwise.bwd_hm` computed by the kernel: float32 (dq, dk, dv)."""
        return self._module().bwd_hm(*args, interpret=self.interpret, **kwargs)

    def block_fwd(self, q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, causal=False,
                  sliding_window=None, scale=None, block_q=None, block_k=None):
        """`blockwise.block_fwd` (layout `[b, s, h, d]`): (o f32, lse f32 `[b, sq, h]`)."""
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o_h, lse_h, _ = self.fwd_hm(
            bw.q_to_head_major(q, k.shape[2]), bw.kv_to_head_major(k), bw.kv_to_head_major(v),
            q_pos, k_pos, q_seg, k_seg, mask=MaskSpec(causal, sliding_window), scale=scale,
            block_q=block_q, block_k=block_k)
        return bw.q_from_head_major(o_h), bw.lse_from_head_major(lse_h)

    def block_bwd(self, q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do, *, causal=False,
                  sliding_window=None, scale=None, block_q=None, block_k=None):
        """`blockwise.block_bwd`: this key block's float32 (dq, dk, dv) given the rows'
        (possibly global) output `o` and `lse`."""
        kv_heads = k.shape[2]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        o_h, do_h = bw.q_to_head_major(o, kv_heads), bw.q_to_head_major(do, kv_heads)
        dq, dk, dv = self.bwd_hm(
            bw.q_to_head_major(q, kv_heads), bw.kv_to_head_major(k), bw.kv_to_head_major(v),
            q_pos, k_pos, q_seg, k_seg, do_h.astype(q.dtype), bw.lse_to_head_major(lse, kv_heads),
            bw.delta_hm(o_h, do_h), mask=MaskSpec(causal, sliding_window), scale=scale,
            block_q=block_q, block_k=block_k)
        return bw.q_from_head_major(dq), bw.kv_from_head_major(dk), bw.kv_from_head_major(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _pallas_hm(qh, kh, vh, pos, seg, seam, mask, scale, block_q, block_k):
    o, lse, _ = seam.fwd_hm(qh, kh, vh, pos, pos, seg, seg, mask=mask, scale=scale,
                            block_q=block_q, block_k=block_k)
    return o.astype(qh.dtype), lse


def _pallas_hm_fwd(qh, kh, vh, pos, seg, seam, mask, scale, block_q, block_k):
    o, lse = _pallas_hm(qh, kh, vh, pos, seg, seam, mask, scale, block_q, block_k)
    return (o, lse), (qh, kh, vh, pos, seg, o, lse)


def _pallas_hm_bwd(seam, mask, scale, block_q, block_k, res, cotangents):
    qh, kh, vh, pos, seg, o, lse = res
    do, dlse = cotangents
    delta = bw.delta_hm(o, do) - dlse  # an lse cotangent enters like -delta
    dq, dk, dv = seam.bwd_hm(qh, kh, vh, pos, pos, seg, seg, do, lse, delta, mask=mask,
                             scale=scale, block_q=block_q, block_k=block_k)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_pallas_hm.defvjp(_pallas_hm_fwd, _pallas_hm_bwd)


def pallas_attention(q, k, v, *, causal=False, segment_ids=None, positions=None,
                     sliding_window=None, scale=None, block_q=None, block_k=None,
                     return_lse=False, kernel=None, interpret=False):
    """Exact attention on one device with a fused Pallas kernel (custom VJP).

    Args: q `[b, s, h, d]`; k, v `[b, s, h_kv, d]`; segment_ids, positions int32
      `[b, s]`; kernel "tpu" | "gpu" | None (the backend decides); interpret runs the
      kernel in Pallas interpret mode (the only way on a CPU).
    Returns: out `[b, s, h, d]` in q's dtype (and float32 lse `[b, s, h]`).
    """
    b, s, _, d = q.shape
    kv_heads = k.shape[2]
    seam = PallasSeam(resolve_kernel(kernel, interpret), interpret)
    scale = d ** -0.5 if scale is None else float(scale)
    positions = default_positions(b, s) if positions is None else positions
    o_h, lse_h = _pallas_hm(bw.q_to_head_major(q, kv_heads), bw.kv_to_head_major(k),
                            bw.kv_to_head_major(v), positions, segment_ids, seam,
                            MaskSpec(causal, sliding_window), scale, block_q, block_k)
    out = bw.q_from_head_major(o_h)
    return (out, bw.lse_from_head_major(lse_h)) if return_lse else out


register(AttentionImpl(
    "pallas", options=("block_q", "block_k", "kernel", "interpret"),
    uses_pallas=lambda options: True,
    build=lambda plan: lambda q, k, v, pos, seg: pallas_attention(
        q, k, v, positions=pos, segment_ids=seg, kernel=plan.kernel, interpret=plan.interpret,
        **plan.mask_options, **plan.blocks)))
