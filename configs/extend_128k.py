"""Pretrain at 8K, then extend to 128K with YaRN and ring attention, on a TPU v4-32 slice.

Stage `extend` runs ring attention over a 16-way sequence axis: each chip holds
131072 / 16 = 8192 tokens, above the ring's overlap threshold on v4 (block >=
peak / link bandwidth ~ 275e12 / 268e9 ~ 1K tokens; ~6K per device for a full
overlap, Liu et al. Table 2). Memory per chip (32 GiB HBM):
- parameters + AdamW sharded over fsdp x sequence (16): 0.93 GB; gradients 0.31 GB
- activations, remat="full": 8192 local tokens x 2048 x 2 bytes x 16 layers = 0.54 GB
- ring working set per layer: q shard + two K/V shards in flight + fp32 dK/dV
  accumulators: 8192 x (32 + 4 x 8) heads x 64 x 4 bytes ~ 0.13 GB
- chunked loss: no [131072, 128256] logits (67 GB in fp32)
The global batch of 4 sequences is 4 micro-batches of one 128K sequence.
"""

from lctx.training.config import base_config, stage


def get_config():
    c = base_config()
    c.name = "extend_128k"
    c.model.preset = "llama3_1b"
    c.model.attention_impl = "blockwise"
    c.model.attention_options.block_q = 512
    c.model.attention_options.block_k = 512
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.data.tfds_name = "pg19"
    c.data.tfds_data_dir = "/mnt/disks/data/tensorflow_datasets"
    c.data.tokenizer = "/mnt/disks/data/llama3/tokenizer.json"
    c.stage_order = ("pretrain", "extend")
    c.stages.pretrain = stage(seq_len=8192, batch_size=16, steps=20000, learning_rate=3e-4,
                              warmup_steps=1000, rope_scaling={"rope_type": "default"})
    # YaRN s = 16 from L = 8192 (YaRN's recipe: a few hundred steps suffice), only
    # windows from documents of at least 128K tokens, on a 16-way sequence mesh.
    c.stages.extend = stage(
        seq_len=131072, batch_size=4, grad_accum_steps=4, steps=400, learning_rate=2e-5,
        warmup_steps=20, schedule="constant", min_doc_len=131072,
        rope_scaling={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192},
        model={"attention_impl": "ring", "max_position_embeddings": 131072,
               "attention_options": {"block_q": 1024, "block_k": 1024}},
        mesh={"data": 1, "fsdp": 1, "sequence": -1, "tensor": 1})
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
    c.eval.lengths = (8192, 32768, 65536, 131072)
    c.eval.stride = 4096
    c.eval.max_tokens = 65536
    c.eval.batch_size = 1  # one 128K window per forward pass fits; the default 4 may not
    return c
