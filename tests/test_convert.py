"""Hugging Face LLaMA import/export: logits parity with transformers for every RoPE type.

Every model is a tiny random `LlamaForCausalLM` built here (nothing is downloaded):
hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16), vocab 128, intermediate 96,
max_position_embeddings 64 and (where the type has one) an original context of 32,
evaluated at 128 tokens, past both. Weights are redrawn at a scale where logits are
O(1), so a 1e-4 max-abs match is a real test of every transpose and of RoPE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network, whatever is called
REASON = "needs the `hf` extra (pip install -e '.[hf]', with torch==2.13.0 installed first)"
torch = pytest.importorskip("torch", reason=REASON)
transformers = pytest.importorskip("transformers", reason=REASON)
pytest.importorskip("safetensors", reason=REASON)

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import lctx.model as lm  # noqa: E402
from lctx.convert import config_to_hf, load_llama, save_llama  # noqa: E402
from lctx.model.rope import RopeConfig  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# transformers 5 renamed from_pretrained's `torch_dtype` to `dtype`.
DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
LONG = 128  # past max_position_embeddings (64) and every original context (32)
SHORT = 24  # inside the original context: longrope's short factors, dynamic unscaled
ORIGINAL = 32
MAX_POS = 64

# rope type -> HF `rope_scaling` (None: plain RoPE). yarn's max_position_embeddings is
# factor x original (transformers versions disagree otherwise).
ROPE_SCALING = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL,
             "beta_fast": 16.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "factor": 2.0,
                 "original_max_position_embeddings": ORIGINAL,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [1.0 + 0.5 * i for i in range(8)]},
}


# ----------------------------------------------------------------------------- helpers


def hf_config(rope_scaling=None, *, tie=False, rope_theta=10000.0, **extra):
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5, rope_theta=rope_theta, rope_scaling=rope_scaling,
        tie_word_embeddings=tie, attn_implementation="eager", **extra)


def random_llama(config, seed: int = 0):
    """A LlamaForCausalLM with every weight redrawn: projections N(0, 0.15^2), norms 1 + N(0, 0.1^2)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    return model


def save_hf(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def load_hf(path: Path):
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def tokens(length: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (batch, length), dtype=np.int32)


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(toks.astype(np.int64))).logits.float().numpy()


def lctx_logits(config, params, toks: np.ndarray) -> np.ndarray:
    return np.asarray(lm.forward(config, params, jnp.asarray(toks)))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def legacy_config(hf: dict) -> dict:
    """The same config in the pre-transformers-5 style: top-level rope_theta + rope_scaling."""
    hf = dict(hf)
    rope = dict(hf.pop("rope_parameters", None) or hf.get("rope_scaling") or {})
    hf["rope_theta"] = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    hf["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return hf


def new_style_config(hf: dict) -> dict:
    """The same config in the transformers-5 style: `rope_parameters` holding rope_theta."""
    hf = dict(hf)
    rope = dict(hf.pop("rope_scaling", None) or hf.get("rope_parameters") or
                {"rope_type": "default"})
    rope["rope_theta"] = hf.pop("rope_theta", rope.get("rope_theta", 10000.0))
    hf["rope_parameters"] = rope
    return hf


def rewrite_config(path: Path, edit) -> None:
    file = path / "config.json"
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("rope_type", list(ROPE_SCALING))
def test_import_export_logits_match_transformers(rope_type, tmp_path):
    scaling = ROPE_SCALING[rope_type]
    hf_model = random_llama(hf_config(scaling))
    src = save_hf(hf_model, tmp_path / "hf")

    config, params = load_llama(src)
    assert config.rope.rope_type == rope_type
    assert config.max_position_embeddings == MAX_POS
    # Ascending lengths on purpose: transformers' dynamic NTK caches frequencies for
    # the longest length seen so far, while lctx computes them from the static length
    # of each call (equal whenever HF has not seen a longer sequence before).
    for length in (SHORT, LONG):
        toks = tokens(length)
        expected = hf_logits(hf_model, toks)
        got = lctx_logits(config, params, toks)
        assert max_abs(got, expected) < ATOL, (rope_type, length)
    if rope_type != "default":  # the scaling matters at this length (else the test is weak)
        plain = transformers.LlamaForCausalLM(hf_config(None)).eval()
        plain.load_state_dict(hf_model.state_dict())
        assert max_abs(hf_logits(plain, toks), expected) > 1e-2, "scaling had no effect"

    # Both config.json styles read to the same config.
    for i, style in enumerate((legacy_config, new_style_config)):
        other = tmp_path / f"style{i}"
        shutil.copytree(src, other)
        rewrite_config(other, style)
        assert load_llama(other)[0] == config, style.__name__

    # Export: transformers loads it, tensors are bit-identical, logits equal lctx's.
    out = save_llama(config, params, tmp_path / "export")
    assert "rope_scaling" in json.loads((out / "config.json").read_text())
    exported = load_hf(out)
    state, original = hf_state(exported), hf_state(hf_model)
    assert state.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(state[name], original[name], err_msg=name)
    assert max_abs(hf_logits(exported, toks), got) < ATOL
    assert load_llama(out)[0] == config  # and the exported config reads back the same


def test_head_dim_apart_from_hidden_size(tmp_path):
    """Qwen3 / Gemma attention shapes: 4 heads of 32 on hidden 64, so q and o project
    through 128; import, logits and export against transformers."""
    hf_model = random_llama(hf_config(ROPE_SCALING["yarn"], head_dim=32))
    assert hf_model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    config, params = load_llama(save_hf(hf_model, tmp_path / "hf"))
    assert (config.d_model, config.n_heads, config.head_dim) == (64, 4, 32)
    toks = tokens(LONG)
    got = lctx_logits(config, params, toks)
    assert max_abs(got, hf_logits(hf_model, toks)) < ATOL
    exported = load_hf(save_llama(config, params, tmp_path / "export"))
    assert exported.config.head_dim == 32
    state, original = hf_state(exported), hf_state(hf_model)
    for name in original:
        np.testing.assert_array_equal(state[name], original[name], err_msg=name)
    assert max_abs(hf_logits(exported, toks), got) < ATOL


def test_ntk_matches_default_rope_with_changed_base(tmp_path):
    """`ntk` has no HF type; it is plain RoPE with base b * s^(d/(d-2)), which HF has."""
    base, factor, d = 10000.0, 4.0, 16
    hf_model = random_llama(hf_config(None, rope_theta=base * factor ** (d / (d - 2))))
    config, params = load_llama(save_hf(hf_model, tmp_path / "hf"))
    ntk = config.replace(rope=RopeConfig(rope_type="ntk", rope_theta=base, factor=factor))
    toks = tokens(LONG)
    assert max_abs(lctx_logits(ntk, params, toks), hf_logits(hf_model, toks)) < ATOL
    with pytest.raises(ValueError, match="'ntk': static NTK has no Hugging Face equivalent"):
        save_llama(ntk, params, tmp_path / "export")


def test_tied_embeddings_both_ways(tmp_path):
    hf_model = random_llama(hf_config(ROPE_SCALING["llama3"], tie=True))
    config, params = load_llama(save_hf(hf_model, tmp_path / "hf"))
    assert config.tie_embeddings and "lm_head" not in params
    toks = tokens(LONG)
    got = lctx_logits(config, params, toks)
    assert max_abs(got, hf_logits(hf_model, toks)) < ATOL

    out = save_llama(config, params, tmp_path / "export")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    exported = load_hf(out)
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert max_abs(hf_logits(exported, toks), got) < ATOL

    # lctx untied -> HF untied (lm_head written), and lctx tied from an lctx init.
    tied = lm.preset("tiny", tie_embeddings=True, vocab_size=128)
    fresh = lm.init(tied, jax.random.key(0))
    out = save_llama(tied, fresh, tmp_path / "from_init")
    assert load_hf(out).config.tie_word_embeddings
    back, back_params = load_llama(out)
    # HF has one context length; it comes back on the rope too (None in the preset).
    assert back == tied.replace(rope=dataclasses.replace(tied.rope, max_position_embeddings=256))
    for a, b in zip(jax.tree.leaves(back_params), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sharded_checkpoints(tmp_path):
    hf_model = random_llama(hf_config(ROPE_SCALING["yarn"]))
    single = save_hf(hf_model, tmp_path / "single")
    sharded = save_hf(hf_model, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    config, params = load_llama(single)
    config_sharded, params_sharded = load_llama(sharded)
    assert config_sharded == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_sharded), strict=True):
        np.testing.assert_array_equal(a, b)

    out = save_llama(config, params, tmp_path / "export", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    state, original = hf_state(load_hf(out)), hf_state(hf_model)
    for name in original:
        np.testing.assert_array_equal(state[name], original[name], err_msg=name)
    # Saving again unsharded replaces the shards instead of leaving them beside it.
    save_llama(config, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_bfloat16_checkpoint_round_trip(tmp_path):
    hf_model = random_llama(hf_config(None)).to(torch.bfloat16)
    config, params = load_llama(save_hf(hf_model, tmp_path / "hf"))
    assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
    embed = params["embed"]["embedding"]
    assert embed.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        embed.astype(np.float32), hf_model.model.embed_tokens.weight.detach().float().numpy())
    out = save_llama(config, params, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = transformers.LlamaForCausalLM.from_pretrained(out, **{DTYPE_KWARG: torch.bfloat16})
    for name, value in hf_model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    _, params32 = load_llama(out, param_dtype="float32")
    assert params32["embed"]["embedding"].dtype == np.float32


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_hf(random_llama(hf_config(ROPE_SCALING["linear"])),
                   tmp_path_factory.mktemp("convert") / "hf")


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_config(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    (bad / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        load_llama(bad)
    with pytest.raises(ValueError, match="not a directory"):
        load_llama(tmp_path / "nowhere")


def test_missing_tensors(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    _edit_tensors(bad, lambda t: [t.pop("model.layers.1.mlp.up_proj.weight"),
                                  t.pop("model.norm.weight")])
    with pytest.raises(ValueError, match=r"missing tensors \(2\): model\.layers\.1\.mlp\.up_proj"
                                         r"\.weight, model\.norm\.weight"):
        load_llama(bad)


def test_wrong_shape(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(bad, lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
    with pytest.raises(ValueError, match=rf"{name}: shape \(16, 64\), expected \(32, 64\)"):
        load_llama(bad)


def test_unexpected_tensors(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    name = "model.layers.0.self_attn.q_proj.bias"
    _edit_tensors(bad, lambda t: t.update({name: np.zeros((64,), np.float32)}))
    with pytest.raises(ValueError, match=rf"unexpected tensors \(1\).*{name}"):
        load_llama(bad)


def test_other_architecture(tmp_path):
    config = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS)
    path = tmp_path / "mistral"
    transformers.MistralForCausalLM(config).save_pretrained(path)
    with pytest.raises(ValueError, match=r"architectures=\['MistralForCausalLM'\].*not supported"
                                         r".*supported: architectures \['LlamaForCausalLM'\]"):
        load_llama(path)


@pytest.mark.parametrize("key, value, match", [
    ("attention_bias", True, "attention_bias=True: lctx's LLaMA has no biases"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("model_type", "qwen2", "model_type='qwen2'"),
    ("num_key_value_heads", 3, "n_kv_heads=3: must divide n_heads=4"),
    ("rope_parameters", {"rope_type": "superrope", "rope_theta": 1e4}, "rope_type='superrope'"),
])
def test_unsupported_config(hf_dir, tmp_path, key, value, match):
    bad = _copy(hf_dir, tmp_path / "bad")
    rewrite_config(bad, lambda c: {**c, key: value, "rope_scaling": None})
    with pytest.raises(ValueError, match=match):
        load_llama(bad)


def test_missing_weights_file(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no model\.safetensors .*found \['pytorch_model\.bin'\]"):
        load_llama(bad)


def test_export_rejects_params_that_do_not_match_config(hf_dir, tmp_path):
    config, params = load_llama(hf_dir)
    params["layers"]["mlp"]["up"]["kernel"] = params["layers"]["mlp"]["up"]["kernel"][:, :, :32]
    with pytest.raises(ValueError, match=r"params/layers/mlp/up/kernel: shape \(2, 64, 32\), "
                                         r"expected \(2, 64, 96\)"):
        save_llama(config, params, tmp_path / "out")
    assert config_to_hf(config)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lctx.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_round_trip(hf_dir, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "back"
    done = run_cli("hf-to-lctx", f"--hf_dir={hf_dir}", f"--out={ckpt}")
    assert done.returncode == 0, done.stderr
    assert (ckpt / "model_config.json").is_file() and (ckpt / "params").is_dir()
    done = run_cli("lctx-to-hf", f"--ckpt={ckpt}", f"--out={out}", "--max_shard_size=60KB")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()
    toks = tokens(LONG)
    original, back = load_hf(hf_dir), load_hf(out)
    np.testing.assert_array_equal(hf_logits(back, toks), hf_logits(original, toks))

    # Bad input: one line on stderr, exit status 2, no traceback.
    for args in (["hf-to-lctx", f"--hf_dir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'x'}"],
                 ["hf-to-lctx", f"--hf_dir={hf_dir}", f"--out={ckpt}"],
                 ["lctx-to-hf", f"--ckpt={hf_dir}", f"--out={tmp_path / 'y'}"]):
        done = run_cli(*args)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lctx.convert: error: "), lines
    assert run_cli("--help").returncode == 0
