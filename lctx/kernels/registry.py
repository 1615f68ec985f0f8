"""Attention implementations by name, and the one check of their options and lengths.

    from lctx.kernels.registry import IMPLS      # {"reference": AttentionImpl(...), ...}

Each implementation's module registers its `AttentionImpl` when imported (reference.py,
blockwise.py, pallas.py, ring.py, ulysses.py; `lctx.kernels` imports every module of
the package), so a new implementation is one new file calling `register`. Everything
that takes an attention impl (`lctx.kernels.attention`, `ModelConfig`, the training
config, the model's input check) validates through `option_problems` and
`sequence_problems` here; each caller words the result its own way (`Problem`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from lctx.kernels.layout import PLACEMENTS, placement_multiple

Problem = tuple[str, Any, str]  # (argument name, its value, what is allowed)
RING_INNER = ("xla", "pallas")
LAYOUTS = ("balanced", "natural")
KERNELS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """One attention implementation.

    build: the attention plan (`lctx.kernels.api._Plan`) -> the per-device function
      `(q, k, v, positions, segment_ids) -> out | (out, lse)`, run under `shard_map`
      when the plan has a mesh.
    options: the `impl_options` it takes (block_q, block_k, placement, ...).
    sequence_parallel: the sequence is split over the mesh's sequence axis (needs a mesh).
    whole_sequence: each device attends over the whole sequence (Ulysses trades the
      sequence split for a head split), so blocks divide the full length.
    heads_ok: (heads, kv_heads, shards) -> whether the heads can be split that way.
    uses_pallas: options -> whether this call runs a Pallas kernel (kernel/interpret apply).
    model_options: options the model takes for it besides `options` (ring: layout).
    """

    name: str
    build: Callable[[Any], Callable]
    options: tuple[str, ...] = ()
    sequence_parallel: bool = False
    whole_sequence: bool = False
    heads_ok: Callable[[int, int, int], bool] | None = None
    uses_pallas: Callable[[Mapping[str, Any]], bool] = lambda options: False
    model_options: tuple[str, ...] = ()

    def placement(self, options: Mapping[str, Any], causal: bool) -> str | None:
        """How tokens are placed on the sequence shards (None: this impl does not place)."""
        if "placement" not in self.options:
            return None
        return options.get("placement", "zigzag" if causal else "contiguous")


IMPLS: dict[str, AttentionImpl] = {}


def register(impl: AttentionImpl) -> AttentionImpl:
    if impl.name in IMPLS:
        raise ValueError(f"attention impl {impl.name!r} registered twice")
    IMPLS[impl.name] = impl
    return impl


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def option_problems(impl: str, options: Mapping[str, Any], *, model: bool = False
                    ) -> list[Problem]:
    """What is wrong with `impl` and its options (model: the model's options count too)."""
    if impl not in IMPLS:
        return [("impl", impl, f"must be one of {', '.join(sorted(IMPLS))}")]
    entry = IMPLS[impl]
    allowed = entry.options + (entry.model_options if model else ())
    values = {"layout": LAYOUTS, "placement": PLACEMENTS, "ring_inner": RING_INNER}
    out: list[Problem] = []
    for key, value in options.items():
        if key not in allowed:
            out.append((key, value, f"impl {impl!r} accepts {', '.join(allowed) or 'no options'}"))
        elif key in ("block_q", "block_k") and not _positive_int(value):
            out.append((key, value, "must be a positive int"))
        elif key in values and value not in values[key]:
            out.append((key, value, f"must be one of {', '.join(values[key])}"))
        elif key == "kernel" and value not in (None, *KERNELS):
            out.append((key, value, f"must be None (the backend decides) or one of "
                                    f"{', '.join(KERNELS)}"))
        elif key == "interpret" and not isinstance(value, bool):
            out.append((key, value, "must be a bool"))
    return out


def sequence_problems(impl: str, options: Mapping[str, Any], *, seq: int, shards: int,
                      causal: bool = True, layout: str = "natural", heads: int | None = None,
                      kv_heads: int | None = None, axis: str = "sequence") -> list[Problem]:
    """What stops `impl` from running `seq` tokens over `shards` sequence shards of the
    mesh axis `axis`: the length the placement needs, the heads split, and blocks that
    must divide the per-device length. Options are assumed valid (`option_problems`)."""
    entry = IMPLS[impl]
    if not entry.sequence_parallel:
        shards = 1
    placement = entry.placement(options, causal)
    multiple = (placement_multiple(placement, shards) if placement and layout == "natural"
                else shards)
    if seq % multiple:
        how = f" with placement {placement!r}" if placement else ""
        return [("seq", seq, f"impl {impl!r}{how} over {shards} {axis!r} shards needs a "
                             f"multiple of {multiple}")]
    out: list[Problem] = []
    if heads is not None and entry.heads_ok and not entry.heads_ok(heads, kv_heads, shards):
        out.append(("heads/kv_heads", (heads, kv_heads),
                    f"{impl} over {shards} shards needs heads divisible by {shards} and kv_heads "
                    "either divisible by it or dividing it"))
    local = seq if entry.whole_sequence else seq // shards
    for key in ("block_q", "block_k"):
        block = options.get(key)
        if block is not None and local % min(block, local):
            out.append((key, block, f"must divide the per-device sequence length {local}"))
    return out
