"""The study's frequency-band diagnostic: which rotations each band scaling changes."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments", "rope_scaling"))
from passkey_probe import band_scalings  # noqa: E402

from lctx import model as lm  # noqa: E402
from lctx.eval.api import with_rope_scaling  # noqa: E402
from lctx.model.rope import inverse_frequencies  # noqa: E402

CONFIG = lm.preset("small", max_position_embeddings=256)
THETA = 10000.0 ** (-np.arange(0, CONFIG.head_dim, 2, dtype=np.float64) / CONFIG.head_dim)
WAVELENGTH = 2 * np.pi / THETA


@pytest.mark.parametrize("name,lo,hi", [("0-8", 0, 8), ("8-16", 8, 16), ("32-64", 32, 64),
                                        (">=256", 256, np.inf), (">=8", 8, np.inf),
                                        (">=0", 0, np.inf)])
def test_band_scaling_divides_exactly_the_band_at_every_length(name, lo, hi):
    scaled = with_rope_scaling(CONFIG, band_scalings(CONFIG, 4.0, 256)[name])
    chosen = (WAVELENGTH >= lo) & (WAVELENGTH < hi)
    assert chosen.any()
    for length in (128, 256, 4096):
        inv_freq, attention_factor = inverse_frequencies(scaled.rope, CONFIG.head_dim, length)
        np.testing.assert_allclose(inv_freq, np.where(chosen, THETA / 4, THETA), rtol=1e-12)
        assert attention_factor == 1.0


def test_bands_partition_the_frequencies_and_all_of_them_is_pi():
    scalings = band_scalings(CONFIG, 4.0, 256)
    single = [n for n in scalings if "-" in n] + [">=256"]
    counts = sum(np.asarray(scalings[n]["short_factor"]) == 4.0 for n in single)
    np.testing.assert_array_equal(counts, np.ones(CONFIG.head_dim // 2))
    pi = with_rope_scaling(CONFIG, {"rope_type": "linear", "factor": 4.0})
    every = with_rope_scaling(CONFIG, scalings[">=0"])
    np.testing.assert_allclose(inverse_frequencies(every.rope, CONFIG.head_dim, 1024)[0],
                               inverse_frequencies(pi.rope, CONFIG.head_dim, 1024)[0], rtol=1e-12)
