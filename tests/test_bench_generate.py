"""`python -m lctx.bench generate` end to end on a tiny random Llama (nothing downloaded).

transformers is the baseline on the very weights lctx loads (one HF directory), so
the benchmarked lctx path (prefill_jit + decode_jit) must give transformers' greedy
continuation token for token. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REASON = "needs the `hf` extra (pip install -e '.[hf]', with torch==2.13.0 installed first)"
torch = pytest.importorskip("torch", reason=REASON)
transformers = pytest.importorskip("transformers", reason=REASON)
pytest.importorskip("safetensors", reason=REASON)

from lctx.bench import generate as bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random LlamaForCausalLM (GQA, tied embeddings) saved as an HF directory."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits O(1) with clear argmax gaps
        for p in model.parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.15 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def test_bench_runs_and_lctx_continuation_equals_transformers(hf_dir, tmp_path, capsys):
    out = tmp_path / "generate.json"
    code = bench.main([f"--model={hf_dir}", "--prefill_lengths=64,96", "--decode_context=64",
                       "--decode_tokens=12", "--repeats=1", f"--json={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prefill 64 tokens (s)" in printed and "decode at 64" in printed
    result = json.loads(out.read_text())
    assert {"environment", "model", "dtype", "torch_threads", "prefill", "decode"} <= set(result)
    assert [row["tokens"] for row in result["prefill"]] == [64, 96]
    for row in result["prefill"]:
        assert {"lctx_s", "transformers_s", "speedup", "warmup_s", "runs_s"} <= set(row)
        assert set(row["warmup_s"]) == {"lctx", "transformers"}
    decode = result["decode"]
    assert {"lctx_tokens_per_s", "transformers_tokens_per_s", "speedup", "warmup_s",
            "context", "tokens"} <= set(decode)
    assert decode["context"] == 64 and len(decode["lctx_tokens"]) == 12
    assert decode["lctx_tokens"] == decode["transformers_tokens"]
    assert decode["tokens_match"] is True
    assert len(set(decode["lctx_tokens"])) > 1  # a real continuation, not one repeated id


@pytest.mark.parametrize("args, needle", [
    (["--model=no-such-model"], "unknown model"),
    (["--decode_tokens=0"], "--decode_tokens"),
    (["--prefill_lengths=2k"], "--prefill_lengths"),
    (["--bogus=1"], "unrecognized arguments"),
])
def test_bad_flags_one_line_exit_2(args, needle):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lctx.bench", "generate", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
