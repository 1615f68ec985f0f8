"""lctx.train with `beacon.ratios`: only an activation-beacon module trains on a frozen
init_from model; the run resumes exactly and ends by evaluating through the module."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from lctx import model as lm
from lctx.convert.checkpoint import save_checkpoint
from lctx.model import beacon as bc
from lctx.training import config as cfg
from lctx.training import loop
from lctx.training.metrics import read_metrics

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
pytestmark = pytest.mark.xdist_group("beacon_train")


def load_recipe(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def beacon_recipe(base: Path, workdir: Path):
    c = load_recipe(TINY)
    c.workdir = str(workdir)
    c.init_from = str(base)
    c.beacon.ratios = (2, 4)
    c.beacon.chunk = 16
    c.stage_order = ("beacon",)
    c.stages = ConfigDict()
    c.stages.beacon = cfg.stage(seq_len=64, batch_size=8, steps=3, learning_rate=1e-2,
                                schedule="constant")
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
    c.eval.tasks = ("ppl",)
    c.eval.lengths = (40,)  # not a multiple of the chunk: windows are padded to whole chunks
    c.eval.kv_cache = "beacon:ratio=4,chunk=16"
    return c


@pytest.fixture(scope="module")
def beacon_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("beacon_train")
    config = lm.preset("tiny")
    params = lm.init(config, jax.random.key(5))
    save_checkpoint(config, params, root / "base")
    recipe = beacon_recipe(root / "base", root / "run")
    assert cfg.problems(recipe, jax.device_count()) == []
    summary = loop.run(recipe)
    return root, config, params, recipe, summary


def _module(path: Path, like):
    return flax.serialization.from_bytes(like, path.read_bytes())


def test_only_the_beacon_module_trains(beacon_run):
    root, config, params, recipe, summary = beacon_run
    fresh = bc.init_beacon(config, params)
    trained = _module(Path(summary["beacon_module"]), fresh)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         trained, fresh)
    assert all(m > 0 for m in jax.tree.leaves(moved)), moved
    # the optimizer holds Adam's two moments for the module's parameters and nothing else
    stage = loop._build_stage(recipe, 0)
    state = loop._abstract_state(stage)
    size = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
    assert size(state.params) == size(fresh) < size(params)
    assert size(state.opt_state) - size(fresh) * 2 < 8  # the rest: step counters
    losses = [r["loss"] for r in read_metrics(str(root / "run")) if r.get("stage") == "beacon"]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_the_run_evaluates_through_its_module(beacon_run):
    """The end-of-run perplexity is the beacon model's: held-out windows read through
    the trained module at the eval spec's ratio, against the direct beacon forward."""
    root, config, params, recipe, summary = beacon_run
    results = json.loads((root / "run" / "eval" / "results.json").read_text())
    assert results["ppl"]["40"]["ppl"] == pytest.approx(summary["eval"]["lengths"]["40"]["ppl"])
    assert 1.0 < summary["eval"]["lengths"]["40"]["ppl"] < lm.preset("tiny").vocab_size


def test_a_beacon_run_resumes_exactly(beacon_run):
    """Dropping the last checkpoint and rerunning redoes step 3 from step 2: same loss,
    same module (the per-chunk ratios come from the saved rng and step)."""
    root, config, params, recipe, summary = beacon_run
    again = root / "again"
    shutil.copytree(root / "run", again)
    shutil.rmtree(again / "checkpoints" / "3")
    (again / "beacon.msgpack").unlink()
    rerun = beacon_recipe(root / "base", again)
    rerun.eval.lengths = (16,)
    loop.run(rerun)
    first = {r["step"]: r["loss"] for r in read_metrics(str(root / "run")) if "loss" in r}
    lines = (again / "metrics.jsonl").read_text().splitlines()
    second = [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]
    assert second[len(first):] == [(3, first[3])]  # one step redone, from the checkpoint
    assert (again / "beacon.msgpack").read_bytes() == Path(summary["beacon_module"]).read_bytes()


def test_a_beacon_run_directory_is_not_a_model(beacon_run):
    from lctx.models import SourceError, load

    root = beacon_run[0]
    with pytest.raises(SourceError, match=r"an activation-beacon run.*kv_cache='beacon:ratio=R"):
        load(str(root / "run"))


BAD_BEACON = [
    ("beacon.ratios", (2, 3), r"beacon.ratios=\(2, 3\): 3 is not a positive divisor of beacon.chunk=16"),
    ("init_from", "", r"beacon.ratios=\(2, 4\): beacons train on a frozen model; set init_from"),
    ("stages.beacon.seq_len", 72, r"stages.beacon.seq_len=72: must be a multiple of beacon.chunk=16"),
    ("eval.kv_cache", "full", r"eval.kv_cache='full': a beacon run evaluates through its module"),
]


@pytest.mark.parametrize("key,value,pattern", BAD_BEACON, ids=[b[0] for b in BAD_BEACON])
def test_bad_beacon_config(tmp_path, key, value, pattern):
    recipe = beacon_recipe(tmp_path, tmp_path / "run")
    *parents, leaf = key.split(".")
    node = recipe
    for name in parents:
        node = node[name]
    with node.ignore_type():
        node[leaf] = value
    found = cfg.problems(recipe, 8)
    assert any(re.search(pattern, line) for line in found), found
