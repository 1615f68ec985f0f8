"""The RoPE-scaling study's --quick variant end to end (the pipeline, not the science),
then `python -m lctx.eval` on one of its runs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, "experiments", "rope_scaling", "study.py")


def test_study_quick_and_eval_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = tmp_path / "study"
    run = subprocess.run([sys.executable, STUDY, "--quick", f"--out={out}", "--seeds=0"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = {(r["kind"], r["method"]) for r in records}
    methods = ["none", "none_ft", "pi_ft", "ntk", "dynamic", "yarn_ft", "llama3_ft"]
    assert kinds == {("setup", "tokenizer"), ("check", "base")} | {("method", m) for m in methods}
    by_method = {r["method"]: r for r in records if r["kind"] == "method"}
    for m in methods:
        assert set(by_method[m]["ppl"]) == {"64", "128"}
        assert all(v["ppl"] > 1 and v["bits_per_byte"] > 0 for v in by_method[m]["ppl"].values())
    # Methods without a fine-tune share the base weights: at the training length, where
    # dynamic NTK equals plain RoPE, their perplexity is the base model's.
    assert by_method["dynamic"]["ppl"]["64"]["ppl"] == by_method["none"]["ppl"]["64"]["ppl"]
    assert by_method["ntk"]["ppl"]["64"]["ppl"] != by_method["none"]["ppl"]["64"]["ppl"]
    assert by_method["pi_ft"]["ppl"]["128"] != by_method["none_ft"]["ppl"]["128"]
    assert set(by_method["yarn_ft"]["ft_curve"]) == {"2"}
    # The second pretraining stage starts from the first and the fine-tunes from it.
    runs = out / "runs"
    second = json.loads((runs / "base_s0_retrieval" / "config.json").read_text())
    assert second["init_from"] == str(runs / "base_s0" / "export")
    assert second["data"]["mix"]["passkey_share"] == 1.0 and second["data"]["whole_docs"]
    finetune = json.loads((runs / "pi_ft_s0" / "config.json").read_text())
    assert finetune["init_from"] == str(runs / "base_s0_retrieval" / "export")
    report = (out / "report.md").read_text()
    assert "| pi_ft | 1 |" in report and "Base model check" in report
    for name in ("ppl_vs_length.png", "passkey.png", "ft_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # A second run finds everything done and changes nothing.
    again = subprocess.run([sys.executable, STUDY, "--quick", f"--out={out}", "--seeds=0",
                            "--methods=none", "--noreport"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)

    workdir = out / "runs" / "yarn_ft_s0"
    cli = subprocess.run([sys.executable, "-m", "lctx.eval", f"--workdir={workdir}",
                          "--tasks=ppl,passkey,needle", "--lengths=128", "--trials=1",
                          "--depths=0,1", "--stride=32", "--max_tokens=256"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "passkey effective length" in cli.stdout
    saved = json.loads((workdir / "eval" / "results.json").read_text())
    assert saved["stage"] == "extend" and saved["rope"]["rope_parameters"]["rope_type"] == "yarn"
    assert (workdir / "eval" / "ppl_vs_length.png").exists()
