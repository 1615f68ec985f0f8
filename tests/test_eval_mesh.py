"""Perplexity with a sequence-parallel impl on a data x sequence mesh equals the reference."""

import jax
import numpy as np

import lctx.model as lm
from lctx.data import ByteTokenizer
from lctx.eval.perplexity import perplexity_by_length
from lctx.parallel import make_mesh


def test_ring_perplexity_on_a_data_by_sequence_mesh_equals_reference():
    # batch_size 1 on a mesh with data=2: the batch is padded with masked rows, which
    # must not change the perplexity.
    rng = np.random.default_rng(1)
    texts = [{"text": "".join(chr(c) for c in rng.integers(97, 123, n))} for n in (70, 53)]
    reference = lm.preset("tiny", attention_impl="reference")
    ring = reference.replace(attention_impl="ring")
    params = lm.init(reference, jax.random.key(0))
    kwargs = dict(lengths=(16, 32), stride=8, max_tokens=10_000, batch_size=1)
    expected = perplexity_by_length(reference, params, texts, ByteTokenizer(), **kwargs)
    got = perplexity_by_length(ring, params, texts, ByteTokenizer(),
                               mesh=make_mesh(data=2, sequence=4), **kwargs)
    for length in ("16", "32"):
        assert got[length]["tokens"] == expected[length]["tokens"]
        np.testing.assert_allclose(got[length]["ppl"], expected[length]["ppl"], rtol=1e-5)
