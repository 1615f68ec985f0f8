"""Multi-process training: two CPU processes x 4 devices (gloo over 127.0.0.1) as one
8-device mesh, against the single-process 8-device run.

- per-step losses of configs/tiny.py with ring attention over `sequence=8` equal the
  single-process run's within 1e-5;
- SIGTERM to one process: both agree on a step (Orbax's preemption sync point),
  save, exit 143; rerunning resumes from that checkpoint;
- SIGKILL of one process: the other exits, with a message, within 60 s;
- the launch settings, each process's data shard and the shard-count check on resume.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lctx import data as ld
from lctx import model as lm
from lctx import parallel
from lctx.parallel import distributed
from lctx.training import loop
from lctx.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
RING = ("--config.mesh.sequence=8", "--config.model.attention_impl=ring")
# The end-of-run evaluation is not under test here: one small perplexity batch.
SMALL_EVAL = ("--config.eval.lengths=(64,)", "--config.eval.stride=64", "--config.eval.max_tokens=128",
              "--config.eval.batch_size=2")
STEPS = 10  # tiny: pretrain 6 + extend 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("xla_cache"))


def child_env(cache: str, devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCTX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", LCTX_HEARTBEAT_TIMEOUT="10")
    return env


def train_cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "lctx.train", f"--config={TINY}", f"--config.workdir={workdir}",
            *RING, *SMALL_EVAL]


class Pair:
    """Two `python -m lctx.train` processes of one run; logs in files (no pipe to fill).

    Process 0 is told its place by LCTX_* variables, process 1 by --lctx_* flags.
    """

    def __init__(self, workdir: Path, cache: str, *overrides: str):
        port = free_port()
        self.logs = [workdir.parent / f"{workdir.name}.p{i}.log" for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            env, cmd = child_env(cache, 4), train_cmd(workdir) + list(overrides)
            if i == 0:
                env.update(LCTX_COORDINATOR=f"127.0.0.1:{port}", LCTX_NUM_PROCESSES="2",
                           LCTX_PROCESS_ID="0")
            else:
                cmd += [f"--lctx_coordinator=127.0.0.1:{port}", "--lctx_num_processes=2",
                        "--lctx_process_id=1"]
            with open(log, "a") as f:
                self.procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f,
                                                   stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- process {i}:\n{self.log(i)[-2500:]}" for i in range(2))


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    return {(r["stage"], r["step"]): r["loss"] for r in read_metrics(str(run_dir))}


def wait_for(condition, timeout: float, pair: Pair) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert all(p.poll() is None for p in pair.procs), "a process ended early:\n" + pair.tails()
        assert time.time() < deadline, "timed out waiting:\n" + pair.tails()
        time.sleep(0.1)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit())


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, xla_cache) -> Path:
    """The reference: one process with 8 devices, the same recipe and mesh."""
    workdir = tmp_path_factory.mktemp("single") / "run"
    result = subprocess.run(train_cmd(workdir), env=child_env(xla_cache, 8), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_two_processes_match_one_and_resume_after_sigterm(single_process_run, tmp_path, xla_cache):
    reference = losses(single_process_run)
    assert sorted(s for _, s in reference) == sorted([*range(1, 7), *range(1, 5)])
    workdir = tmp_path / "pair"

    first = Pair(workdir, xla_cache)
    wait_for(lambda: any(s >= 3 for s in checkpoint_steps(workdir)), 300, first)
    first.procs[1].send_signal(signal.SIGTERM)  # one host preempted: both must stop together
    codes = first.wait(180)
    assert codes == [143, 143], first.tails()
    for i in range(2):
        assert "SIGTERM received; checkpoint saved" in first.log(i), first.tails()
    saved = checkpoint_steps(workdir)
    assert saved and saved[-1] < STEPS, saved
    logged_before = len(read_metrics(str(workdir)))
    assert logged_before == saved[-1]  # process 0 logged every step up to the agreed one

    second = Pair(workdir, xla_cache)
    assert second.wait(300) == [0, 0], second.tails()
    got = losses(workdir)
    assert got.keys() == reference.keys()
    np.testing.assert_allclose([got[k] for k in sorted(got)], [reference[k] for k in sorted(got)],
                               rtol=0, atol=1e-5)
    # Resumed, not restarted: the steps before the checkpoint were logged once.
    with open(workdir / "metrics.jsonl") as f:
        assert sum(1 for line in f if line.strip()) == STEPS


DATA_PARALLEL = ("--config.mesh.data=2", "--config.mesh.sequence=4")  # one replica per process


@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_data_parallel_pair_and_killing_one_process_stops_the_other_within_60s(
        victim, tmp_path, xla_cache):
    """Each process holds one data-parallel replica (its 4 devices: the sequence axis):
    step 1's loss is the initial model's loss on shard 0's rows then shard 1's rows.
    Then SIGKILL one of them (process 0 also hosts the coordination service)."""
    survivor = 1 - victim
    workdir = tmp_path / "killed"
    pair = Pair(workdir, xla_cache, *DATA_PARALLEL)
    wait_for(lambda: len(read_metrics(str(workdir))) >= 2, 300, pair)
    pair.procs[victim].kill()
    start = time.time()
    try:
        code = pair.procs[survivor].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process {survivor} still running 60 s after process {victim} was killed:\n"
                    + pair.tails())
    finally:
        pair.kill()
    elapsed = time.time() - start
    assert code != 0
    log = pair.log(survivor)
    ours = f"process {survivor} of 2 stopped" in log and "another process failed or was killed" in log
    # Without the coordinator, JAX's own client may end the process first, with its message.
    jax_own = victim == 0 and "This most likely indicates that another task died" in log
    assert ours or jax_own, pair.tails()
    print(f"process {survivor} exited {elapsed:.1f} s after process {victim} was killed (code {code})")
    logged = losses(workdir)[("pretrain", 1)]
    assert logged == pytest.approx(sharded_first_loss(workdir, DATA_PARALLEL), abs=1e-5)


def sharded_first_loss(workdir: Path, overrides: tuple[str, ...]) -> float:
    """In this process: the initial parameters' loss on [shard 0 batch; shard 1 batch] of
    the pretrain stage, each shard read as `lctx.data.make_dataset` reads shard i of 2."""
    config = load_recipe(TINY)
    config.workdir = str(workdir)
    config.model.attention_impl = "ring"
    for item in overrides:  # --config.mesh.data=2 -> config.mesh.data = 2
        key, value = item.removeprefix("--config.").split("=")
        group, field = key.split(".")
        config[group][field] = int(value)
    stage = loop._build_stage(config, 0)
    params = lm.init(stage.model_config, jax.random.key(config.seed), mesh=stage.mesh)
    corpus = loop.open_run_corpus(config, str(workdir))
    s = config.stages.pretrain
    rows = [next(iter(ld.make_dataset(corpus.splits["train"], ld.make_tokenizer("byte"),
                                      seq_len=s.seq_len, batch_size=s.batch_size // 2, seed=config.seed,
                                      shard_index=i, shard_count=2, text_key=corpus.text_key)))
            for i in range(2)]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in ld.BATCH_KEYS}
    loss, _ = lm.loss(stage.model_config, params, batch["tokens"], batch["targets"],
                      loss_mask=batch["loss_mask"].astype(np.float32), positions=batch["positions"],
                      segment_ids=batch["segment_ids"], mesh=stage.mesh)
    return float(loss)


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"LCTX_NUM_PROCESSES": "1"}, None),
    ({"LCTX_COORDINATOR": "10.0.0.2:8476", "LCTX_NUM_PROCESSES": "4", "LCTX_PROCESS_ID": "3"},
     distributed.ProcessSetup("10.0.0.2:8476", 4, 3)),
])
def test_explicit_setup_from_environment(environ, expected):
    assert distributed.explicit_setup(environ=environ) == expected


def test_flags_override_environment():
    environ = {"LCTX_COORDINATOR": "a:1", "LCTX_NUM_PROCESSES": "4", "LCTX_PROCESS_ID": "3"}
    got = distributed.explicit_setup("b:2", 2, 0, environ=environ)
    assert got == distributed.ProcessSetup("b:2", 2, 0)


@pytest.mark.parametrize("environ, pattern", [
    ({"LCTX_NUM_PROCESSES": "2", "LCTX_PROCESS_ID": "0"}, "lctx_coordinator / LCTX_COORDINATOR is missing"),
    ({"LCTX_COORDINATOR": "h:1", "LCTX_NUM_PROCESSES": "2", "LCTX_PROCESS_ID": "2"},
     r"LCTX_PROCESS_ID='2': expected an int in \[0, 2\)"),
    ({"LCTX_COORDINATOR": "host", "LCTX_NUM_PROCESSES": "2", "LCTX_PROCESS_ID": "1"},
     "LCTX_COORDINATOR='host': expected host:port"),
    ({"LCTX_COORDINATOR": "h:1", "LCTX_NUM_PROCESSES": "two", "LCTX_PROCESS_ID": "1"},
     "LCTX_NUM_PROCESSES='two': expected an int >= 1"),
])
def test_bad_setup_names_the_setting(environ, pattern):
    with pytest.raises(ValueError, match=pattern):
        distributed.explicit_setup(environ=environ)


def test_heartbeat_timeout_setting():
    assert distributed.heartbeat_timeout_s({}) == distributed.DEFAULT_HEARTBEAT_TIMEOUT_S
    assert distributed.heartbeat_timeout_s({"LCTX_HEARTBEAT_TIMEOUT": "7"}) == 7
    with pytest.raises(ValueError, match="LCTX_HEARTBEAT_TIMEOUT='0'"):
        distributed.heartbeat_timeout_s({"LCTX_HEARTBEAT_TIMEOUT": "0"})


@pytest.mark.parametrize("mesh, expected", [
    # (data, fsdp, sequence, tensor) -> (shard_index, shard_count) of devices 0-3 and 4-7
    ((1, 1, 8, 1), [(0, 1), (0, 1)]),  # one replica over both processes: the same rows
    ((2, 1, 4, 1), [(0, 2), (1, 2)]),  # one replica per process
    ((8, 1, 1, 1), [(0, 2), (1, 2)]),  # four data coordinates per process: rows 0-3, 4-7
    ((2, 2, 2, 1), [(0, 2), (1, 2)]),  # data x fsdp blocks
])
def test_process_data_shard_follows_the_data_parallel_coordinate(mesh, expected):
    """As if the mesh's devices 0-3 were one process and 4-7 another, on a batch of 8 rows."""
    m = parallel.make_mesh(*mesh)
    sharding = NamedSharding(m, P(("data", "fsdp"), None))
    first = set(list(m.devices.flat)[:4])
    of = lambda d: 0 if d in first else 1
    got = [distributed.process_data_shard(sharding, (8, 16), process_index=p, process_of=of)
           for p in (0, 1)]
    assert got == expected


def test_process_data_shard_with_interleaved_hosts():
    """Hosts interleaved along the data axis (rows 0, 2, 4, 6 on one): still two shards."""
    m = parallel.make_mesh(data=8)
    sharding = NamedSharding(m, P(("data", "fsdp"), None))
    position = {d: i for i, d in enumerate(m.devices.flat)}
    of = lambda d: position[d] % 2
    got = [distributed.process_data_shard(sharding, (8, 16), process_index=p, process_of=of)
           for p in (0, 1)]
    assert got == [(0, 2), (1, 2)]


def test_process_data_shard_rejects_overlapping_hosts():
    """data=4 x sequence=2 where one host holds rows 0-2 and the other rows 1-3."""
    m = parallel.make_mesh(data=4, sequence=2)
    sharding = NamedSharding(m, P(("data", "fsdp"), None))
    grid = m.devices.reshape(4, 2)  # [data, sequence] (fsdp and tensor are 1)
    first = {grid[0, 0], grid[0, 1], grid[1, 0], grid[2, 0]}
    with pytest.raises(ValueError, match=r"must hold either the same rows or disjoint rows"):
        distributed.process_data_shard(sharding, (4, 16), process_index=0,
                                       process_of=lambda d: 0 if d in first else 1)


def test_one_process_data_is_the_whole_batch():
    m = parallel.make_mesh(data=2, sequence=4)
    assert distributed.process_data_shard(NamedSharding(m, P(("data", "fsdp"), None)), (8, 16)) == (0, 1)
    assert distributed.gather_shard_states({"a": 1}, 0, 1) == [{"a": 1}]


def load_recipe(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_resume_with_another_data_shard_count_is_refused(tmp_path):
    config = load_recipe(TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config.workdir = str(run_dir)
    stage = loop._build_stage(config, 0)
    corpus = loop.open_run_corpus(config, str(run_dir))
    with pytest.raises(loop.TrainingError, match=r"for 2 data shard\(s\).*this run has 1 \(1 processes"):
        loop._train_batches(config, corpus, ld.make_tokenizer("byte"), stage, [{}, {}])
    assert jax.process_count() == 1


def test_incomplete_launch_settings_exit_2_naming_them():
    env = child_env("", 8)
    env["LCTX_NUM_PROCESSES"] = "2"
    result = subprocess.run(train_cmd(Path("unused")), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "lctx_coordinator / LCTX_COORDINATOR is missing" in result.stderr
    assert "Traceback" not in result.stderr
