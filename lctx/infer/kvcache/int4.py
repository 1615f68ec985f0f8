"""`int4`: KIVI-style 4- or 2-bit keys and values, the most recent tokens in full precision.

    parse("int4")                                   # bits=4, group=32, residual=128
    parse("int4:bits=2,group=32,residual=64,rotate=hadamard")

Keys are quantized per channel, values per token (KIVI: a few key channels carry
outliers, so a per-token key scale would spend its levels on them), both asymmetric
(x ~ code * scale + zero, code in [0, 2^bits - 1], scale = (max - min) / (2^bits - 1),
zero = min):

  keys    one scale and zero per channel over each group of `group` consecutive tokens
          (min/max over the group's real tokens: padding, position -1, would widen it)
  values  one scale and zero per token over each group of min(group, head_dim) channels

`rotate=hadamard` multiplies keys by the orthonormal Hadamard matrix H (Sylvester,
divided by sqrt(head_dim)) before quantizing them, spreading an outlier channel over
all channels; `read` multiplies back by H (H H = I, so q.k is unchanged).
Codes are packed 8 / bits to a uint8 byte (lowest bits first), so the bytes are real.

Which tokens are in full precision: with n tokens written (padding counted), tokens
[Q(n), n), where Q(n) = group * floor(max(0, n - residual) / group) are quantized.
That is every token while n < residual + group, and then the last residual to
residual + group - 1 tokens: a key group is quantized once all of its tokens are
older than the last `residual` (keys and values leave full precision together).

Storage, fixed shapes for T = `slots` = tokens (nothing is evicted):

  k, v               uint8 [b, Hkv, Tq, hd * bits / 8]   packed codes of tokens [0, Tq)
  k_scale, k_zero    f32   [b, Hkv, Tq / group, hd]
  v_scale, v_zero    f32   [b, Hkv, Tq, hd / min(group, hd)]
  k_fp, v_fp         dtype [b, Hkv, F, hd]   tokens [Q(n), n), the full-precision tail
  Tq = Q(T) (the most that are ever quantized), F = max(1, min(T, residual + group - 1))

A write of C tokens (any C: a prefill chunk or a decode token) stages the tail and the
chunk together, quantizes the key groups this write completes (at most ceil(C / group)
of them) into the packed storage at their slots (a scatter that drops the candidate
groups not yet complete, so shapes stay fixed), and keeps the rest as the new tail.
Each (row, KV head) has its own count, so rows may differ. `read` gives T slots in
written order: dequantized [0, Q(n)), then the tail.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lctx.infer.kvcache.base import CachePolicy, Data, append, gather_slots
from lctx.infer.kvcache.registry import register

ROTATIONS = ("none", "hadamard")


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix `[n, n]` float32 (n a power of 2);
    symmetric, so it is its own inverse."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / math.sqrt(n)).astype(np.float32)


def quantize(x: jax.Array, bits: int, axis: int, valid: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric min/max quantization of float32 `x` over `axis`.

    valid: bool broadcastable to x, the elements the min/max is taken over (None: all).
    Returns uint8 codes (x's shape) and float32 scale and zero (x's shape, `axis` kept
    at size 1); a group with no valid element or a single value gets scale 0.
    """
    levels = 2**bits - 1
    if valid is None:
        lo, hi = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    else:
        lo = jnp.where(valid, x, jnp.inf).min(axis, keepdims=True)
        hi = jnp.where(valid, x, -jnp.inf).max(axis, keepdims=True)
        empty = ~jnp.isfinite(lo)
        lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
    scale = (hi - lo) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((x - lo) / safe), 0, levels).astype(jnp.uint8)
    return codes, scale, lo


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes `[..., n]` (each < 2^bits) -> uint8 `[..., n * bits / 8]`: code j of
    each byte in bits [bits * j, bits * (j + 1))."""
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    # the codes' bits do not overlap, so the sum is their bitwise or
    return jnp.sum(grouped << shifts, axis=-1, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """The inverse of `pack`: uint8 `[..., m]` -> codes uint8 `[..., m * 8 / bits]`."""
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    codes = (packed[..., None] >> shifts) & jnp.uint8(2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)


@register
@dataclasses.dataclass(frozen=True)
class Int4(CachePolicy):
    """KIVI quantization (module docstring): `bits` 4 or 2, key groups of `group` tokens,
    value groups of min(group, head_dim) channels, at least `residual` recent tokens in
    full precision, optional Hadamard rotation of keys."""

    name = "int4"
    bits: int = 4
    group: int = 32
    residual: int = 128
    rotate: str = "none"

    def problems(self) -> list[str]:
        found = []
        if self.bits not in (2, 4):
            found.append(f"bits={self.bits}: allowed 2, 4")
        if self.group < 1:
            found.append(f"group={self.group}: must be >= 1")
        if self.residual < 0:
            found.append(f"residual={self.residual}: must be >= 0")
        elif self.group >= 1 and self.residual % self.group:
            found.append(f"residual={self.residual}: must be a multiple of group={self.group}")
        if self.rotate not in ROTATIONS:
            found.append(f"rotate={self.rotate!r}: allowed {', '.join(ROTATIONS)}")
        return found

    # ------------------------------------------------------------------ sizes

    def _value_group(self, head_dim: int) -> int:
        """Channels per value scale; a group wider than the head is the whole head."""
        return min(self.group, head_dim)

    def _check(self, head_dim: int) -> None:
        """ValueError (one line) for a head_dim these options cannot store."""
        found = []
        if head_dim % (8 // self.bits):
            found.append(f"must be a multiple of {8 // self.bits} to pack {self.bits}-bit codes "
                         "in bytes")
        if head_dim % self._value_group(head_dim):
            found.append(f"must be a multiple of group={self.group} (the value groups)")
        if self.rotate == "hadamard" and head_dim & (head_dim - 1):
            found.append("must be a power of 2 for rotate=hadamard")
        if found:
            raise ValueError(f"kv_cache={self.spec()!r}: head_dim={head_dim}: " + "; ".join(found))

    def _sizes(self, tokens: int) -> tuple[int, int]:
        """(Tq quantized slots, F full-precision slots) for a cache of `tokens` tokens."""
        quantized = self.group * (max(0, tokens - self.residual) // self.group)
        # at least one tail slot, so no array is empty (residual=0, group=1 keeps none)
        return quantized, max(1, min(tokens, self.residual + self.group - 1))

    def _quantized(self, filled: jax.Array) -> jax.Array:
        """Q(n): how many of the first `filled` tokens are quantized (int array)."""
        return self.group * (jnp.maximum(filled - self.residual, 0) // self.group)

    def slots(self, tokens: int, chunk: int) -> int:
        return tokens

    def nbytes(self, batch: int, kv_heads: int, head_dim: int, tokens: int, chunk: int,
               dtype_bytes: int) -> int:
        """Exact bytes of one layer: the storage is not per-slot uniform (Tq packed
        slots, F full-precision ones, per-group scales), so counted array by array."""
        self._check(head_dim)
        quantized, full = self._sizes(tokens)
        codes = 2 * quantized * head_dim * self.bits // 8
        scales = 2 * 4 * (quantized // self.group * head_dim
                          + quantized * (head_dim // self._value_group(head_dim)))
        tail = 2 * full * head_dim * dtype_bytes
        return batch * kv_heads * (codes + scales + tail + 4 * tokens + 4)

    def bytes_per_slot(self, head_dim: int, dtype_bytes: int) -> float:
        """What one quantized token costs, scales amortized (the long-context rate;
        `nbytes` adds the full-precision tail and is exact)."""
        return (2 * head_dim * self.bits / 8 + 8 * head_dim / self.group
                + 8 * head_dim / self._value_group(head_dim))

    # ------------------------------------------------------------------ storage

    def init(self, batch: int, kv_heads: int, head_dim: int, slots: int, dtype: Any) -> Data:
        self._check(head_dim)
        quantized, full = self._sizes(slots)
        lead = (batch, kv_heads)
        packed = (*lead, quantized, head_dim * self.bits // 8)
        key_scale = (*lead, quantized // self.group, head_dim)
        value_scale = (*lead, quantized, head_dim // self._value_group(head_dim))
        return {"k": jnp.zeros(packed, jnp.uint8), "v": jnp.zeros(packed, jnp.uint8),
                "k_scale": jnp.zeros(key_scale, jnp.float32),
                "k_zero": jnp.zeros(key_scale, jnp.float32),
                "v_scale": jnp.zeros(value_scale, jnp.float32),
                "v_zero": jnp.zeros(value_scale, jnp.float32),
                "k_fp": jnp.zeros((*lead, full, head_dim), dtype),
                "v_fp": jnp.zeros((*lead, full, head_dim), dtype)}

    def _quantize_keys(self, k: jax.Array, valid: jax.Array) -> tuple[jax.Array, ...]:
        """Whole groups of keys float32 `[m, hd]` (m a multiple of group; valid bool `[m]`)
        -> packed codes `[m, hd * bits / 8]`, scale and zero `[m / group, hd]`."""
        m, hd = k.shape
        if self.rotate == "hadamard":
            k = k @ hadamard(hd)
        grouped = k.reshape(m // self.group, self.group, hd)
        codes, scale, zero = quantize(grouped, self.bits, 1, valid.reshape(-1, self.group, 1))
        return pack(codes.reshape(m, hd), self.bits), scale[:, 0], zero[:, 0]

    def _quantize_values(self, v: jax.Array) -> tuple[jax.Array, ...]:
        """Values float32 `[m, hd]` -> packed codes, scale and zero `[m, hd / value group]`."""
        m, hd = v.shape
        vg = self._value_group(hd)
        codes, scale, zero = quantize(v.reshape(m, hd // vg, vg), self.bits, 2)
        return pack(codes.reshape(m, hd), self.bits), scale[..., 0], zero[..., 0]

    def _write_one(self, store: Data, pos: jax.Array, filled: jax.Array, k: jax.Array,
                   v: jax.Array) -> Data:
        """One (row, KV head): store's arrays without the two leading axes; pos `[T]`
        (the chunk already appended), filled the count before the chunk; k, v `[C, hd]`."""
        chunk = k.shape[0]
        tq, full = store["k"].shape[0], store["k_fp"].shape[0]
        done_before = self._quantized(filled)
        tail = filled - done_before  # tokens in k_fp / v_fp now, at most `full`
        if tq == 0:  # static: this cache never quantizes (the residual covers every token)
            put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype),
                                                                     tail, 0)
            return {**store, "k_fp": put(store["k_fp"], k), "v_fp": put(store["v_fp"], v)}

        most = -(-chunk // self.group) * self.group  # tokens one write can quantize, at most

        def staged(fp, new):  # [tail | chunk | stale], room for slicing `full` after `most`
            buf = jnp.concatenate([fp, jnp.zeros((most, fp.shape[1]), fp.dtype)])
            return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(fp.dtype), tail, 0)

        k_buf, v_buf = staged(store["k_fp"], k), staged(store["v_fp"], v)
        done = self._quantized(filled + chunk) - done_before  # a multiple of group, <= most
        j = jnp.arange(most)
        real = (j < done) & (pos[jnp.clip(done_before + j, 0, pos.shape[0] - 1)] >= 0)
        k_codes, k_scale, k_zero = self._quantize_keys(k_buf[:most].astype(jnp.float32), real)
        v_codes, v_scale, v_zero = self._quantize_values(v_buf[:most].astype(jnp.float32))
        # Candidates not complete yet go to an out-of-range index, which the scatter drops.
        rows = jnp.where(j < done, done_before + j, tq)
        g = jnp.arange(most // self.group)
        groups = jnp.where(g * self.group < done, done_before // self.group + g,
                           tq // self.group)
        set_at = lambda buf, at, x: buf.at[at].set(x.astype(buf.dtype), mode="drop")
        keep = lambda buf: jax.lax.dynamic_slice_in_dim(buf, done, full, 0)
        return {"k": set_at(store["k"], rows, k_codes), "v": set_at(store["v"], rows, v_codes),
                "k_scale": set_at(store["k_scale"], groups, k_scale),
                "k_zero": set_at(store["k_zero"], groups, k_zero),
                "v_scale": set_at(store["v_scale"], rows, v_scale),
                "v_zero": set_at(store["v_zero"], rows, v_zero),
                "k_fp": keep(k_buf), "v_fp": keep(v_buf)}

    def write(self, data: Data, k: jax.Array, v: jax.Array, pos: jax.Array) -> Data:
        filled = data["filled"]
        new_pos = append(data["pos"], pos, filled)
        store = {name: x for name, x in data.items() if name not in ("pos", "filled")}
        store = jax.vmap(jax.vmap(self._write_one))(store, new_pos, filled, k, v)
        return {**store, "pos": new_pos, "filled": filled + k.shape[2]}

    def dequantize(self, data: Data) -> tuple[jax.Array, jax.Array]:
        """The quantized slots' keys and values, float32 `[b, Hkv, Tq, hd]` (all Tq, in
        use or not)."""
        codes = unpack(data["k"], self.bits).astype(jnp.float32)
        scale = jnp.repeat(data["k_scale"], self.group, axis=2)
        zero = jnp.repeat(data["k_zero"], self.group, axis=2)
        keys = codes * scale + zero
        if self.rotate == "hadamard":
            keys = keys @ hadamard(keys.shape[-1])
        codes = unpack(data["v"], self.bits).astype(jnp.float32)
        shape = (*data["v_scale"].shape, -1)  # [b, Hkv, Tq, groups, channels of a group]
        values = codes.reshape(shape) * data["v_scale"][..., None] + data["v_zero"][..., None]
        return keys, values.reshape(codes.shape)

    def read(self, data: Data, dtype: Any) -> tuple[jax.Array, jax.Array]:
        slots = data["pos"].shape[-1]
        tq, full = data["k"].shape[2], data["k_fp"].shape[2]
        done = self._quantized(data["filled"])[..., None]  # [b, Hkv, 1]
        i = jnp.arange(slots)
        # Slot i >= Q(n) is tail entry i - Q(n) (clipped: slots past n are empty anyway).
        at = jnp.broadcast_to(jnp.clip(i - done, 0, full - 1), data["pos"].shape)
        keys, values = gather_slots(data["k_fp"], at), gather_slots(data["v_fp"], at)
        if tq == 0:
            return keys.astype(dtype), values.astype(dtype)
        pad = [(0, 0), (0, 0), (0, slots - tq), (0, 0)]
        low_k, low_v = (jnp.pad(x, pad) for x in self.dequantize(data))
        quantized = (i < done)[..., None]
        return (jnp.where(quantized, low_k, keys.astype(jnp.float32)).astype(dtype),
                jnp.where(quantized, low_v, values.astype(jnp.float32)).astype(dtype))
