"""End-to-end training: two stages, exact resume after SIGKILL and SIGTERM, stage
hand-over, restore on another device count, non-finite stop, and the bad-config table.

Subprocess runs share a persistent XLA compilation cache, so only the first pays
for compiling the tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lctx import data as ld
from lctx import model as lm
from lctx import parallel
from lctx.training import config as cfg
from lctx.training import loop
from lctx.training.checkpoint import Checkpointer
from lctx.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


def load_recipe(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def train_cmd(workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "lctx.train", f"--config={TINY}", f"--config.workdir={workdir}",
            "--config.checkpoint.async_save=False", *overrides]


def env_with_cache(cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return env


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(r["stage"], r["step"]): r["loss"] for r in read_metrics(str(run_dir))}


def run_until_checkpoint(cmd, env, checkpoints: Path, sig: int, min_step: int) -> subprocess.CompletedProcess:
    """Starts a run and sends `sig` once a checkpoint at or after `min_step` exists."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in checkpoints.glob("[0-9]*") if p.name.isdigit()]
        if any(s >= min_step for s in steps):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, xla_cache):
    """The reference: the tiny recipe run start to finish in one process."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    result = subprocess.run(train_cmd(workdir), env=env_with_cache(xla_cache), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_two_stage_run_end_to_end(straight_run):
    workdir, result = straight_run
    recipe = load_recipe(TINY)
    got = losses(workdir)
    for name in recipe.stage_order:
        steps = [s for (stage, s) in got if stage == name]
        assert sorted(steps) == list(range(1, recipe.stages[name].steps + 1))
    records = read_metrics(str(workdir))
    for key in ("stage", "step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed"):
        assert all(key in r for r in records), key
    pretrain = [got[("pretrain", s)] for s in range(1, recipe.stages.pretrain.steps + 1)]
    assert pretrain[-1] < pretrain[0]  # it learns
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["eval"]["lengths"]) == {str(n) for n in recipe.eval.lengths}
    assert (workdir / "loss_curve.png").stat().st_size > 0
    assert list((workdir / "tensorboard").iterdir())
    assert (workdir / "corpus_manifest.json").exists()
    assert "held-out" in result.stdout and "unigram bits/byte" in result.stdout


def test_resume_after_sigkill_and_sigterm_is_exact(straight_run, tmp_path, xla_cache):
    """Killed mid-pretrain (SIGKILL) and preempted (SIGTERM), then rerun: the same
    per-step losses as the straight run, bitwise, across the stage boundary."""
    reference = losses(straight_run[0])
    env = env_with_cache(xla_cache)

    killed = tmp_path / "killed"
    result = run_until_checkpoint(train_cmd(killed), env, killed / "checkpoints", signal.SIGKILL, 3)
    assert result.returncode == -signal.SIGKILL
    resumed = subprocess.run(train_cmd(killed), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(killed) == reference

    preempted = tmp_path / "preempted"
    result = run_until_checkpoint(train_cmd(preempted), env, preempted / "checkpoints", signal.SIGTERM, 3)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "SIGTERM received; checkpoint saved" in result.stderr
    resumed = subprocess.run(train_cmd(preempted), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(preempted) == reference


def test_extend_starts_from_pretrain_parameters(straight_run):
    """The first extend step's loss is the loss of the pretrain-final parameters on
    extend's first batch, under extend's RoPE scaling."""
    workdir, _ = straight_run
    recipe = load_recipe(TINY)
    recipe.workdir = str(workdir)
    ckpt = Checkpointer(str(workdir / "checkpoints"), every_steps=0, keep=10, async_save=False)
    pretrain_end = recipe.stages.pretrain.steps
    stage = loop._build_stage(recipe, 0)
    state = ckpt.restore_state(pretrain_end, loop._abstract_state(stage))
    extend = loop._build_stage(recipe, 1)
    corpus = loop.open_run_corpus(recipe, str(workdir))
    tokenizer = ld.make_tokenizer(recipe.data.tokenizer)
    batch = loop._to_device(next(loop._train_batches(recipe, corpus, tokenizer, extend, None)), extend)
    loss, _ = lm.loss(extend.model_config, state.params, batch["tokens"], batch["targets"],
                      loss_mask=batch["loss_mask"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], mesh=extend.mesh)
    logged = losses(workdir)[("extend", 1)]
    np.testing.assert_allclose(float(loss), logged, rtol=1e-5)
    ckpt.close()


def test_checkpoint_restores_onto_one_device(straight_run):
    """Trained on 8 devices, restored onto a 1-device mesh: identical parameters."""
    workdir, _ = straight_run
    recipe = load_recipe(TINY)
    last = sum(recipe.stages[n].steps for n in recipe.stage_order)
    ckpt = Checkpointer(str(workdir / "checkpoints"), every_steps=0, keep=10, async_save=False)
    stage = loop._build_stage(recipe, 1)
    eight = ckpt.restore_state(last, loop._abstract_state(stage))
    one_device = parallel.make_mesh(devices=jax.devices()[:1])
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(one_device, s.spec), stage.state_shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            loop._abstract_state(stage), shardings)
    one = ckpt.restore_state(last, abstract)
    assert {d for leaf in jax.tree.leaves(one.params) for d in leaf.devices()} == {jax.devices()[0]}
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_lctx_load_reads_a_run_directory(straight_run):
    """lctx.load(RUN) is the latest checkpoint, RUN@STEP another, each with its stage's
    config: the same parameters the training checkpointer restores."""
    import lctx

    workdir, _ = straight_run
    recipe = load_recipe(TINY)
    ckpt = Checkpointer(str(workdir / "checkpoints"), every_steps=0, keep=10, async_save=False)
    pretrain_end, last = recipe.stages.pretrain.steps, ckpt.steps()[-1]
    for source, step, index in ((str(workdir), last, 1),
                                (f"{workdir}@{pretrain_end}", pretrain_end, 0)):
        model = lctx.load(source)
        stage = loop._build_stage(recipe, index)
        assert (model.step, model.stage, model.config) == (step, stage.name, stage.model_config)
        state = ckpt.restore_state(step, loop._abstract_state(stage))
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(model.tokenizer, type(ld.make_tokenizer(recipe.data.tokenizer)))
    with pytest.raises(lctx.SourceError, match=r"step=1: no such checkpoint"):
        lctx.load(f"{workdir}@1")
    ckpt.close()


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(straight_run, tmp_path, caplog):
    """A damaged newest checkpoint is named in a warning and the previous one is used."""
    import shutil

    workdir, _ = straight_run
    recipe = load_recipe(TINY)
    copy = tmp_path / "checkpoints"
    shutil.copytree(workdir / "checkpoints", copy)
    ckpt = Checkpointer(str(copy), every_steps=0, keep=10, async_save=False)
    newest, previous = ckpt.steps()[-1], ckpt.steps()[-2]
    for blob in (copy / str(newest) / "state").rglob("*"):
        if blob.is_file() and blob.parent.name == "d":
            blob.write_bytes(b"garbage")
    stages = {}
    with caplog.at_level("WARNING"):
        resumed = loop._resume(ckpt, recipe, stages)
    assert f"{copy / str(newest)} could not be restored" in caplog.text
    meta = ckpt.read_meta(previous)
    assert resumed[0] == meta["stage_index"] and resumed[1] == meta["stage_step"]
    ckpt.close()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = load_recipe(TINY)
    recipe.workdir = str(tmp_path / "nan")
    recipe.checkpoint.async_save = False
    real_step = loop.train_step

    def poisoned(state, batch, frozen=None, **kw):
        new_state, metrics = real_step(state, batch, frozen, **kw)
        bad = state.step >= 4  # the fifth pretrain update
        metrics["finite"] = metrics["finite"] & ~bad
        return new_state, metrics

    monkeypatch.setattr(loop, "train_step", poisoned)
    with pytest.raises(loop.TrainingError, match=r"non-finite.*stage 'pretrain' step 5.*last good checkpoint"):
        loop.run(recipe)
    ckpt = Checkpointer(str(tmp_path / "nan" / "checkpoints"), every_steps=0, keep=10, async_save=False)
    assert ckpt.steps() == [3]
    ckpt.close()


BAD_CONFIGS = [
    ("stages.pretrain.steps", 0, r"stages.pretrain.steps=0: expected a positive int"),
    ("stages.extend.batch_size", -8, r"stages.extend.batch_size=-8: expected a positive int"),
    ("model.n_layers", 0, r"model.n_layers=0: must be a positive int"),
    ("stages.pretrain.seq_len", 60, r"stages.pretrain.seq_len=60: model.attention_options.block_q=32"),
    ("mesh.data", 3, r"mesh=.*product of the axis sizes must equal the 8 devices"),
    ("stages.pretrain.batch_size", 12, r"batch_size=12: must be divisible by data x fsdp \(8\)"),
    ("data.tokenizer", "words", r"data.tokenizer='words'"),
    ("data.corpus_dir", "/no/such/dir", r"data.corpus_dir='/no/such/dir': no such directory"),
    ("init_from", "/no/such/ckpt", r"init_from='/no/such/ckpt': no such file or directory and not a registered model"),
    ("model.attention_impl", "flash", r"attention_impl='flash'"),
    ("stages.extend.schedule", "step", r"stages.extend.schedule='step': expected one of cosine"),
    ("stages.extend.rope_scaling", {"rope_type": "yarm", "factor": 2.0}, r"yarm"),
    ("log_every_steps", 2.5, r"log_every_steps=2.5: expected int"),
    ("data.whole_docs", "yes", r"data.whole_docs='yes': expected bool"),
]


def _set(config, dotted: str, value):
    *parents, leaf = dotted.split(".")
    for name in parents:
        config = config[name]
    with config.ignore_type():
        config[leaf] = value


@pytest.mark.parametrize("key,value,pattern", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_table(key, value, pattern):
    """Each problem is reported on its own line naming the key, the value and what is allowed."""
    recipe = load_recipe(TINY)
    _set(recipe, key, value)
    found = cfg.problems(recipe, 8)
    assert any(re.search(pattern, line) for line in found), found


# TPU recipes are validated for the slice they name; paths that exist only on that
# machine (a converted checkpoint, a prepared TFDS directory) are the one exception.
RECIPE_DEVICES = {"pretrain_8k": 16, "extend_128k": 16, "extend_llama3_8b_128k": 32, "beacon_smollm2": 1}
MACHINE_PATHS = re.compile(r"^(init_from|data\.tfds_data_dir|data\.tokenizer)=")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    found = cfg.problems(recipe, RECIPE_DEVICES.get(path.stem, 8))
    assert [p for p in found if not MACHINE_PATHS.match(p)] == []


def test_bad_config_exits_2_without_traceback(tmp_path):
    """Unknown keys, wrong types and bad values: exit code 2, one line each, no traceback."""
    cmd = train_cmd(tmp_path / "bad", "--config.stages.pretrain.steps=0", "--config.mesh.data=3",
                    "--config.data.tokenizer=words")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=env_with_cache(str(tmp_path)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(ln.startswith("lctx.train: error: ") for ln in lines), lines
    assert not (tmp_path / "bad").exists()  # nothing written for a bad config
