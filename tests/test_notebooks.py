"""The experiments/ notebooks run top to bottom on CPU (8 virtual devices, their small
settings) with nbclient: the install cell is skipped because lctx is importable,
and any attempt to reach the network fails the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the dev extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="the dev extra (nbformat, nbclient, ipykernel)")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# Loaded into the kernel through PYTHONPATH: sockets may only reach this machine.
NO_NETWORK = '''
import socket

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and "/" not in host:
        raise OSError(f"network access attempted from a notebook test: {address!r}")
    return _connect(self, address)


socket.socket.connect = _local_only
'''


def run_notebook(nb, tmp_path: Path, monkeypatch):
    """Executes `nb` in `tmp_path` (its working directory) with the network guard."""
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(guard), str(ROOT)]))
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def execute(name: str, tmp_path: Path, monkeypatch):
    """Runs experiments/NAME; returns the executed notebook."""
    nb = run_notebook(nbformat.read(EXPERIMENTS / name, as_version=4), tmp_path, monkeypatch)
    assert not (tmp_path / "lctx").exists(), "the install cell ran although lctx is importable"
    return nb


def test_the_network_guard_is_active(tmp_path, monkeypatch):
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"  # TEST-NET-1
        "except OSError as err:\n"
        "    print(err)")])
    out = run_notebook(nb, tmp_path, monkeypatch).cells[0].outputs[0]["text"]
    assert "network access attempted from a notebook test" in out


def text_of(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def images_of(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_colab_tpu_runs_on_cpu(tmp_path, monkeypatch):
    nb = execute("quickstart_colab_tpu.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    assert "8 x cpu (cpu), 1 process(es)" in text, text[-2000:]
    assert "pretrain loss" in text
    run_dir = tmp_path / "runs" / "quickstart_colab"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"pretrain", "extend"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["attention_impl"] == "ring" and config["mesh"]["sequence"] == 8
    assert images_of(nb) >= 1


def test_long_context_eval_runs_on_cpu(tmp_path, monkeypatch):
    """No run in runs/quickstart_colab: the notebook trains `tiny` into it, then evaluates."""
    nb = execute("long_context_eval.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    assert "training configs/tiny.py into it first" in text
    eval_dir = tmp_path / "runs" / "quickstart_colab" / "eval"
    results = json.loads((eval_dir / "results.json").read_text())
    assert set(results["ppl"]) == {"128", "512", "1024"}
    assert results["needle"]["cells"], results["needle"]
    assert (eval_dir / "needle_heatmap.png").stat().st_size > 0
    assert (eval_dir / "ppl_vs_length.png").stat().st_size > 0
    assert "needle accuracy by length" in text and images_of(nb) >= 1
