"""HF config <-> ModelConfig mapping, lctx checkpoints and the CLI's parsing: no torch needed.

Runs without the `hf` extra (the safetensors round trip skips when safetensors is
absent); parity with transformers itself is in test_convert.py.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import numpy as np
import pytest

import lctx.model as lm
from lctx.convert import config_from_hf, config_to_hf, load_checkpoint, save_checkpoint
from lctx.convert.checkpoint import config_from_dict, config_to_dict
from lctx.convert.cli import parse_size
from lctx.convert.hf import expected_hf_shapes, weight_specs
from lctx.model.rope import RopeConfig

# Published config.json files (values as on the Hugging Face hub), as transformers 4.x wrote them.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "vocab_size": 32000,
}
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_dim", "tie_embeddings", "max_position_embeddings", "norm_eps")


@pytest.mark.parametrize("hf, name", [(LLAMA_3_2_1B, "llama3_1b"), (LLAMA_2_7B, "llama2_7b")])
def test_published_configs_match_presets(hf, name):
    config, preset = config_from_hf(hf), lm.preset(name)
    for field in SHAPE_FIELDS:
        assert getattr(config, field) == getattr(preset, field), field
    inv, factor = config.rope, preset.rope
    for field in ("rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings"):
        assert getattr(inv, field) == getattr(factor, field), field
    assert lm.param_count(config) == {"llama3_1b": 1_235_814_400,
                                      "llama2_7b": 6_738_415_616}[name]


def test_legacy_type_key_and_defaults():
    hf = {**LLAMA_2_7B, "rope_scaling": {"type": "linear", "factor": 4}}
    del hf["num_key_value_heads"], hf["rms_norm_eps"]
    config = config_from_hf(hf)
    assert config.rope.rope_type == "linear" and config.rope.factor == 4
    assert config.n_kv_heads == 32  # transformers: absent means multi-head attention
    assert config.norm_eps == 1e-6  # LlamaConfig's default


def test_head_dim_apart_from_hidden_size():
    """Qwen3-0.6B's attention shapes on a LLaMA: 16 heads of 128 on hidden 1024 (q and o
    project through 2048); head_dim is read from config.json and written back."""
    hf = {**LLAMA_3_2_1B, "hidden_size": 1024, "num_attention_heads": 16,
          "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
          "num_hidden_layers": 28, "vocab_size": 151936}
    config = config_from_hf(hf)
    assert (config.d_model, config.n_heads, config.head_dim) == (1024, 16, 128)
    shapes = expected_hf_shapes(config)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (2048, 1024)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 1024)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (1024, 2048)
    assert config_to_hf(config)["head_dim"] == 128
    # Qwen3-0.6B without its q/k norms (2 x 128 per layer): 596,049,920 parameters.
    assert lm.param_count(config) == 596_049_920 - 28 * 2 * 128


ROPES = [
    RopeConfig(),
    RopeConfig(rope_type="linear", factor=4, rope_theta=5e5),
    RopeConfig(rope_type="dynamic", factor=2.0, max_position_embeddings=256),
    RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16,
               mscale=0.707, mscale_all_dim=0.707, truncate=False),
    RopeConfig(rope_type="yarn", factor=4.0, attention_factor=1.2, max_position_embeddings=256),
    RopeConfig(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=64),
    RopeConfig(rope_type="longrope", factor=4.0, original_max_position_embeddings=64,
               short_factor=[1.0] * 8, long_factor=[1.5 + i for i in range(8)]),
]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r.rope_type)
def test_hf_config_round_trip(rope):
    config = lm.preset("tiny", rope=rope, head_dim=16)
    hf = json.loads(json.dumps(config_to_hf(config)))  # through real JSON
    assert "rope_parameters" not in hf and hf["architectures"] == ["LlamaForCausalLM"]
    back = config_from_hf(hf, param_dtype=config.param_dtype, dtype=config.dtype)
    # HF holds one context length; it comes back on the rope as well.
    assert back == config.replace(rope=back.rope)
    assert back.rope.to_hf() == rope.to_hf() | {"max_position_embeddings": 256}
    if rope.rope_type == "linear":  # ints are written as floats (transformers warns on ints)
        assert isinstance(hf["rope_scaling"]["factor"], float)


@pytest.mark.parametrize("change, match", [
    (dict(rope=RopeConfig(rope_type="ntk", factor=2.0)), "'ntk': static NTK has no Hugging Face"),
    (dict(sliding_window=16), "sliding_window=16: HF LLaMA has no sliding window"),
    (dict(rope=RopeConfig(partial_rotary_factor=0.5)), "partial_rotary_factor=0.5"),
])
def test_export_refuses_what_hf_llama_cannot_express(change, match):
    with pytest.raises(ValueError, match=match):
        config_to_hf(lm.preset("tiny", **change))


@pytest.mark.parametrize("edit, match", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"),
     r"architectures=\['MistralForCausalLM'\] \(model_type='mistral'\) is not supported"),
    (dict(architectures=["LlamaForCausalLM", "Extra"]), "is not supported"),
    (dict(architectures=None, model_type=None), "neither architectures nor model_type"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope: low_freq_factor=None: required for rope_type 'llama3'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "rope: factor=0.5: must be >= 1"),
    (dict(rope_scaling=[1, 2]), r"rope_scaling=\[1, 2\]: must be an object"),
    (dict(head_dim=15), "head_dim=15: must be a positive even int"),
])
def test_bad_hf_configs(edit, match):
    hf = {k: v for k, v in {**LLAMA_3_2_1B, **edit}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_weight_table_covers_the_param_tree():
    for tied in (False, True):
        config = lm.preset("tiny", tie_embeddings=tied, n_kv_heads=1)
        abstract = jax.eval_shape(functools.partial(lm.init, config), jax.random.key(0))
        shapes = jax.tree.map(lambda x: x.shape, abstract)
        table = {spec.path: ((config.n_layers,) if spec.per_layer else ()) + spec.lctx_shape
                 for spec in weight_specs(config)}
        flat = {tuple(k.key for k in path): v
                for path, v in jax.tree_util.tree_flatten_with_path(
                    shapes, is_leaf=lambda x: isinstance(x, tuple))[0]}
        assert flat == table
        hf = expected_hf_shapes(config)
        assert len(hf) == 2 + 9 * config.n_layers + (0 if tied else 1)
        assert hf["model.layers.1.self_attn.k_proj.weight"] == (16, 64)


def test_model_config_json_round_trip():
    config = lm.preset("tiny", attention_impl="blockwise", attention_options={"block_q": 32},
                       rope=ROPES[-1], head_dim=16)
    data = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(data) == config
    with pytest.raises(ValueError, match=r"keys \['colour'\]: not ModelConfig fields"):
        config_from_dict({**data, "colour": "red"})


def test_lctx_checkpoint_round_trip(tmp_path):
    config = lm.preset("tiny", param_dtype="bfloat16")
    params = lm.init(config, jax.random.key(1))
    save_checkpoint(config, params, tmp_path / "ckpt")
    back_config, back = load_checkpoint(tmp_path / "ckpt")
    assert back_config == config
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="already exists"):
        save_checkpoint(config, params, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="model_config.json: missing"):
        load_checkpoint(tmp_path)


def test_safetensors_round_trip_without_torch(tmp_path):
    pytest.importorskip("safetensors", reason="needs safetensors (the `hf` extra)")
    from lctx.convert import load_llama, save_llama

    config = lm.preset("tiny", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 64})
    params = lm.init(config, jax.random.key(2))
    out = save_llama(config, params, tmp_path / "hf", max_shard_bytes=100_000)
    back_config, back = load_llama(out, attention_impl=config.attention_impl)
    assert back_config == config
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("1234") == 1234
    for bad in ("", "5XB", "-1", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
