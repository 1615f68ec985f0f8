"""Long-sequence memory discipline, from XLA's memory analysis of compiled train steps.

Nothing runs: each train step (chunked loss, gradients, AdamW update, donated state)
is compiled and its peak bytes read. Growth per doubling is only clean from 2K
tokens on (below, fixed buffers dominate).
"""

from __future__ import annotations

import pytest

from lctx.bench.memory import GROWTH_LIMIT, long_context_config, train_step_bytes


def test_blockwise_train_step_grows_at_most_2_2x_per_doubling():
    config = long_context_config("blockwise", ffn_chunk=1024)
    peaks = [train_step_bytes(config, seq) for seq in (2048, 4096, 8192)]
    growth = [b / a for a, b in zip(peaks, peaks[1:])]
    assert all(g <= GROWTH_LIMIT for g in growth), growth


@pytest.mark.slow
def test_reference_train_step_grows_quadratically():
    # The same analysis does see dense attention's scores: about 4x per doubling.
    config = long_context_config("reference", ffn_chunk=1024)
    small, large = (train_step_bytes(config, seq) for seq in (4096, 8192))
    assert large / small > 3.0
