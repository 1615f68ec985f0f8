"""Tiny two-stage run for tests, notebooks and multi-process checks (seconds on CPU).

The `tiny` model on the small corpus shipped with the tests: pretrain at 64 tokens,
then extend to 128 with linear position interpolation.
"""

import os

from lctx.training.config import base_config, stage

_TEST_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "tests", "data", "corpus")


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.preset = "tiny"
    c.model.attention_options.block_q = 32  # tiles that divide every stage's length
    c.model.attention_options.block_k = 32
    c.data.corpus_dir = _TEST_CORPUS
    c.data.validation_fraction = 0.25  # the shipped corpus is a handful of files
    c.stage_order = ("pretrain", "extend")
    c.stages.pretrain = stage(seq_len=64, batch_size=8, steps=6, learning_rate=3e-3, warmup_steps=2)
    c.stages.extend = stage(seq_len=128, batch_size=8, steps=4, learning_rate=1e-3,
                            rope_scaling={"rope_type": "linear", "factor": 2.0})
    c.checkpoint.every_steps = 3
    c.log_every_steps = 1
    c.eval.lengths = (32, 64)
    c.eval.stride = 16
    c.eval.max_tokens = 2048
    return c
