"""llama.cpp GGUF files (llama architecture) -> lctx `(ModelConfig, params)` and tokenizer.

    config, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # float32 host arrays
    tokenizer = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

The metadata becomes a Hugging Face LLaMA `config.json` dict and every tensor is
dequantized to float32 (`gguf.quants.dequantize`: F32, F16, BF16, Q4_0 ... Q8_0, the
K-quants, the IQ types) and read under its HF name, so the HF converter's
`config_from_hf` and `params_from_hf` build the model: one weight table for both formats.

    token_embd            model.embed_tokens          output_norm  model.norm
    blk.i.attn_norm       ...input_layernorm          output       lm_head (absent: tied)
    blk.i.attn_{q,k,v}    ...self_attn.{q,k,v}_proj   blk.i.ffn_norm   ...post_attention_layernorm
    blk.i.attn_output     ...self_attn.o_proj         blk.i.ffn_{gate,up,down}  ...mlp.*_proj

GGML lists a tensor's dimensions fastest-first, so a dequantized `[rows, cols]`
array is already HF's `[out, in]`. llama.cpp's converter permutes the rows of
q_proj and k_proj per head for its interleaved RoPE (pairs (2i, 2i+1)); lctx, like
HF, rotates pairs (i, i + hd/2), so the import undoes that permutation.

The tokenizer (byte-level BPE, `tokenizer.ggml.model == "gpt2"`) is rebuilt with the
`tokenizers` library from the vocabulary, merges, token types and the pre-tokenizer
that `tokenizer.ggml.pre` names, and keeps `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lctx.convert.hf import config_from_hf, expected_hf_shapes, params_from_hf
from lctx.data.tokenizer import HuggingFaceTokenizer
from lctx.model.config import ModelConfig

__all__ = ["GGUFFile", "hf_config_from_gguf", "load_gguf", "tokenizer_from_gguf",
           "tokenizer_json_from_gguf", "unpermute_rope_rows"]

Params = dict[str, Any]
ARCHITECTURE = "llama"
# HF name pattern -> GGUF name ("{i}": the layer).
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of an HF LLaMA tensor name."""
    match = _LAYER.search(hf_name)
    pattern = hf_name if match is None else _LAYER.sub(".layers.{i}.", hf_name, count=1)
    return _GGUF_NAMES[pattern].format(i=match.group(1) if match else "")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: `[n_heads * hd, D]` -> HF row order.

    llama.cpp stores head h's rows as (r0, r_{hd/2}, r1, r_{hd/2+1}, ...), i.e.
    `w.reshape(n, 2, hd/2, D).swapaxes(1, 2)`; this swaps the two axes back.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """A GGUF file's metadata (`.meta`: name -> Python value) and its tensors, read lazily.

    Raises ValueError when the file is missing or not a GGUF file.
    """

    def __init__(self, path: str | os.PathLike):
        import gguf  # the reader and the dequantizers (llama.cpp's own package)

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as err:  # the reader raises ValueError / struct / numpy errors
            raise ValueError(f"{self.path}: not a readable GGUF file "
                             f"({type(err).__name__}: {_one_line(err)})") from None
        self.meta: dict[str, Any] = {
            name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}
        self.tensors = {t.name: t for t in reader.tensors}

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in HF orientation (`[rows, cols]`, cols fastest)."""
        import gguf

        if name not in self.tensors:
            raise ValueError(f"{self.path}: tensor {name!r} is missing")
        tensor = self.tensors[name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as err:
            raise ValueError(f"{self.path}: tensor {name!r} has type {tensor.tensor_type.name}, "
                             f"which gguf cannot dequantize ({_one_line(err)})") from None
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return np.asarray(values, np.float32).reshape(shape)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _rope_scaling(meta: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    """HF `rope_scaling` from llama.cpp's `{arch}.rope.scaling.*` keys (None: plain RoPE)."""
    kind = meta.get(prefix + "rope.scaling.type", "none")
    factor = meta.get(prefix + "rope.scaling.factor", meta.get(prefix + "rope.scale_linear"))
    if kind == "none" and factor is None:
        return None
    if kind in ("none", "linear"):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = meta.get(prefix + "rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        if meta.get(prefix + "rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(meta[prefix + "rope.scaling.attn_factor"])
        return scaling
    raise ValueError(f"{prefix}rope.scaling.type={kind!r}: lctx reads 'none', 'linear' and 'yarn'")


def hf_config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A Hugging Face LlamaForCausalLM `config.json` dict from GGUF metadata.

    Raises ValueError naming a non-llama architecture or a missing required key.
    """
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"general.architecture={arch!r}: lctx reads llama-architecture GGUF "
                         "files only")
    p = f"{ARCHITECTURE}."
    required = ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
    missing = [p + key for key in required if p + key not in meta]
    if missing:
        raise ValueError(f"metadata {missing}: missing (required for a llama model)")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("tensor 'rope_freqs.weight' (llama.cpp's per-frequency RoPE factors, "
                         "Llama 3.1 style): not supported; pass rope_scaling instead")
    heads = int(meta[p + "attention.head_count"])
    d_model = int(meta[p + "embedding_length"])
    head_dim = int(meta.get(p + "attention.key_length", d_model // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens) if tokens else int(meta[p + "vocab_size"]),
        "hidden_size": d_model,
        "intermediate_size": int(meta[p + "feed_forward_length"]),
        "num_hidden_layers": int(meta[p + "block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "rope_scaling": _rope_scaling(meta, p),
    }
    rotary = meta.get(p + "rope.dimension_count", head_dim)
    if rotary != head_dim:  # config_from_hf refuses partial rotary with one clear line
        hf["partial_rotary_factor"] = rotary / head_dim
    return hf


def _reader(file: GGUFFile, config: ModelConfig) -> Callable[[str], np.ndarray]:
    """`read(hf_name) -> float32 [out, in]` over the file: q/k rows in HF order, shapes checked."""
    shapes = expected_hf_shapes(config)

    def read(hf_name: str) -> np.ndarray:
        w = file.dequantized(gguf_name(hf_name))
        if w.shape != shapes[hf_name]:
            raise ValueError(f"{file.path}: tensor {gguf_name(hf_name)!r} has shape "
                             f"{list(w.shape[::-1])} (GGML order), expected "
                             f"{list(shapes[hf_name][::-1])}")
        if ".self_attn.q_proj." in hf_name:
            return unpermute_rope_rows(w, config.n_heads)
        if ".self_attn.k_proj." in hf_name:
            return unpermute_rope_rows(w, config.n_kv_heads)
        return w
    return read


def load_gguf(source: str | os.PathLike | GGUFFile, *, param_dtype: str = "float32",
              **overrides: Any) -> tuple[ModelConfig, Params]:
    """(config, params) of a llama-architecture GGUF file, weights dequantized.

    param_dtype: dtype of the returned host NumPy params (and the compute dtype
    unless `overrides` set `dtype`); `overrides` set other ModelConfig fields.
    Raises ValueError (one line) for an unreadable file, a non-llama architecture,
    a tensor type gguf cannot dequantize, or a missing or misshapen tensor.
    """
    file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    try:
        hf = hf_config_from_gguf(file.meta, set(file.tensors))
        config = config_from_hf(hf, **{"param_dtype": param_dtype, "dtype": param_dtype,
                                       **overrides})
    except ValueError as err:
        raise ValueError(f"{file.path}: {'; '.join(str(err).splitlines())}") from None
    return config, params_from_hf(config, _reader(file, config), config.weights_dtype)


# ----------------------------------------------------------------------------- tokenizer

# `tokenizer.ggml.pre` -> the split before byte-level BPE (as llama.cpp's llama-vocab
# does it). "gpt2": GPT-2's regex alone; the digit family isolates every digit first.
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", *_DIGITS_FIRST)
# llama.cpp token types.
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(name: str) -> dict[str, Any]:
    """The tokenizer.json `pre_tokenizer` for llama.cpp's pre-tokenizer `name`."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": True}
    if name in ("default", "gpt2", "gpt-2"):
        return byte_level
    if name in _DIGITS_FIRST:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    raise ValueError(f"tokenizer.ggml.pre={name!r}: not supported; lctx reads "
                     f"{', '.join(PRE_TOKENIZERS)}")


def tokenizer_json_from_gguf(meta: Mapping[str, Any]) -> str:
    """A `tokenizer.json` (byte-level BPE) from GGUF tokenizer metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={model!r}: lctx reads byte-level BPE ('gpt2') "
                         "GGUF tokenizers only")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [merge.split(" ", 1) for merge in meta.get("tokenizer.ggml.merges", [])]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": kind == _CONTROL}
             for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default")),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": merges},
    }
    return json.dumps(spec, ensure_ascii=False)


def tokenizer_config_from_gguf(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A `tokenizer_config.json` dict: special tokens, add_bos_token, chat_template."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {}
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[f"{kind}_token"] = tokens[int(token_id)]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if meta.get("tokenizer.chat_template") is not None:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def tokenizer_from_gguf(source: str | os.PathLike | GGUFFile) -> HuggingFaceTokenizer:
    """The tokenizer a GGUF file describes, as an lctx HuggingFaceTokenizer."""
    file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    try:
        return HuggingFaceTokenizer.from_json(
            tokenizer_json_from_gguf(file.meta), tokenizer_config_from_gguf(file.meta),
            name=str(file.path))
    except (ValueError, KeyError) as err:
        raise ValueError(f"{file.path}: {_one_line(err)}") from None
