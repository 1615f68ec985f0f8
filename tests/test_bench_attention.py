"""python -m lctx.bench.attention's parts: the public baseline and lctx's ring against
reference_attention, the ring's tiles per device, the targets read from rows, flags."""

import pytest

from lctx.bench import attention
from lctx.bench.attention_balance import ring_load_balance
from lctx.bench.attention_baseline import verify_baseline
from lctx.bench.attention_setup import Settings, attention_flops, make_mesh
from lctx.bench.attention_targets import TARGET_SEQ, evaluate_targets


def test_baseline_and_ring_match_the_reference():
    errors = verify_baseline(make_mesh(), causal=True, seq=256, heads=2, head_dim=16)
    for name in ("baseline", "ring"):
        assert errors[f"{name}_out_max_abs_err"] < 1e-5
        assert errors[f"{name}_grad_max_abs_err"] < 1e-4


def test_ring_tiles_per_device_by_placement():
    """Causal, 256 tokens in 16 chunks of 16 (one tile each), 8 devices. Contiguous:
    device d holds chunks 2d, 2d + 1, which see 2d + 1 and 2d + 2 chunks: 4d + 3 tiles.
    Zigzag: chunks d and 15 - d, which see d + 1 and 16 - d: 17 tiles on every device."""
    settings = Settings(impls=("ring",), lengths=(256,), heads=1, head_dim=8, block_q=(16,),
                        block_k=(16,))
    rows = {r["placement"]: r for r in ring_load_balance(settings, make_mesh())}
    assert rows["contiguous"]["tiles"] == [4 * d + 3 for d in range(8)]
    assert rows["zigzag"]["tiles"] == [17] * 8 and rows["zigzag"]["max_over_mean"] == 1.0


def _row(impl, seq, fwd_bwd_s, memory, **extra):
    return {"impl": impl, "seq": seq, "fwd_bwd_s": fwd_bwd_s, "blocks": "-",
            "fwd_bwd_memory": {"total": memory}, **extra}


def test_targets_from_rows():
    """The ring target takes the fastest ring and baseline rows at 8K (or the interleaved
    re-timing), memory growth the ratio per doubling from 2K."""
    rows = [_row("ring", TARGET_SEQ, 2.0, 100, chunk=None),
            _row("baseline", TARGET_SEQ, 3.0, 100, chunk=512),
            _row("baseline", TARGET_SEQ, 2.2, 100, chunk=256),
            _row("blockwise", 2048, 1.0, 100), _row("blockwise", 4096, 1.0, 210),
            _row("blockwise", 8192, 1.0, 480)]
    targets = evaluate_targets(rows, Settings())
    ring = targets["ring_vs_baseline"]
    assert ring["baseline_chunk"] == 256 and ring["speedup"] == pytest.approx(1.1)
    assert not ring["pass"]
    assert evaluate_targets(rows, Settings(), {"speedup": 1.4})["ring_vs_baseline"]["pass"]
    growth = targets["memory_growth"]["blockwise"]
    assert growth["ratios"] == {"2048->4096": 2.1, "4096->8192": pytest.approx(480 / 210)}
    assert not growth["pass"] and targets["standard_shape"]


def test_flops_and_flags():
    """Two matmuls of 2*B*H*S^2*D, halved when causal; --quick's lengths and repeats."""
    assert attention_flops(1, 2, 8, 4, causal=False) == 4 * 2 * 8 * 8 * 4
    assert attention_flops(1, 2, 8, 4, causal=True) == 2 * 2 * 8 * 8 * 4
    quick = attention.parse_settings(["--quick", "--impls", "ring,baseline"])
    assert quick.lengths == (2048, 4096) and quick.repeats == 2
    assert quick.impls == ("ring", "baseline") and quick.baseline_chunks == (256, 512)
