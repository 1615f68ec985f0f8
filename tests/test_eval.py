"""Evaluation: sliding-window perplexity, passkey and needle prompts, scoring, effective
length, plots, and the synthetic retrieval mix."""

import json
import math
import os
import functools
import re
import subprocess
import sys

import grain

import jax
import numpy as np
import pytest

import lctx.model as lm
from lctx.data import ByteTokenizer, make_dataset
from lctx.data import synthetic
from lctx.data.pipeline import tokenize_record
from lctx.eval import retrieval
from lctx.eval.api import evaluate_model
from lctx.eval.perplexity import perplexity_by_length, sliding_windows

BYTE = ByteTokenizer()


# ----------------------------------------------------------------------------- perplexity


def test_sliding_windows_hand_example():
    # 10 tokens, windows of 4, stride 2. Targets are tokens 1..9. Window (start, first):
    # start 0 scores targets 1-4; start 2 covers targets 3-6, scores 5-6 (offsets >= 2);
    # start 4 covers 5-8, scores 7-8; the last window is aligned to the end (start 5,
    # targets 6-9) and scores only 9 (offset 3).
    assert sliding_windows(10, 4, 2) == [(0, 0), (2, 2), (4, 2), (5, 3)]
    assert sliding_windows(5, 4, 2) == [(0, 0)]
    assert sliding_windows(4, 4, 2) == []  # too short for one window of 4 predictions


def test_perplexity_matches_a_float64_recomputation():
    config = lm.preset("tiny", attention_impl="reference")
    params = lm.init(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    texts = ["".join(chr(c) for c in rng.integers(97, 123, n)) for n in (40, 29)]
    result = perplexity_by_length(config, params, [{"text": t} for t in texts], BYTE,
                                  lengths=(8,), stride=3, max_tokens=10_000, batch_size=2)["8"]
    # Independent: every target predicted once, from the hand rule of windows: the first
    # window scores all of its 8 targets, each later one its last 3 (or the remainder).
    nll, count = 0.0, 0
    for t in texts:
        ids = np.concatenate([[BYTE.bos_id], BYTE.encode(t), [BYTE.eos_id]])
        scored = np.zeros(len(ids), bool)
        start = 0
        while True:
            window = ids[start:start + 9]
            logits = np.asarray(lm.forward(config, params, window[None, :-1]), np.float64)[0]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                   keepdims=True)) - logits.max(-1, keepdims=True)
            for offset in range(8):
                target = start + offset + 1
                if not scored[target]:
                    scored[target] = True
                    nll -= logp[offset, window[offset + 1]]
                    count += 1
            if start + 9 >= len(ids):
                break
            start = min(start + 3, len(ids) - 9)
        assert scored[1:].all()
    assert result["tokens"] == count == sum(len(t) + 1 for t in texts)
    np.testing.assert_allclose(result["ppl"], math.exp(nll / count), rtol=1e-5)
    # Bytes tokenizer: one byte per scored token except EOS (0 bytes).
    np.testing.assert_allclose(result["bits_per_byte"],
                               nll / count * count / math.log(2) / sum(len(t) for t in texts),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- passkey


def _filler_sentences(text: str) -> int:
    return sum(text.count(s) for s in retrieval.FILLER)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_construction(depth):
    p = retrieval.passkey_prompt(BYTE, 1200, depth, "48213")
    text = BYTE.decode(p.ids)
    assert p.ids[0] == BYTE.bos_id and len(p.ids) <= 1200 - 8
    assert text.startswith(retrieval.INSTRUCTION) and text.endswith(retrieval.QUESTION)
    key_line = "The pass key is 48213. Remember it. 48213 is the pass key."
    assert text.count(key_line) == 1
    before, after = text.split(key_line)
    n_before, n_after = _filler_sentences(before), _filler_sentences(after)
    assert abs(n_before - depth * (n_before + n_after)) <= 1
    # Filler is at least 75% of the prompt (bytes = tokens here), counted independently.
    filler_bytes = sum(len(s) + 1 for s in retrieval.FILLER) * (n_before + n_after) / 5
    assert filler_bytes / len(p.ids) >= 0.74
    assert p.filler_fraction >= 0.75
    # Largest prompt that fits: one more filler sentence would exceed the budget.
    assert len(p.ids) + len(retrieval.FILLER[0]) + 1 > 1200 - 8


def test_passkey_short_instruction_and_the_75_percent_rule():
    mid = retrieval.passkey_prompt(BYTE, 700, 0.5, "12345")  # full instruction: < 75% filler
    assert mid.instruction == retrieval.SHORT_INSTRUCTION
    assert BYTE.decode(mid.ids).startswith(retrieval.SHORT_INSTRUCTION)
    assert retrieval.passkey_prompt(BYTE, 1200, 0.5, "12345").instruction == retrieval.INSTRUCTION
    assert retrieval.passkey_prompt(BYTE, 256, 0.5, "12345") is None  # even short: < 75%
    with pytest.raises(ValueError, match="depth=1.5"):
        retrieval.passkey_prompt(BYTE, 1200, 1.5, "12345")


def test_passkey_scoring_and_keys():
    assert retrieval.score_passkey(" 48213. Remember", "48213")
    assert not retrieval.score_passkey(" 4821", "48213")
    assert not retrieval.score_passkey(" 482130", "48213")
    assert not retrieval.score_passkey(" the key 48213", "48213")
    keys = retrieval.passkey_keys(np.random.default_rng(0), 50)
    assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in keys)


# ----------------------------------------------------------------------------- needle


def test_needle_depth_moves_back_to_a_boundary():
    hay = "alpha beta gamma. delta epsilon\nzeta eta theta. iota kappa lambda mu\nnu xi omicron"
    for depth in (0.0, 0.3, 0.5, 0.7, 1.0):
        text, offset = retrieval.needle_text(hay, depth, retrieval.Needle())
        target = int(depth * len(hay))
        assert offset <= target
        assert offset == 0 or hay[offset - 1] == "\n" or hay[offset - 2:offset] == ". "
        # It is the last boundary at or before the target: none lies in between.
        between = hay[offset:target]
        assert "\n" not in between[:-1] and ". " not in between[:-1]
        assert text.endswith(f"{retrieval.Needle().question}\n{retrieval.Needle().answer_prefix}")
        assert text[offset:].startswith(retrieval.Needle().sentence)


def test_needle_prompt_fits_and_scores():
    texts = ["x = 1. y = 2.\n" * 200]
    hay = retrieval.haystack_ids(BYTE, texts, 2000)
    p = retrieval.needle_prompt(BYTE, hay, 1024, 0.5)
    budget = 1024 - retrieval.needle_answer_tokens(BYTE, retrieval.Needle())
    assert len(p.ids) <= budget and len(p.ids) > budget - 20
    text = BYTE.decode(p.ids)
    assert text.count(retrieval.Needle().sentence) == 1
    needle = retrieval.Needle()
    hay_chars = len(text) - len(needle.sentence) - 1 - len(f"\n{needle.question}\n{needle.answer_prefix}")
    at = text.index(needle.sentence)
    assert 0 <= 0.5 * hay_chars - at <= len("x = 1. y = 2.\n")  # moved back at most one line
    assert retrieval.score_needle(" eat a sandwich and sit in Dolores  Park on a sunny day.",
                                  p.answer)
    assert not retrieval.score_needle(" eat a sandwich", p.answer)


# ----------------------------------------------------------------------------- effective length


@pytest.mark.parametrize("table, yarn_80, pi_20", [
    ({256: 1.0, 512: 0.9, 1024: 0.5, 2048: 0.85, 4096: 0.1}, 2048, 2048),
    ({256: 0.1, 512: 1.0}, 512, 0),
    ({256: 1.0, 512: 0.15, 1024: 0.9}, 1024, 256),
    ({256: 0.5, 512: 0.3}, 0, 512),
])
def test_effective_length_definitions(table, yarn_80, pi_20):
    assert retrieval.effective_length_80(table) == yarn_80
    assert retrieval.effective_length_20(table) == pi_20


# ----------------------------------------------------------------------------- evaluate + plots


def test_evaluate_model_writes_results_and_plots(tmp_path):
    config = lm.preset("tiny", attention_impl="blockwise",
                       attention_options={"block_q": 64, "block_k": 64})
    params = lm.init(config, jax.random.key(0))
    held_out = [{"text": ("def f(x):\n    return x + 1. Done.\n" * 80)} for _ in range(2)]
    results = evaluate_model(config, params, BYTE, held_out, lengths=(128, 1024),
                             out_dir=str(tmp_path), training_lengths=(64,), stride=64,
                             max_tokens=512, depths=(0.0, 1.0), trials=2, progress=False)
    assert set(results["ppl"]) == {"128", "1024"}
    pk = results["passkey"]
    assert pk["skipped"] == {"128": "filler below 75% of the prompt"}
    assert [c["length"] for c in pk["cells"]] == [1024, 1024] and all(
        c["trials"] == 2 for c in pk["cells"])
    acc = pk["accuracy"]["1024"]
    assert acc == np.mean([c["accuracy"] for c in pk["cells"]])
    assert pk["effective_length"]["yarn_80"] == (1024 if acc >= 0.8 else 0)
    for name in ("ppl_vs_length.png", "passkey.png", "needle_heatmap.png", "results.json"):
        path = tmp_path / name
        assert path.stat().st_size > 1000 or name == "results.json"
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["ppl"]["1024"]["ppl"] == pytest.approx(results["ppl"]["1024"]["ppl"])
    with pytest.raises(ValueError, match="tasks"):
        evaluate_model(config, params, BYTE, held_out, tasks=("ppl", "bleu"), lengths=(128,))


def test_command_line_bad_flags_exit_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for args, match in ((["--workdir", str(tmp_path), "--tasks=ppl,bleu"], "tasks="),
                        (["--workdir", str(tmp_path)], "no config.json"),
                        (["--workdir", str(tmp_path), "--lengths=a,b"], "--lengths=a,b")):
        out = subprocess.run([sys.executable, "-m", "lctx.eval", *args], capture_output=True,
                             text=True, env=env)
        assert out.returncode == 2, out.stderr
        assert match in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- synthetic mix


def test_synthetic_documents_have_the_eval_formats():
    rng = np.random.default_rng(0)
    text = synthetic.passkey_document(BYTE, rng, 600)
    key = text.rsplit(" ", 1)[1].rstrip(".")
    assert f"The pass key is {key}. Remember it." in text and text.endswith(
        f"{retrieval.QUESTION} {key}.") and len(text) <= 600
    hay = "line one. line two.\n" * 100
    doc = synthetic.needle_document(BYTE, rng, 400, hay)
    city = doc.split("What is the best thing to do in ")[1].split("?")[0]
    answer = doc.rsplit(f"The best thing to do in {city} is ", 1)[1].rstrip(".")
    assert f"The best thing to do in {city} is {answer}." in doc.split("What is")[0]
    assert answer in synthetic.ACTIVITIES and abs(len(doc) - 400) < 60


def _document_filler(text: str) -> tuple[list[str], list[str]]:
    """The filler sentences before and after the key line of a passkey training document."""
    key = text.rsplit(" ", 1)[1].rstrip(".")
    head, tail = text.split(retrieval.KEY_LINE.format(key=key))
    assert tail.endswith(f"{retrieval.QUESTION} {key}.")
    for instruction in (retrieval.INSTRUCTION, retrieval.SHORT_INSTRUCTION):
        head = head.removeprefix(instruction)
    tail = tail.rsplit(retrieval.QUESTION, 1)[0]
    return tuple([x.strip() + "." for x in part.split(".") if x.strip()] for part in (head, tail))


def _cycle_breaks(sentences: list[str]) -> int:
    """How often a sentence is not the one that follows its predecessor in FILLER's cycle."""
    follows = {a: b for a, b in zip(retrieval.FILLER, retrieval.FILLER[1:] + retrieval.FILLER[:1])}
    return sum(b != follows[a] for a, b in zip(sentences, sentences[1:]))


def test_passkey_documents_keep_the_eval_filler_cycle():
    """The training documents' filler is the evaluation's fixed cycle, restarted after
    the key line, deterministic in the rng."""
    for seed in range(4):
        text = synthetic.passkey_document(BYTE, np.random.default_rng(seed), 600)
        assert text == synthetic.passkey_document(BYTE, np.random.default_rng(seed), 600)
        head, tail = _document_filler(text)
        assert len(head + tail) > 10 and _cycle_breaks(head) + _cycle_breaks(tail) == 0
        assert tail[:1] in ([], [retrieval.FILLER[0]]) and head[:1] in ([], [retrieval.FILLER[0]])


def test_mix_fraction_of_tokens_and_resume():
    src = [{"text": ("def f%d(x):\n    return x + %d\n" % (i, i)) * 8} for i in range(30)]
    mix = synthetic.Mix(fraction=0.3, passkey_share=0.5)
    real = grain.MapDataset.source(src).repeat(None).map(
        functools.partial(tokenize_record, tokenizer=BYTE, text_key="text"))
    docs, _ = synthetic.mix_documents(real, grain.MapDataset.source(src), mix, tokenizer=BYTE,
                                      text_key="text", seq_len=128, min_doc_len=0, seed=0)
    lengths = np.array([len(docs[i]) for i in range(2000)])
    is_real = np.array([BYTE.decode(docs[i][1:5]) == "def " for i in range(2000)])
    assert 0.25 < lengths[~is_real].sum() / lengths.sum() < 0.35  # share of tokens
    ds = make_dataset(src, BYTE, seq_len=128, batch_size=4, seed=0, mix=mix, prefetch_batches=0)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = next(it)["tokens"]
    again = iter(make_dataset(src, BYTE, seq_len=128, batch_size=4, seed=0, mix=mix,
                              prefetch_batches=0))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], expected)
    assert synthetic.mix_problems({"fraction": 1.0, "passkey_share": 2}) == [
        "data.mix.fraction=1.0: expected a share of tokens in [0, 1)",
        "data.mix.passkey_share=2: expected a value in [0, 1]"]


def _questions_without_key(whole_docs: bool) -> tuple[int, int]:
    """(passkey questions in the first 40 rows, those whose row piece lacks the key)."""
    src = [{"text": "def f(x):\n    return x\n" * 40} for _ in range(8)]
    mix = synthetic.Mix(fraction=0.5, passkey_share=1.0)
    it = iter(make_dataset(src, BYTE, seq_len=512, batch_size=4, seed=0, mix=mix,
                           prefetch_batches=0, whole_docs=whole_docs))
    questions = orphans = 0
    for _ in range(10):
        batch = next(it)
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
            for seg in set(segments.tolist()) - {0}:
                text = BYTE.decode(tokens[segments == seg])
                if "What is the pass key?" in text:
                    questions += 1
                    orphans += re.search(r"The pass key is \d{5}\. Remember it", text) is None
    return questions, orphans


def test_whole_docs_keeps_every_passkey_question_with_its_key():
    questions, orphans = _questions_without_key(whole_docs=True)
    assert questions > 10 and orphans == 0
    questions, orphans = _questions_without_key(whole_docs=False)  # plain packing splits some
    assert questions > 10 and orphans > 0
