"""The evaluation task registry and the RULER-style tasks: prompt sizes, where the needles
sit, distractors, scoring, chat wrapping, and an oracle that reads the prompt text."""

import re

import numpy as np
import pytest

from lctx.data import ByteTokenizer
from lctx.eval import api, ruler
from lctx.eval.tasks import TASKS, EvalContext, RulerTask, base

BYTE = ByteTokenizer()
RULER_TASKS = ("multikey_needle", "multivalue", "multiquery", "variable_tracking")
# Lines of varied length: a depth is checked to within one line.
HAY = [{"text": "".join(f"line {i} of doc {d}: {'word ' * (i % 7)}end.\n" for i in range(400))}
       for d in range(3)]
LONGEST_LINE = max(len(line) + 1 for doc in HAY for line in doc["text"].splitlines())
NIAH = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")
VAR = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")

# SmolLM2-Instruct's chat template (ChatML with a default system turn).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatBytes(ByteTokenizer):
    chat_template = CHATML
    add_bos = False


def _ctx(tokenizer=BYTE, depths=(0.0, 0.5, 1.0), trials=2, reply=None, lengths=(2048,)):
    return EvalContext(tokenizer=tokenizer, held_out=HAY, text_key="text", lengths=lengths,
                       depths=depths, options={**api.DEFAULTS, "trials": trials},
                       continue_text=reply or (lambda prompts, n: [""] * len(prompts)),
                       perplexity=None)


def _prompt(name, length=2048, depth=0.5, seed=0, tokenizer=BYTE):
    return TASKS[name].prompt(_ctx(tokenizer), length, depth, 0, np.random.default_rng(seed))


# ----------------------------------------------------------------------------- reading prompts


def _question(text):
    return text[text.rindex("\nWhat") + 1:] if "\nWhat" in text else text[text.rindex("\nQuestion"):]


def _oracle_answers(text):
    """The answers, read from the prompt text alone: the needles of the asked keys, or the
    variables whose chain ends at the asked value."""
    question = _question(text)
    if "VAR " in text:
        value = re.search(r"assigned the value (\d+) in", question).group(1)
        parent = {m.group(1): m.group(2) or m.group(3) for m in VAR.finditer(text)}

        def root(name):
            while name in parent:
                name = parent[name]
            return name
        return [name for name in parent if root(name) == value]
    asked = re.search(r"numbers? for (.+?) mentioned in the provided text\?", question).group(1)
    keys = re.split(r", | and ", asked)
    needles = NIAH.findall(text[:len(text) - len(question)])
    return [v for key in keys for k, v in needles if k == key]


def _context(text):
    """The haystack with the inserted sentences, between the instruction and the question."""
    start = text.index("\n") + 1
    return text[start:len(text) - len(_question(text))]


def _depth_of(context, offset):
    """(plain haystack characters before `offset`, all of them): the inserted sentences removed."""
    plain = lambda s: VAR.sub("", NIAH.sub("", s)).replace(". \n", ".\n")
    return len(plain(context[:offset])), len(plain(context))


# ----------------------------------------------------------------------------- registry


def test_registry_names_are_what_validation_allows():
    assert set(TASKS) == {"ppl", "passkey", "needle", *RULER_TASKS}
    assert api.check_options(("ppl", *RULER_TASKS), (64,), {}) == []
    problem, = api.check_options(("ppl", "bleu"), (64,), {})
    assert problem.startswith("tasks=ppl,bleu: expected a non-empty subset of")
    assert all(name in problem for name in TASKS)


def test_a_registered_task_is_accepted_and_runs(monkeypatch):
    monkeypatch.setattr(base, "TASKS", dict(TASKS))  # the real registry stays as it was
    monkeypatch.setattr(api, "TASKS", base.TASKS)

    @base.register
    class Echo(RulerTask):
        name = "echo"

        def prompt(self, ctx, length, depth, trial, rng):
            return ruler.RulerPrompt(np.arange(4, dtype=np.int32), ("7",), depth, 0.5, 3)

    assert "echo" in api.TASKS and api.check_options(("echo",), (64,), {}) == []
    section = base.TASKS["echo"].run(_ctx(reply=lambda p, n: [" 7"] * len(p), lengths=(64,)))
    assert section["accuracy"] == {"64": 1.0}
    with pytest.raises(ValueError, match="registered twice"):
        base.register(Echo)


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", RULER_TASKS)
@pytest.mark.parametrize("length", [2200, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_prompt_length_depth_and_distractors(name, length, depth):
    p = _prompt(name, length, depth, seed=length)
    # The prompt and its reply fill the length (bytes = tokens here), BOS first.
    assert p.ids[0] == BYTE.bos_id
    assert length - 16 <= len(p.ids) + p.max_new_tokens <= length
    text = BYTE.decode(p.ids)
    assert sorted(_oracle_answers(text)) == sorted(p.answers)
    context = _context(text)
    if name == "variable_tracking":
        statements = VAR.findall(context)
        roots = [v for _, _, v in statements if v]
        asked = re.search(r"assigned the value (\d+) in", _question(text)).group(1)
        assert len({n for n, _, _ in statements}) == 10  # two chains of five names
        assert len(roots) == 2 and roots.count(asked) == 1  # the distractor has another value
        first = re.search(rf"VAR {p.answers[0]} = {asked}\.", context)
    else:
        needles = NIAH.findall(context)
        count = {"multikey_needle": 4, "multivalue": 4, "multiquery": 6}[name]
        assert len(needles) == count and len({v for _, v in needles}) == count
        asked = set(re.split(r", | and ", re.search(r"numbers? for (.+?) mentioned",
                                                     _question(text)).group(1)))
        distractors = [(k, v) for k, v in needles if k not in asked]
        assert len(distractors) == {"multikey_needle": 3, "multivalue": 0, "multiquery": 2}[name]
        assert all(v not in p.answers for _, v in distractors)
        first = re.search(rf"One of the special magic numbers for [a-z-]+ is: {p.answers[0]}\.",
                          context)
    # The first answer's sentence sits at the depth, moved back at most one line.
    before, total = _depth_of(context, first.start())
    assert 0 <= depth * total - before <= LONGEST_LINE + 1


def test_same_trial_same_needles_at_every_depth():
    a, b = (_prompt("multikey_needle", 2048, d, seed=3) for d in (0.0, 1.0))
    assert a.answers == b.answers
    assert sorted(NIAH.findall(BYTE.decode(a.ids))) == sorted(NIAH.findall(BYTE.decode(b.ids)))


def test_short_lengths_are_skipped():
    assert _prompt("multiquery", 512) is None  # the needles alone are over half the prompt
    section = TASKS["multiquery"].run(_ctx(lengths=(512, 2048), trials=1))
    assert section["skipped"] == {"512": "haystack too short for this length"}
    assert {c["length"] for c in section["cells"]} == {2048}


# ----------------------------------------------------------------------------- scoring


def test_scoring_exact_answers_only():
    key = _prompt("multikey_needle")
    task = TASKS["multikey_needle"]
    value = key.answers[0]
    assert task.score(f" {value}.", key) == 1.0
    assert task.score(f" {int(value) + 1}.", key) == 0.0
    assert task.score(f" {value[:-1]}", key) == 0.0
    assert task.score(" none found", key) == 0.0
    multi = _prompt("multivalue")
    a, b, c, d = multi.answers
    assert TASKS["multivalue"].score(f" {d}, {b}, {a} and {c}.", multi) == 1.0
    assert TASKS["multivalue"].score(f" {a}, {b}, 1234567 and {c}.", multi) == 0.75
    # Only the first four numbers count: a reply listing everything does not win.
    assert TASKS["multivalue"].score(f" 1111111, 2222222, {a}, {b}, {c}, {d}", multi) == 0.5
    vt = _prompt("variable_tracking")
    names = ", ".join(vt.answers)
    assert TASKS["variable_tracking"].score(f" {names}.", vt) == 1.0
    assert TASKS["variable_tracking"].score(" ABCDE, FGHIJ.", vt) == 0.0


@pytest.mark.parametrize("name", RULER_TASKS)
def test_oracle_scores_everything_and_random_nothing(name):
    def oracle(prompts, max_new):
        replies = [" " + ", ".join(_oracle_answers(BYTE.decode(p))) + "." for p in prompts]
        assert all(len(BYTE.encode(r)) <= max_new for r in replies)
        return replies

    def random_reply(prompts, max_new):
        rng = np.random.default_rng(1)
        if name == "variable_tracking":
            return [" " + ", ".join(ruler.random_names(rng, 5)) for _ in prompts]
        return [" " + ", ".join(ruler.random_numbers(rng, 4)) for _ in prompts]

    good = TASKS[name].run(_ctx(reply=oracle, lengths=(2200, 3000)))
    assert good["accuracy"] == {"2200": 1.0, "3000": 1.0} and good["skipped"] == {}
    assert [(c["length"], c["depth"], c["correct"], c["trials"]) for c in good["cells"]] == [
        (n, d, 2, 2) for n in (2200, 3000) for d in (0.0, 0.5, 1.0)]
    assert good["effective_length"] == {"yarn_80": 3000, "pi_20": 3000}
    bad = TASKS[name].run(_ctx(reply=random_reply, lengths=(2200,)))
    assert bad["accuracy"]["2200"] < 0.05 and bad["effective_length"]["yarn_80"] == 0


# ----------------------------------------------------------------------------- chat template


def test_chat_template_wraps_the_question():
    p = _prompt("multikey_needle", 2048, 0.5, tokenizer=ChatBytes())
    text = ChatBytes().decode(p.ids)
    assert p.ids[0] != BYTE.bos_id  # the tokenizer takes no BOS
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert f"<|im_end|>\n<|im_start|>user\n{ruler.NIAH_INSTRUCTION}\n" in text
    assert text.endswith("mentioned in the provided text?<|im_end|>\n<|im_start|>assistant\n"
                         f"The special magic number for {_asked(text)} mentioned in the provided "
                         "text is")
    assert 2048 - 16 <= len(p.ids) + p.max_new_tokens <= 2048
    plain = BYTE.decode(_prompt("multikey_needle", 2048, 0.5).ids)
    assert "<|im_start|>" not in plain and "provided text? The special magic number" in plain


def _asked(text):
    return re.search(r"number for ([a-z]+-[a-z]+) mentioned in the provided text\?", text).group(1)


def test_insert_sentences_keeps_order_at_one_boundary():
    text, offsets = ruler.insert_sentences("a b. c d. e f.", [(0.5, "X."), (0.5, "Y."), (0.0, "Z.")])
    assert text == "Z. a b. X. Y. c d. e f."
    assert [text[o:o + 2] for o in offsets] == ["X.", "Y.", "Z."]


# ----------------------------------------------------------------------------- --model end to end


def test_default_perplexity_text_is_the_stdlib_held_out_split():
    from lctx.data.corpus import VALIDATION_FRACTION, iter_files, split_of, stdlib_spec

    docs = api.held_out_documents()
    files = {rel: path for rel, path in iter_files(stdlib_spec())}
    held = [rel for rel in files if split_of(rel, VALIDATION_FRACTION) == "validation"]
    assert 0.02 < len(held) / len(files) < 0.1
    # Every document is the text of one held-out file, in path order; no training file.
    texts = [files[rel].read_text("utf-8", errors="strict") for rel in held]
    assert [d["text"] for d in docs] == [t for t in texts if t.strip()]


def test_command_line_evaluates_a_checkpoint(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import jax

    import lctx.model as lm
    from lctx.convert.checkpoint import save_checkpoint

    config = lm.preset("tiny", attention_impl="reference")
    save_checkpoint(config, lm.init(config, jax.random.key(0)), tmp_path / "ckpt")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(HAY):
        (corpus / f"doc{i}.txt").write_text(doc["text"][:6000])
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-m", "lctx.eval", f"--model={tmp_path / 'ckpt'}", "--tokenizer=byte",
         "--tasks=ppl,multikey_needle", "--lengths=64,128,1600", "--depths=0,1", "--trials=1",
         f"--corpus_dir={corpus}", f"--out={out}", "--max_tokens=512",
         '--rope_scaling={"rope_type": "linear", "factor": 2.0}'],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["lengths"] == [64, 128, 1600] and results["training_lengths"] == [256]
    assert results["rope"]["rope_parameters"]["rope_type"] == "linear"
    assert results["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert set(results["ppl"]) == {"64", "128", "1600"}
    assert all(r["tokens"] > 0 and r["ppl"] > 1 for r in results["ppl"].values())
    needle = results["multikey_needle"]
    assert needle["skipped"] == {"64": "haystack too short for this length",
                                 "128": "haystack too short for this length"}
    assert [(c["length"], c["depth"], c["trials"]) for c in needle["cells"]] == [
        (1600, 0.0, 1), (1600, 1.0, 1)]
    assert needle["accuracy"]["1600"] == np.mean([c["accuracy"] for c in needle["cells"]])
    assert sorted(os.path.basename(p) for p in results["plots"]) == [
        "multikey_needle.png", "multikey_needle_heatmap.png", "ppl_vs_length.png"]
    assert all((out / os.path.basename(p)).read_bytes()[:4] == b"\x89PNG" for p in results["plots"])
    assert all(isinstance(c["reply"], str) for c in needle["cells"])
    assert "multikey_needle acc" in run.stdout and "wrote" in run.stdout


def test_default_out_dir_names_the_source_and_scaling():
    assert api.default_out_dir("smollm2-135m") == "eval_results/smollm2-135m"
    assert api.default_out_dir("/m/SmolLM2.Q4_1.gguf") == "eval_results/SmolLM2.Q4_1"
    assert api.default_out_dir("runs/tiny@30") == "eval_results/tiny_step30"
    assert api.default_out_dir("ckpt/", {"rope_type": "yarn", "factor": 4.0}) == \
        "eval_results/ckpt_yarn4"
    assert api.default_out_dir("ckpt", {}) == "eval_results/ckpt_default"
