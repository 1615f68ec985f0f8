"""Extend a converted Llama-3-8B checkpoint from 8K to 128K tokens on a TPU v4-64 slice (32 chips).

First convert the Hugging Face checkpoint (nothing is downloaded by lctx):
  python -m lctx.convert hf-to-lctx --hf_dir=/mnt/disks/data/Meta-Llama-3-8B \\
      --out=/mnt/disks/data/llama3_8b_lctx --param_dtype=bfloat16
Mesh: sequence 16 x fsdp 2. Memory per chip (32 GiB HBM):
- parameters fp32 + AdamW: 8.03e9 x 12 bytes = 96 GB / 32 = 3.0 GB; gradients 1.0 GB
- activations, remat="full": 131072 / 16 = 8192 tokens x 4096 x 2 bytes x 32 layers = 2.1 GB
- one layer's working set: MLP chunk 8192 x 14336 bf16 x 3 = 0.7 GB, ring shards ~0.1 GB
About 8 GB of 32. Llama 3 was trained at 8K with theta 500000; llama3-style scaling
with factor 16 covers 128K (Llama 3.1 used 8 with a longer pretraining recipe).
"""

from lctx.training.config import base_config, stage


def get_config():
    c = base_config()
    c.name = "extend_llama3_8b_128k"
    c.init_from = "/mnt/disks/data/llama3_8b_lctx"
    c.model.preset = "llama3_8b"
    c.model.attention_impl = "ring"
    c.model.attention_options.block_q = 1024
    c.model.attention_options.block_k = 1024
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.model.max_position_embeddings = 131072
    c.mesh.data, c.mesh.fsdp, c.mesh.sequence, c.mesh.tensor = 1, 2, -1, 1
    c.data.tfds_name = "pg19"
    c.data.tfds_data_dir = "/mnt/disks/data/tensorflow_datasets"
    c.data.tokenizer = "/mnt/disks/data/Meta-Llama-3-8B/tokenizer.json"
    c.stage_order = ("extend",)
    c.stages.extend = stage(
        seq_len=131072, batch_size=8, grad_accum_steps=4, steps=400, learning_rate=2e-5,
        warmup_steps=20, schedule="constant", min_doc_len=131072,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    c.checkpoint.every_steps = 50
    c.log_every_steps = 5
    c.eval.lengths = (8192, 32768, 65536, 131072)
    c.eval.stride = 4096
    c.eval.max_tokens = 65536
    c.eval.batch_size = 1  # one 128K window per forward pass fits; the default 4 may not
    return c
