"""The README's main job: pretrain a small model at 256 tokens, extend it to 1024 with YaRN.

The `small` preset (about 3.2M parameters, byte-level) on this Python's standard
library source (built into a TFDS dataset on first use; nothing is downloaded).
Finishes in about 10 minutes on a 2-core CPU and prints held-out perplexity and
bits per byte at 256, 512, 1024 and 2048 tokens next to the corpus's unigram
bits per byte, and passkey / needle accuracy at the same lengths (runs/quickstart/eval/).
"""

from lctx.training.config import base_config, stage


def get_config():
    c = base_config()
    c.name = "quickstart"
    c.model.preset = "small"
    c.model.attention_impl = "blockwise"
    c.model.attention_options.block_q = 256  # one tile per 256 tokens: few loop steps on CPU
    c.model.attention_options.block_k = 256
    c.data.corpus_dir = ""  # the standard library
    # 10% of the tokens are synthetic passkey / needle documents, so the small model
    # learns the retrieval formats the evaluation asks about (lctx.data.synthetic).
    c.data.mix.fraction = 0.1
    c.stage_order = ("pretrain", "extend")
    # 256-token windows, 16 per batch: 4K tokens a step, 1.2M tokens in all.
    c.stages.pretrain = stage(seq_len=256, batch_size=16, steps=300, learning_rate=3e-3,
                              warmup_steps=30, schedule="cosine")
    # YaRN from the pretraining length (256) to 4x; windows only from files >= 1024 tokens.
    c.stages.extend = stage(seq_len=1024, batch_size=8, steps=16, learning_rate=1e-3,
                            warmup_steps=4, schedule="cosine", min_doc_len=1024,
                            rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 256})
    c.checkpoint.every_steps = 100
    c.log_every_steps = 25
    c.eval.lengths = (256, 512, 1024, 2048)
    c.eval.stride = 256
    c.eval.max_tokens = 32768
    c.eval.batch_size = 8
    c.eval.tasks = ("ppl", "passkey", "needle")  # results.json and PNGs in runs/quickstart/eval
    c.eval.depths = (0.0, 0.5, 1.0)
    c.eval.trials = 2
    return c
