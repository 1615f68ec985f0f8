"""Activation beacons on SmolLM2-135M: train only the beacon module, the model frozen.

    python -m lctx.train --config=configs/beacon_smollm2.py             # ~2.5 CPU hours
    python -m lctx.train --config=configs/beacon_smollm2.py --config.stages.beacon.steps=4

SmolLM2-135M-Instruct (the registered GGUF, float32) stays frozen; the beacon module
(lctx.model.beacon: a beacon embedding and per-layer q/k/v/o initialised from the
model's, 26.5M parameters) is the only thing in the optimizer. Windows of 4096 tokens
of the standard-library training split are read in chunks of 1024, each chunk at a
ratio drawn from 2, 4, 8, 16 (the paper's per-chunk sampling). 48 steps of one window
are 197K tokens, about 2.3 hours on a 2-core CPU (~170 s a step, measured). It ends by writing
runs/beacon_smollm2/beacon.msgpack and evaluating held-out perplexity and passkey read
through it at ratio 8; the module then serves any beacon spec:

    python -m lctx.generate --model=smollm2-135m --prompt=... \
        --kv_cache=beacon:ratio=8,chunk=1024,params=runs/beacon_smollm2/beacon.msgpack
"""

from lctx.training.config import base_config, stage


def get_config():
    c = base_config()
    c.name = "beacon_smollm2"
    c.init_from = "smollm2-135m"
    c.model.preset = "smollm2_135m"
    c.data.tokenizer = "model"
    c.beacon.ratios = (2, 4, 8, 16)
    c.beacon.chunk = 1024
    c.stage_order = ("beacon",)
    c.stages.beacon = stage(seq_len=4096, batch_size=1, steps=48, learning_rate=1e-4,
                            warmup_steps=4, schedule="cosine")
    c.optimizer.weight_decay = 0.0  # the module starts as a copy of trained weights
    c.checkpoint.every_steps = 4  # a step takes minutes on a CPU
    c.log_every_steps = 1
    c.eval.kv_cache = "beacon:ratio=8,chunk=1024"  # params: this run's module
    c.eval.tasks = ("ppl", "passkey")
    c.eval.lengths = (4096, 8192)
    c.eval.stride = 4096
    c.eval.max_tokens = 8192
    c.eval.batch_size = 1
    c.eval.depths = (0.0, 0.5, 1.0)
    c.eval.trials = 1
    return c
