"""tpu_scripts/: the gcloud commands each script runs, --dry-run printing exactly
those, bad flags, shellcheck, and the whole lifecycle against a fake `gcloud` that
plays one TPU worker on this machine (ssh runs the command under a scratch HOME,
scp copies there; a fake `python3` stands in for pip and lctx.train).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
NAMES = ("create", "setup", "launch", "status", "logs", "stop", "delete")

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
home = os.environ["FAKE_WORKER_HOME"]
if args[3] == "ssh":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    env = {{"PATH": os.environ["PATH"], "HOME": home}}  # a worker's login environment
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
if args[3] == "scp":
    source, dest = [a for a in args[4:] if not a.startswith("--")]
    shutil.copy(source, os.path.join(home, dest.split(":", 1)[1]))
"""

# Stands in for python3 on the worker: pip installs are recorded; lctx.train records
# its arguments and environment, then runs until SIGTERM (as lctx.train: save, exit 143).
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$HOME/python3_calls"
if [[ $1 == -m && $2 == lctx.train ]]; then
  trap 'echo "lctx.train: SIGTERM received; checkpoint saved"; exit 143' TERM
  echo "pretrain: step 1 loss 6.1"
  # train_args appears last and whole: the test waits for it, then reads the rest.
  env | grep '^LCTX_' > "$HOME/train_env" || true
  printf '%s\\n' "$@" > "$HOME/train_args.partial" && mv "$HOME/train_args.partial" "$HOME/train_args"
  while true; do sleep 0.05; done
fi
"""


@pytest.fixture
def fake(tmp_path):
    """(environment with the fake gcloud and python3 first on PATH, worker HOME, call log)."""
    bin_dir, home = tmp_path / "bin", tmp_path / "worker_home"
    bin_dir.mkdir()
    home.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("python3", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCTX_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_GCLOUD_LOG=str(tmp_path / "calls"),
               FAKE_WORKER_HOME=str(home), TMPDIR=str(tmp_path), LCTX_TPU_NAME="lctx-v4-32")
    (home / "lctx").mkdir()  # a worker that has been set up
    yield env, home, tmp_path / "calls"
    for pid_file in (home / "lctx_logs").glob("*.pid"):  # runs a test started and left
        pid = int(pid_file.read_text())
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def script(name: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(SCRIPTS / f"{name}.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def gcloud(*args: str) -> list[str]:
    return ["compute", "tpus", "tpu-vm", *args]


CASES = {
    "create": ("--spot", "--project=my-proj"),
    "setup": (),
    "launch": ("--config=configs/extend_128k.py", "--env=LCTX_HEARTBEAT_TIMEOUT=60", "--",
               "--config.workdir=gs://bucket/runs/x", "--config.stages.extend.steps=20"),
    "status": (),
    "logs": ("--run=extend_128k", "--lines=5"),
    "stop": ("--run=extend_128k", "--vm"),
    "delete": ("--yes",),
}


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_prints_exactly_the_gcloud_commands_it_runs(name, fake):
    env, home, log = fake
    (home / "lctx_logs").mkdir()
    (home / "lctx_logs" / "extend_128k.log").write_text("step 1\n")
    dry = script(name, "--dry-run", *CASES[name], env=env)
    assert calls(log) == [], "--dry-run ran gcloud"
    printed = [shlex.split(line) for line in dry.stdout.splitlines() if line.startswith("gcloud ")]
    script(name, *CASES[name], env=env)
    assert printed == [["gcloud", *call] for call in calls(log)]
    assert printed, dry.stdout


def test_create_takes_flags_and_environment(fake):
    env, _, log = fake
    script("create", "--accelerator-type=v4-32", "--spot", "--project=my-proj", env=env)
    env2 = dict(env, LCTX_TPU_ZONE="europe-west4-a", LCTX_TPU_TYPE="v5litepod-16",
                LCTX_TPU_VERSION="v2-alpha-tpuv5-lite", LCTX_TPU_PROJECT="p2", LCTX_TPU_NAME="other")
    script("create", "--preemptible", env=env2)
    script("create", "--zone=us-east5-a", "--name=third", env=env2)  # flags win over the environment
    assert calls(log) == [
        gcloud("create", "lctx-v4-32", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
               "--spot", "--zone=us-central2-b", "--project=my-proj"),
        gcloud("create", "other", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
               "--preemptible", "--zone=europe-west4-a", "--project=p2"),
        gcloud("create", "third", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
               "--zone=us-east5-a", "--project=p2"),
    ]


@pytest.mark.parametrize("name, args, pattern", [
    ("create", ("--bogus",), "unknown argument '--bogus'; allowed:"),
    ("create", ("--name=",), r"--name \(or LCTX_TPU_NAME\) is required"),
    ("create", ("--name=Bad_Name",), "--name='Bad_Name': expected lower-case letters"),
    ("create", ("--accelerator-type=v4",), "--accelerator-type='v4': expected a TPU type"),
    ("setup", ("--ref=main",), "--ref='main' needs --repo"),
    ("launch", (), "--config=configs/NAME.py is required"),
    ("launch", ("--config=configs/x.py", "--env=1BAD=x"), "--env='1BAD=x': expected KEY=VALUE"),
    ("logs", ("--worker=first",), "--worker='first': expected a worker index or all"),
    ("stop", ("--run=a b",), "--run='a b': expected letters"),
])
def test_bad_arguments_exit_2_naming_them(name, args, pattern, fake):
    env, _, log = fake
    result = script(name, *args, env=env, check=False)
    assert result.returncode == 2, result.stderr
    assert re.search(pattern, result.stderr), result.stderr
    assert calls(log) == []


def test_lifecycle_on_a_fake_worker(fake):
    env, home, log = fake
    script("setup", env=env)
    assert (home / "lctx" / "setup.py").exists() and (home / "lctx" / "lctx" / "train.py").exists()
    assert not (home / "lctx" / ".venv").exists() and not (home / "lctx" / ".git").exists()
    assert "-m pip install --quiet -e .[tpu]" in (home / "python3_calls").read_text()

    # An override with spaces and quotes arrives as one argument, unchanged.
    odd = "--config.name=run 'one' \"two\" $HOME"
    script("launch", "--config=configs/extend_128k.py", "--env=LCTX_HEARTBEAT_TIMEOUT=60", "--",
           "--config.workdir=gs://bucket/runs/x", odd, env=env)
    launch = calls(log)[-1]
    assert launch[:5] == gcloud("ssh", "lctx-v4-32") and "--worker=all" in launch
    pid_file = home / "lctx_logs" / "extend_128k.pid"
    deadline = time.time() + 30
    while not (home / "train_args").exists() and time.time() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert (home / "train_args").read_text().splitlines() == [
        "-m", "lctx.train", "--config=configs/extend_128k.py",
        "--config.workdir=gs://bucket/runs/x", odd]
    assert (home / "train_env").read_text().strip() == "LCTX_HEARTBEAT_TIMEOUT=60"

    status = script("status", env=env).stdout
    assert "extend_128k running; pretrain: step 1 loss 6.1" in status, status
    logs = script("logs", "--run=extend_128k", "--lines=1", env=env).stdout
    assert logs.strip() == "pretrain: step 1 loss 6.1"

    stop = script("stop", "--run=extend_128k", env=env).stdout
    assert f"sent SIGTERM to extend_128k (pid {pid})" in stop
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
    assert "SIGTERM received; checkpoint saved" in (home / "lctx_logs" / "extend_128k.log").read_text()
    assert "extend_128k exited" in script("status", env=env).stdout
    script("delete", "--yes", env=env)
    assert calls(log)[-1] == gcloud("delete", "lctx-v4-32", "--quiet", "--zone=us-central2-b")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); the scripts are "
                    "not linted on this machine")
    scripts = sorted(str(p.relative_to(ROOT)) for p in SCRIPTS.glob("*.sh"))
    assert {Path(s).stem for s in scripts} >= set(NAMES)
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
