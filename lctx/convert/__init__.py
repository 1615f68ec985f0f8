"""Hugging Face LLaMA checkpoint import/export (needs the `hf` extra for safetensors) and
GGUF import (needs `gguf`).

    from lctx.convert import load_gguf, load_llama, save_llama
    config, params = load_llama("path/to/hf_llama_dir")      # -> lctx.model.forward(config, params, ...)
    config, params = load_gguf("model.Q4_1.gguf")             # dequantized to float32
    save_llama(config, params, "out_dir")                     # -> LlamaForCausalLM.from_pretrained

Command line (through orbax checkpoints): `python -m lctx.convert --help`.
"""

from lctx.convert.checkpoint import load_checkpoint, save_checkpoint
from lctx.convert.gguf import load_gguf, tokenizer_from_gguf
from lctx.convert.hf import config_from_hf, config_to_hf, load_llama, save_llama

__all__ = ["config_from_hf", "config_to_hf", "load_checkpoint", "load_gguf", "load_llama",
           "save_checkpoint", "save_llama", "tokenizer_from_gguf"]
