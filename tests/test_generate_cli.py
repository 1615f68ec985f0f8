"""`python -m lctx.generate` on a tiny random lctx checkpoint with its own BPE tokenizer:
the streamed tokens are `lctx.infer.generate`'s, the text arrives in pieces that join
to the decoded continuation, and bad input is one line with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lctx
import lctx.model as lm
from lctx import generate as cli
from lctx.convert.checkpoint import save_checkpoint
from lctx.data.tokenizer import HuggingFaceTokenizer
from lctx.infer import generate
from lctx.infer.kvcache import POLICIES, parse

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
TEXT = ["the quick brown fox jumps over the lazy dog", "a b c d e f g h i j k l m n o p",
        "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "héllo wörld, ça va? naïve café ✓"] * 20
PROMPT = "the quick brown fox jumps over the lazy dog and the cat"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer() -> HuggingFaceTokenizer:
    """A byte-level BPE of at most 384 tokens (the tiny preset's vocab), specials first."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "add_bos_token": True}
    return HuggingFaceTokenizer.from_json(tok.to_str(), config)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random `tiny` model with the tokenizer above (no chat template), saved as an lctx
    checkpoint; weights scaled so the logits have clear argmax gaps."""
    tokenizer = tiny_tokenizer()
    config = lm.preset("tiny")
    assert tokenizer.vocab_size <= config.vocab_size
    params = lm.init(config, jax.random.key(0))
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, params)
    return save_checkpoint(config, params, tmp_path_factory.mktemp("gen") / "tiny",
                           tokenizer=tokenizer)


@pytest.fixture(scope="module")
def chat_ckpt(ckpt, tmp_path_factory) -> Path:
    """The same checkpoint with a ChatML template in its tokenizer_config.json."""
    path = tmp_path_factory.mktemp("gen_chat") / "tiny_chat"
    shutil.copytree(ckpt, path)
    config_file = path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": CHATML}))
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return lctx.load(str(ckpt))


def run_cli(*flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lctx.generate", *flags], cwd=cwd or REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)


def until_eos(tokens: np.ndarray, eos_id: int) -> list[int]:
    stops = np.flatnonzero(tokens == eos_id)
    return tokens[:stops[0] if stops.size else len(tokens)].tolist()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("chat", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["plain", "chat"])
def test_cli_streams_generates_tokens(chat, ckpt, chat_ckpt, model, tmp_path):
    """The command's tokens and text are generate()'s (a 4-token chunk: the prompt is
    prefilled in several padded steps), cut before the first EOS."""
    source = chat_ckpt if chat else ckpt
    out = tmp_path / "gen.json"
    done = run_cli(f"--model={source}", f"--prompt={PROMPT}", "--max_new_tokens=24",
                   "--chunk=4", f"--json={out}", *(["--chat"] if chat else []))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    tok = model.tokenizer
    text = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n" if chat else PROMPT
    assert result["prompt_ids"] == [tok.bos_id, *tok.encode(text).tolist()]  # add_bos_token
    expected = generate(model.config, model.params, [result["prompt_ids"]], max_new_tokens=24,
                        pad_id=tok.pad_id, chunk=4)[0]
    assert result["tokens"] == until_eos(expected, tok.eos_id)
    assert len(result["tokens"]) > 3 and len(set(result["tokens"])) > 1  # a real continuation
    assert done.stdout == tok.decode(result["tokens"]) + "\n" == result["text"] + "\n"
    assert "error" not in done.stderr.lower()


@pytest.mark.parametrize("name", [n if n in ("full", "sink_window", "int4") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in sorted(POLICIES)])
def test_stream_tokens_equal_generate_for_every_policy(name, model):
    ids = model.encode(PROMPT)
    got = list(cli.stream_tokens(model.config, model.params, ids, max_new_tokens=12,
                                 kv_cache=name, chunk=8))
    assert got == generate(model.config, model.params, [ids], max_new_tokens=12,
                           kv_cache=name, chunk=8)[0].tolist()


def test_sampling_uses_generates_keys(model):
    ids = model.encode(PROMPT)
    rng = jax.random.key(7)
    got = list(cli.stream_tokens(model.config, model.params, ids, max_new_tokens=16,
                                 temperature=1.5, rng=rng))
    want = generate(model.config, model.params, [ids], max_new_tokens=16, temperature=1.5,
                    rng=rng)[0]
    assert got == want.tolist() and got != list(cli.stream_tokens(
        model.config, model.params, ids, max_new_tokens=16))


def test_stream_stops_at_eos(model):
    """With eos_id set to the second greedy token, one token comes out."""
    ids = model.encode(PROMPT)
    greedy = list(cli.stream_tokens(model.config, model.params, ids, max_new_tokens=6))
    assert greedy[1] != greedy[0]
    assert list(cli.stream_tokens(model.config, model.params, ids, max_new_tokens=6,
                                  eos_id=greedy[1])) == greedy[:1]


def test_text_streams_in_pieces_that_join_to_the_decoded_text(model):
    """Multi-byte characters span byte-level tokens: no piece shows half of one."""
    tok = model.tokenizer
    text = "héllo wörld, ça va? naïve café ✓ ünïcödé"
    ids = tok.encode(text).tolist()
    assert tok.decode(ids[:1] + ids[1:2]) != text  # more than one token
    pieces = list(cli.stream_text(tok, iter(ids)))
    assert len(pieces) > 3 and "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    continuation = list(cli.stream_tokens(model.config, model.params, model.encode(PROMPT),
                                          max_new_tokens=10))
    pieces = list(cli.stream_text(tok, continuation))
    assert len(pieces) > 1 and "".join(pieces) == tok.decode(continuation)


def test_capacity_is_checked_before_prefill(model):
    ids = model.encode(PROMPT)
    with pytest.raises(ValueError, match=r"max_cache_tokens=8: kv_cache='full' needs \d+ slots"):
        cli.stream_tokens(model.config, model.params, ids, max_new_tokens=4, max_cache_tokens=8)
    enough = len(ids) + 4
    assert len(list(cli.stream_tokens(model.config, model.params, ids, max_new_tokens=4,
                                      max_cache_tokens=enough))) == 4


@pytest.mark.skipif("sink_window" not in POLICIES, reason="needs the sink_window policy")
def test_an_evicting_cache_takes_a_prompt_longer_than_its_slots(model):
    ids = model.encode(PROMPT)
    policy = parse("sink_window:sinks=2,window=4")
    slots = policy.slots(len(ids) + 6, 4)
    assert slots < len(ids)
    got = list(cli.stream_tokens(model.config, model.params, ids, max_new_tokens=6,
                                 kv_cache=policy, chunk=4, max_cache_tokens=slots))
    assert got == generate(model.config, model.params, [ids], max_new_tokens=6,
                           kv_cache=policy, chunk=4)[0].tolist()


# ----------------------------------------------------------------------------- bad input


def _budget_not_above_reserve() -> str | None:
    """A spec whose budget does not exceed the slots it reserves (sinks, recent, ...), for
    the first policy whose own checks refuse that; None when no policy has such a rule."""
    for name, cls in sorted(POLICIES.items()):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        reserves = sorted((key for key, value in fields.items()
                           if key != "budget" and isinstance(value, int) and value >= 1),
                          key=lambda key: key != "sinks")
        for key in reserves if "budget" in fields else ():
            spec = f"{name}:budget={fields[key]},{key}={fields[key]}"
            try:
                parse(spec)
            except ValueError as err:
                if "budget" in str(err):
                    return spec
    return None


BAD = [  # (id, flags with {ckpt} / {chat} / {tmp}, substrings of the one line)
    ("unknown-policy", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=2", "--kv_cache=ful"],
     ["--kv_cache='ful'", "unknown policy", "did you mean full"]),
    ("budget-not-above-reserve", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=2",
                                "--kv_cache={budget_sinks}"], ["--kv_cache=", "budget"]),
    ("option-not-int", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=2",
                        "--kv_cache={int_option}=x"], ["--kv_cache=", "'x' is not an integer"]),
    ("max-new-tokens-not-int", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=ten"],
     ["--max_new_tokens", "'ten'", "int >= 1"]),
    ("chunk-zero", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=2", "--chunk=0"],
     ["--chunk", "'0'", "int >= 1"]),
    ("temperature-negative", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=2",
                              "--temperature=-1"], ["--temperature=-1", ">= 0"]),
    ("both-prompts", ["--model={ckpt}", "--prompt=hi", "--prompt_file=p.txt",
                      "--max_new_tokens=2"], ["--prompt", "--prompt_file", "exactly one"]),
    ("no-prompt", ["--model={ckpt}", "--max_new_tokens=2"], ["--prompt", "exactly one"]),
    ("prompt-file-missing", ["--model={ckpt}", "--prompt_file={tmp}/nope.txt",
                             "--max_new_tokens=2"], ["--prompt_file=", "nope.txt", "no such file"]),
    ("unknown-model", ["--model=no-such-model", "--prompt=hi", "--max_new_tokens=2"],
     ["--model=no-such-model", "unknown model", "smollm2-135m"]),
    ("no-chat-template", ["--model={ckpt}", "--prompt=hi", "--max_new_tokens=2", "--chat"],
     ["--chat", "no chat template"]),
    ("prompt-too-long-for-cache", ["--model={ckpt}", f"--prompt={PROMPT}", "--max_new_tokens=4",
                                   "--max_cache_tokens=8"],
     ["--max_cache_tokens=8", "kv_cache='full'", "slots", "does not evict"]),
]


@pytest.mark.parametrize("flags,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_exit_2(flags, expected, ckpt, tmp_path):
    int_option = next((f"{name}:{f.name}" for name, cls in sorted(POLICIES.items())
                       for f in dataclasses.fields(cls) if f.type in (int, "int")), None)
    if any("{int_option}" in f for f in flags) and int_option is None:
        pytest.skip("no registered cache policy has an int option")
    spec = _budget_not_above_reserve()
    if any("{budget_sinks}" in f for f in flags) and spec is None:
        pytest.skip("no registered cache policy refuses a budget at or below its reserved "
                    "slots (sinks, recent, ...)")
    flags = [f.format(ckpt=ckpt, tmp=tmp_path, budget_sinks=spec, int_option=int_option)
             for f in flags]
    done = run_cli(*flags, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith("lctx.generate: error: "), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert done.stdout == "" and list(tmp_path.iterdir()) == []
