"""Pretrain a LLaMA-3-1B-class model at 8K tokens on a TPU v4-32 slice (16 chips).

Memory per chip (v4: 32 GiB HBM), FSDP over all 16 chips (the rules shard params
over fsdp x sequence):
- parameters + AdamW: 1.24e9 x (4 fp32 weights + 8 moments) = 14.8 GB / 16 = 0.93 GB
- gradients (fp32, sharded like params): 0.31 GB
- activations with remat="full" (each layer's bf16 input kept): per chip 1 sequence
  x 8192 tokens x 2048 x 2 bytes x 16 layers = 0.54 GB, plus one layer's working set
  (blockwise attention tiles, MLP chunk of 8192 x 8192 bf16 = 134 MB)
- the chunked loss never holds [8192, 128256] float32 logits (4.2 GB)
About 3 GB of 32: room for a larger per-chip batch; 16 x 8192 = 131K tokens a step.
"""

from lctx.training.config import base_config, stage


def get_config():
    c = base_config()
    c.name = "pretrain_8k"
    c.model.preset = "llama3_1b"
    c.model.attention_impl = "blockwise"
    c.model.attention_options.block_q = 512
    c.model.attention_options.block_k = 512
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.mesh.data = 1
    c.mesh.fsdp = -1  # all chips
    c.data.tfds_name = "pg19"  # prepared beforehand in array_record format
    c.data.tfds_data_dir = "/mnt/disks/data/tensorflow_datasets"
    c.data.tokenizer = "/mnt/disks/data/llama3/tokenizer.json"
    c.stage_order = ("pretrain",)
    # Plain RoPE (theta 500000) at the pretraining length; extend_128k.py scales it.
    c.stages.pretrain = stage(seq_len=8192, batch_size=16, steps=20000, learning_rate=3e-4,
                              warmup_steps=1000, schedule="cosine",
                              rope_scaling={"rope_type": "default"})
    c.checkpoint.every_steps = 500
    c.log_every_steps = 50
    c.eval.lengths = (2048, 4096, 8192, 16384)
    c.eval.stride = 1024
    return c
