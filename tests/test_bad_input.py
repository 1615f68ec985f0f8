"""A user mistake at any entry point: one line naming the flag or key and the value,
exit status 2, no traceback, nothing written (issue 23, item 1).

Each case runs the entry point as a user would (`python -m ...`) in an empty
directory, so relative outputs (runs/<name>, --out) land there; afterwards that
directory must still be empty and the shared inputs unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
# A LLaMA config.json that lctx accepts (weights are what the cases break).
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
ZERO_CADENCE = """from lctx.training.config import base_config, stage

def get_config():
    c = base_config()
    c.stage_order = ("pretrain",)
    c.stages.pretrain = stage(seq_len=64, batch_size=8, steps=2, learning_rate=1e-3)
    c.checkpoint.every_steps = 0
    return c
"""

# (id, argv with {in} for the inputs directory, substrings the one line must hold)
CASES = [
    # python -m lctx.train
    ("train-no-config", ["lctx.train"], ["--config", "required"]),
    ("train-config-missing", ["lctx.train", "--config=configs/does_not_exist.py"],
     ["--config=configs/does_not_exist.py", "no such file"]),
    ("train-config-broken", ["lctx.train", "--config={in}/broken.py"],
     ["--config=", "broken.py", "SyntaxError"]),
    ("train-unknown-key", ["lctx.train", f"--config={TINY}", "--config.no_such_key=3"],
     ["--config.no_such_key", "unknown config key"]),
    ("train-unknown-nested-key", ["lctx.train", f"--config={TINY}", "--config.stages.extend.stepz=3"],
     ["--config.stages.extend.stepz", "did you mean", "stages.extend.steps"]),
    ("train-unknown-flag", ["lctx.train", f"--config={TINY}", "--bogus=1"], ["bogus"]),
    ("train-wrong-type", ["lctx.train", f"--config={TINY}", "--config.stages.pretrain.steps=abc"],
     ["--config.stages.pretrain.steps=abc", "expected an int"]),
    ("train-every-steps-zero", ["lctx.train", f"--config={TINY}", "--config.checkpoint.every_steps=0"],
     ["checkpoint.every_steps=0", "positive"]),
    ("train-log-every-negative", ["lctx.train", f"--config={TINY}", "--config.log_every_steps=-1"],
     ["log_every_steps=-1", "positive"]),
    ("train-batch-zero", ["lctx.train", f"--config={TINY}", "--config.stages.pretrain.batch_size=0"],
     ["stages.pretrain.batch_size=0", "positive"]),
    ("train-batch-indivisible", ["lctx.train", f"--config={TINY}",
                                 "--config.stages.extend.batch_size=12"],
     ["stages.extend.batch_size=12", "divisible", "8"]),
    ("train-seq-len-vs-block", ["lctx.train", f"--config={TINY}", "--config.stages.pretrain.seq_len=48",
                                "--config.model.attention_options.block_k=16"],
     ["stages.pretrain.seq_len=48", "block_q=32", "divide"]),
    ("train-mesh", ["lctx.train", f"--config={TINY}", "--config.mesh.sequence=3"],
     ["mesh=", "'sequence': 3", "8 devices"]),
    ("train-tokenizer-missing", ["lctx.train", f"--config={TINY}", "--config.data.tokenizer=nope.model"],
     ["data.tokenizer='nope.model'", "exists"]),
    ("train-preset", ["lctx.train", f"--config={TINY}", "--config.model.preset=nope"],
     ["model.preset='nope'", "tiny"]),
    # python -m lctx.eval
    ("eval-kv-cache-unknown", ["lctx.eval", "--model=smollm2-135m", "--kv_cache=snapk:budget=64"],
     ["--kv_cache='snapk:budget=64'", "unknown policy", "allowed:"]),
    ("eval-workdir-missing", ["lctx.eval", "--workdir=no_run"], ["--workdir=no_run", "no such directory"]),
    ("eval-not-a-run", ["lctx.eval", "--workdir={in}/ckpt_corrupt"], ["workdir=", "no config.json"]),
    ("eval-checkpoint-corrupt", ["lctx.eval", "--workdir={in}/run_corrupt"],
     ["run_corrupt/checkpoints/3", "corrupt"]),
    ("eval-checkpoint-meta-truncated", ["lctx.eval", "--workdir={in}/run_meta_truncated"],
     ["run_meta_truncated/checkpoints/3", "could not be restored", "truncated"]),
    ("eval-checkpoint-state-truncated", ["lctx.eval", "--workdir={in}/run_state_truncated"],
     ["run_state_truncated/checkpoints/3", "could not be restored", "truncated"]),
    ("eval-step-missing", ["lctx.eval", "--workdir={in}/run_corrupt", "--step=9"],
     ["step=9", "available: [3]"]),
    ("eval-step-not-int", ["lctx.eval", "--workdir={in}/run_corrupt", "--step=abc"], ["--step=abc"]),
    ("eval-unknown-task", ["lctx.eval", "--workdir={in}/run_corrupt", "--tasks=ppl,bogus"],
     ["--tasks=", "bogus", "ppl, passkey, needle"]),
    ("eval-lengths-not-int", ["lctx.eval", "--workdir={in}/run_corrupt", "--lengths=256,abc"],
     ["--lengths=256,abc", "ints"]),
    ("eval-batch-zero", ["lctx.eval", "--workdir={in}/run_corrupt", "--batch_size=0"],
     ["--batch_size=0", ">= 1"]),
    ("eval-rope-scaling-json", ["lctx.eval", "--workdir={in}/run_corrupt", "--rope_scaling={factor: 2"],
     ["--rope_scaling={factor: 2", "not valid JSON"]),
    # python -m lctx.convert
    ("convert-hf-dir-missing", ["lctx.convert", "hf-to-lctx", "--hf_dir=nowhere", "--out=ckpt"],
     ["--hf_dir=nowhere", "no such directory"]),
    ("convert-hf-config-json", ["lctx.convert", "hf-to-lctx", "--hf_dir={in}/hf_bad_json", "--out=ckpt"],
     ["--hf_dir", "hf_bad_json/config.json", "not valid JSON"]),
    ("convert-hf-weights-corrupt", ["lctx.convert", "hf-to-lctx", "--hf_dir={in}/hf_corrupt",
                                    "--out=ckpt"],
     ["--hf_dir", "hf_corrupt/model.safetensors", "not a safetensors file"]),
    ("convert-out-exists", ["lctx.convert", "hf-to-lctx", "--hf_dir={in}/hf_corrupt",
                            "--out={in}/hf_bad_json"],
     ["--out=", "hf_bad_json", "already exists"]),
    ("convert-param-dtype", ["lctx.convert", "hf-to-lctx", "--hf_dir={in}/hf_corrupt", "--out=ckpt",
                             "--param_dtype=int8"],
     ["--param_dtype", "int8", "float32"]),
    ("convert-ckpt-config-truncated", ["lctx.convert", "lctx-to-hf", "--ckpt={in}/ckpt_truncated",
                                       "--out=hf"],
     ["--ckpt", "ckpt_truncated/model_config.json", "not valid JSON"]),
    ("convert-ckpt-params-corrupt", ["lctx.convert", "lctx-to-hf", "--ckpt={in}/ckpt_corrupt",
                                     "--out=hf"],
     ["--ckpt", "ckpt_corrupt/params", "corrupt"]),
    ("convert-shard-size", ["lctx.convert", "lctx-to-hf", "--ckpt={in}/ckpt_corrupt", "--out=hf",
                            "--max_shard_size=5XB"],
     ["--max_shard_size", "5XB", "5GB"]),
    ("convert-unknown-command", ["lctx.convert", "hf2lctx"], ["hf2lctx", "hf-to-lctx"]),
    # python -m lctx.bench[.<name>]
    ("bench-unknown", ["lctx.bench", "atention"], ["atention", "did you mean attention"]),
    ("bench-attention-impl", ["lctx.bench.attention", "--impls=ring,flash"],
     ["--impls=", "flash", "blockwise"]),
    ("bench-memory-lengths", ["lctx.bench.memory", "--lengths=8192,100"],
     ["--lengths=8192,100", "multiples of 16"]),
    ("bench-train-config-missing", ["lctx.bench.train", "--config=nope.py"],
     ["--config=nope.py", "no such file"]),
    ("bench-train-zero-cadence", ["lctx.bench.train", "--config={in}/zero_cadence.py"],
     ["checkpoint.every_steps=0", "positive"]),
    # python -m lctx.kvcache memory
    ("kvcache-unknown-preset", ["lctx.kvcache", "memory", "--model=llama-70b", "--tokens=4096"],
     ["--model=llama-70b", "unknown preset", "llama-70b-mha"]),
    ("kvcache-dims-missing", ["lctx.kvcache", "memory", "--layers=32", "--tokens=4096"],
     ["--kv_heads, --head_dim", "required without --model"]),
    ("kvcache-tokens-not-int", ["lctx.kvcache", "memory", "--model=llama-3-8b", "--tokens=4k"],
     ["--tokens", "'4k'", "comma-separated ints"]),
    ("kvcache-dtype", ["lctx.kvcache", "memory", "--model=llama-3-8b", "--tokens=8",
                       "--dtype=bf61"],
     ["--dtype=bf61", "did you mean bf16"]),
    ("kvcache-fit-unit", ["lctx.kvcache", "memory", "--model=llama-3-8b", "--tokens=8",
                          "--fit=80XB"], ["--fit", "'80XB'", "80GiB"]),
    ("kvcache-unknown-policy", ["lctx.kvcache", "memory", "--model=llama-3-8b", "--tokens=8",
                                "--kv_cache=ful"], ["--kv_cache='ful'", "unknown policy"]),
    ("kvcache-fit-needs-params", ["lctx.kvcache", "memory", "--layers=2", "--kv_heads=1",
                                  "--head_dim=8", "--tokens=8", "--fit=1GB"],
     ["--fit", "--params"]),
    # python -m lctx.generate (the cases that need a model: tests/test_generate_cli.py)
    ("generate-unknown-policy", ["lctx.generate", "--model=smollm2-135m", "--prompt=hi",
                                 "--max_new_tokens=2", "--kv_cache=int9"],
     ["--kv_cache='int9'", "unknown policy", "allowed: "]),
    ("generate-policy-option", ["lctx.generate", "--model=smollm2-135m", "--prompt=hi",
                                "--max_new_tokens=2", "--kv_cache=full:budget=4"],
     ["--kv_cache='full:budget=4'", "allowed keys: none"]),
    ("generate-both-prompts", ["lctx.generate", "--model=smollm2-135m", "--prompt=hi",
                               "--prompt_file=p.txt", "--max_new_tokens=2"],
     ["--prompt=TEXT or --prompt_file=FILE", "exactly one"]),
    ("generate-no-prompt", ["lctx.generate", "--model=smollm2-135m", "--max_new_tokens=2"],
     ["--prompt=TEXT or --prompt_file=FILE", "exactly one"]),
    ("generate-prompt-file-missing", ["lctx.generate", "--model=smollm2-135m",
                                      "--prompt_file=nope.txt", "--max_new_tokens=2"],
     ["--prompt_file=nope.txt", "no such file"]),
    ("generate-max-new-tokens", ["lctx.generate", "--model=smollm2-135m", "--prompt=hi",
                                 "--max_new_tokens=2.5"],
     ["--max_new_tokens", "'2.5'", "int >= 1"]),
    ("generate-unknown-model", ["lctx.generate", "--model=smollm3", "--prompt=hi",
                                "--max_new_tokens=2"], ["--model=smollm3", "unknown model"]),
]


def _write_run(run: Path) -> None:
    """A run directory of tiny with one good checkpoint (step 3: a zero train state of stage 0)."""
    import jax.numpy as jnp

    from lctx.cli import load_config_file
    from lctx.training import config as cfg
    from lctx.training import loop
    from lctx.training.checkpoint import Checkpointer

    config = load_config_file("config", TINY)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.describe(config)))
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         loop._abstract_state(loop._build_stage(config, 0)))
    checkpointer = Checkpointer(str(run / "checkpoints"), every_steps=1, keep=1, async_save=False)
    checkpointer.save(3, state, {"stage": "pretrain", "stage_index": 0})
    checkpointer.close()


def _damage(files, edit) -> None:
    for path in files:
        if path.is_file():
            path.write_bytes(edit(path.read_bytes()))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Broken inputs for every case, built once."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "broken.py").write_text("def get_config(:\n")
    (root / "zero_cadence.py").write_text(ZERO_CADENCE)
    (root / "hf_bad_json").mkdir()
    (root / "hf_bad_json" / "config.json").write_text('{"model_type": ')
    (root / "hf_corrupt").mkdir()
    (root / "hf_corrupt" / "config.json").write_text(json.dumps(LLAMA))
    (root / "hf_corrupt" / "model.safetensors").write_bytes(b"\x07" * 100)

    import lctx.model as lm
    from lctx.convert.checkpoint import config_to_dict

    model_config = json.dumps(config_to_dict(lm.preset("tiny")))
    for name, config_text in (("ckpt_truncated", model_config[:len(model_config) // 2]),
                              ("ckpt_corrupt", model_config)):
        (root / name / "params").mkdir(parents=True)
        (root / name / "model_config.json").write_text(config_text)
        (root / name / "params" / "_METADATA").write_text("{not json")

    _write_run(root / "run")
    for name in ("run_corrupt", "run_meta_truncated", "run_state_truncated"):
        shutil.copytree(root / "run", root / name)
    half = lambda data: data[:len(data) // 2]
    step = Path("checkpoints") / "3"
    _damage((root / "run_corrupt" / step).rglob("*"), lambda _: b"\x00corrupt")
    _damage([root / "run_meta_truncated" / step / "meta" / "metadata"], half)
    _damage((root / "run_state_truncated" / step / "state").rglob("d/*"), half)
    return root


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, expected, inputs, tmp_path):
    """Exit 2, one `<prog>: error: ...` line naming the flag or key and value, nothing written."""
    argv = [a.replace("{in}", str(inputs)) for a in argv]
    before = _tree(inputs)
    done = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{argv[0]}: error: "), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert list(tmp_path.iterdir()) == []  # no run directory, no --out, no partial sibling
    assert _tree(inputs) == before


VALID = [("train-dry-run", ["lctx.train", f"--config={TINY}", "--dry_run"]),
         ("eval-undamaged-run", ["lctx.eval", "--workdir={in}/run", "--tasks=ppl", "--lengths=32",
                                 "--stride=32", "--max_tokens=32", "--batch_size=1"]),
         ("bench-list", ["lctx.bench"]),
         ("kvcache-memory", ["lctx.kvcache", "memory", "--model=llama-3-8b", "--tokens=8",
                             "--fit=80GB"])]


@pytest.mark.parametrize("argv", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_input_passes(argv, inputs, tmp_path):
    """What the cases break passes: the recipe, the run (before its checkpoint is damaged)."""
    argv = [a.replace("{in}", str(inputs)) for a in argv]
    done = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr and list(tmp_path.iterdir()) == []
