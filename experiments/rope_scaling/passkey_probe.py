"""How fast does the study's `small` model learn passkey retrieval at its training length?

    python experiments/rope_scaling/passkey_probe.py --out=runs/rope_study2 \
        --name=probeB --mix=0.5 --passkey_share=1.0 --whole_docs --steps=400

Pretrains like study.py (same tokenizer, model, batch, schedule, and its --mix,
--passkey_share and --whole_docs; OUT must hold the study's tokenizer and corpus)
for --steps steps, then scores every
checkpoint on passkey prompts at the training length, teacher-forced: a prompt
counts when the argmax at each answer position is the key's next token. That is
greedy decoding's exact match whenever the model emits the key in the training
documents' tokenization, so it is a lower bound on the evaluation's score, and one
forward pass per prompt instead of a decode.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402  (the study's sizes, config and training)

_NAME = flags.DEFINE_string("name", "probe", "Run name under OUT/runs.")
_STEPS = flags.DEFINE_integer("steps", 400, "Pretraining steps (a checkpoint every 100).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", "", "Continue from this lctx checkpoint (a run's export/) instead of from "
    "scratch: a second pretraining stage with this command's mix.")
_LR = flags.DEFINE_float("lr", None, "Peak learning rate (default: the study's pretrain_lr).")
_CHECK = flags.DEFINE_bool("check", False, "Also run the study's base check on the last step.")
_PROMPTS = flags.DEFINE_integer("prompts", 12, "Passkey prompts per checkpoint (depths 5-95%).")
_HEADS = flags.DEFINE_integer(
    "heads", 0, "Instead: for a finished run (--name), where each attention head looks from "
    "the answer's first token in prompts of this many filler sentences (first_digit_attention).")
_EXTEND = flags.DEFINE_list(
    "extend", [], "Instead: for a finished run (--name), fine-tune it with each of these study "
    "methods (e.g. none_ft,pi_ft,yarn_ft) as study.py does, on this command's mix, then score "
    "passkey at the study's lengths with and without each fine-tune (extend()).")
_BANDS = flags.DEFINE_bool(
    "bands", False, "Instead: for a finished run (--name), teacher-forced passkey at the "
    "training length with the study's factor applied to some wavelengths only "
    "(band_scalings()).")
_LAYOUTS = flags.DEFINE_integer(
    "layouts", 0, "Instead: for a finished run (--name), keys retrieved of 4 for every "
    "placement of the key line in a prompt of this many filler sentences.")


def teacher_forced_hits(model_config, forward, params, prompt, answer):
    """bool `[len(answer)]`: whether the argmax after prompt + answer[:i] is answer[i]."""
    import jax.numpy as jnp
    import numpy as np

    from lctx.infer.generate import prefill_length

    ids = np.concatenate([prompt, answer])
    padded = prefill_length(model_config, len(ids))  # the attention's tiles divide it
    ids = np.concatenate([ids, np.zeros(padded - len(ids), ids.dtype)])  # causal: unread
    predicted = np.asarray(jnp.argmax(forward(params, jnp.asarray(ids[None]))[0], -1))
    n = len(prompt)
    return predicted[n - 1:n - 1 + len(answer)] == np.asarray(answer)


def score(model_config, params, tokenizer, length: int, prompts: int) -> dict:
    """Teacher-forced passkey exact match and per-token accuracy over `prompts` depths."""
    import jax
    import numpy as np

    from lctx import model as lm
    from lctx.eval import retrieval

    forward = jax.jit(lambda p, x: lm.forward(model_config, p, x))
    rng = np.random.default_rng(123)
    exact, token_hits = [], []
    for depth in np.linspace(0.05, 0.95, prompts):
        key = retrieval.passkey_keys(rng, 1)[0]
        prompt = retrieval.passkey_prompt(tokenizer, length, float(depth), key)
        if prompt is None:
            raise SystemExit(f"passkey_probe: no passkey prompt fits {length} tokens")
        hits = teacher_forced_hits(model_config, forward, params, prompt.ids,
                                   tokenizer.encode(f" {key}"))
        exact.append(bool(hits.all()))
        token_hits.append(float(hits.mean()))
    return {"exact": float(np.mean(exact)), "token_accuracy": float(np.mean(token_hits))}


def layout_prompt(tokenizer, key: str, before: int, after: int) -> list[int]:
    """BOS and the passkey prompt with the short instruction (as the evaluation uses at
    small lengths) and `before` / `after` filler sentences around the key line."""
    from lctx.eval import retrieval

    text = retrieval.passkey_text(key, before, after, retrieval.SHORT_INSTRUCTION)
    return [tokenizer.bos_id, *[int(t) for t in tokenizer.encode(text)]]


def by_layout(model_config, params, tokenizer, sentences: int, keys: int = 4) -> list[int]:
    """Teacher-forced keys retrieved (of `keys`) with b = 0..sentences filler sentences
    before the key line (short instruction, as the evaluation uses at small lengths)."""
    import jax
    import numpy as np

    from lctx import model as lm
    from lctx.eval import retrieval

    forward = jax.jit(lambda p, x: lm.forward(model_config, p, x))
    drawn = retrieval.passkey_keys(np.random.default_rng(7), keys)
    counts = []
    for before in range(sentences + 1):
        hits = 0
        for key in drawn:
            prompt = np.asarray(layout_prompt(tokenizer, key, before, sentences - before),
                                np.int32)
            hits += bool(teacher_forced_hits(model_config, forward, params, prompt,
                                             tokenizer.encode(f" {key}")).all())
        counts.append(hits)
    return counts


def recorded_attention(model_config):
    """`(params, ids [1, s]) -> (logits, [(q, k) per layer])`: the forward pass with each
    layer's rotated q `[1, s, h, d]` and k `[1, s, kv, d]` recorded. The model's attention
    is wrapped for this diagnostic only: the layers are scanned, so a host callback is the
    way to see inside them."""
    import jax
    import numpy as np

    from lctx import model as lm
    from lctx.model import transformer

    recorded = []
    plain = transformer.attention_fn

    def recording(cfg, mesh):
        attend = plain(cfg, mesh)

        def wrapped(q, k, v, positions, segment_ids):
            jax.debug.callback(lambda q, k: recorded.append((np.asarray(q), np.asarray(k))), q, k,
                               ordered=True)
            return attend(q, k, v, positions, segment_ids)
        return wrapped

    def run(params, ids):
        recorded.clear()
        transformer.attention_fn = recording
        try:
            logits = np.asarray(lm.forward(model_config, params, ids))
            jax.effects_barrier()
        finally:
            transformer.attention_fn = plain
        return logits, list(recorded)
    return run


def first_digit_attention(model_config, params, tokenizer, sentences: int,
                          keys=("48213", "70956", "31597")) -> list[dict]:
    """Where the retrieval head looks when the answer starts, by layout.

    For every number `after` = 0..sentences of filler sentences between the key line and
    the question (short instruction): the attention of each head, at the answer's first
    token (whose next token is the key's first digit), on the key's first digit (both
    copies in the key line), and which key digit (copy, place 1-5) the head that puts the
    most mass there overall looks at most. Returns one dict per (key, after).
    """
    import numpy as np

    run = recorded_attention(model_config)
    rows = []
    for key in keys:
        answer = [int(t) for t in tokenizer.encode(f" {key}")]
        digits = answer[-len(key):]
        for after in range(sentences + 1):
            prompt = layout_prompt(tokenizer, key, sentences - after, after)
            ids = np.asarray(prompt + answer, np.int32)
            ids = np.concatenate([ids, np.zeros(-len(ids) % 8, np.int32)])[None]
            logits, layers = run(params, ids)
            n = len(prompt)
            retrieved = bool((logits[0, n - 1:n - 1 + len(answer)].argmax(-1) == answer).all())
            starts = [j for j in range(n - len(digits)) if prompt[j:j + len(digits)] == digits]
            probs = []
            for q, k in layers:  # softmax of one query row, float64, GQA heads repeated
                scores = np.einsum("hd,thd->ht", q[0, n].astype(np.float64),
                                   np.repeat(k[0, :n + 1], q.shape[2] // k.shape[2], 1))
                scores /= np.sqrt(q.shape[-1])
                p = np.exp(scores - scores.max(-1, keepdims=True))
                probs.append(p / p.sum(-1, keepdims=True))
            probs = np.stack(probs)  # [layers, heads, n + 1]
            rows.append({"key": key, "after": after, "distance": n - starts[0],
                         "retrieved": retrieved, "on_first_digit": probs[..., starts].sum(-1),
                         "on_key_digits": np.stack([probs[..., j:j + len(digits)]
                                                    for j in starts], -2)})
    mean = np.mean([r["on_first_digit"] for r in rows], 0)
    layer, head = np.unravel_index(int(mean.argmax()), mean.shape)
    for r in rows:
        r["head"] = (int(layer), int(head))
        r["head_on_first_digit"] = float(r["on_first_digit"][layer, head])
        copy, place = np.unravel_index(int(r["on_key_digits"][layer, head].argmax()),
                                       r["on_key_digits"].shape[-2:])
        r["head_digit"] = (int(copy) + 1, int(place) + 1)
    return rows


def band_scalings(model_config, factor: float, length: int,
                  edges=(8, 16, 32, 64, 128, 256)) -> dict:
    """{name: rope_scaling}: position interpolation (every angle / factor) on the frequency
    pairs whose wavelength 2 pi / theta_i, in tokens, lies in one band between `edges`
    (`8-16`, ...) or above one edge (`>=8`, ...; `>=0` is PI), the rest left as trained.
    Each is a `longrope` scaling with the same per-pair factors at every length and no
    attention temperature, so it changes exactly those rotations."""
    import numpy as np

    from lctx.model.rope import inverse_frequencies

    inv_freq, _ = inverse_frequencies(model_config.rope, model_config.head_dim)
    wavelength = 2 * np.pi / inv_freq
    lows = (0, *edges)
    selections = {f"{lo}-{hi}": (wavelength >= lo) & (wavelength < hi)
                  for lo, hi in zip(lows, edges)}
    selections |= {f">={lo}": wavelength >= lo for lo in lows}
    scalings = {}
    for name, chosen in selections.items():
        factors = [float(f) for f in np.where(chosen, factor, 1.0)]
        scalings[name] = {"rope_type": "longrope", "short_factor": factors,
                          "long_factor": factors, "attention_factor": 1.0,
                          "original_max_position_embeddings": length}
    return scalings


def extend(out: str, s: dict, config, tokenizer, tokenizer_path: str,
           finetunes: list[str]) -> dict:
    """Does the probe's retrieval survive extension? Each method in `finetunes` fine-tunes
    the finished probe (`config`'s run) exactly as in the study, on the probe's own mix.
    Scored on passkey at each of the study's lengths where a prompt fits, teacher-forced
    over `--prompts` depths (score()) and greedy as the study does (its depths x trials
    keys): the fine-tunes, plain RoPE (`none`), dynamic NTK, and each fine-tune's scaling
    on the probe's weights before any fine-tuning (`<rope_type>_zero_shot`); and every
    fine-tune checkpoint teacher-forced at the training length (`by_step`). Returns
    {model: {"teacher_forced": {length: exact}, "greedy": {length: accuracy}[, "by_step":
    {step: exact}]}}, also written to the run's extend.json."""
    from lctx.eval import retrieval
    from lctx.eval.api import load_run, with_rope_scaling
    from lctx.training.loop import open_run_corpus

    table = study.methods(s)
    bad = [n for n in finetunes if not table.get(n, {}).get("finetune")]
    if bad:
        raise SystemExit(f"passkey_probe: --extend={','.join(finetunes)}: {bad} are not "
                         f"fine-tuned methods; allowed: "
                         f"{', '.join(n for n, m in table.items() if m['finetune'])}")
    lengths = [n for n in s["lengths"] if retrieval.passkey_prompt(tokenizer, n, 0.5, "12345")]
    if not lengths:
        raise SystemExit(f"passkey_probe: --extend: no passkey prompt fits any of the lengths "
                         f"{s['lengths']}")
    _, base_model, base_params, _, _ = load_run(config.workdir)
    export = study.ensure_export(config.workdir, base_model, base_params)
    corpus = open_run_corpus(config, os.path.abspath(config.workdir))
    scalings = {"none": None, "dynamic": table["dynamic"]["rope_scaling"]}
    scalings |= {f"{table[n]['rope_scaling']['rope_type']}_zero_shot": table[n]["rope_scaling"]
                 for n in finetunes if table[n]["rope_scaling"]}
    models = {name: (with_rope_scaling(base_model, scaling), base_params)
              for name, scaling in scalings.items()}
    workdirs = {}
    for name in finetunes:
        ft = study.finetune_config(out, s, f"{_NAME.value}_{name}", 0, tokenizer_path,
                                   table[name]["rope_scaling"], export)
        study.train(ft)
        models[name] = load_run(ft.workdir)[1:3]
        workdirs[name] = ft.workdir
    results = {}
    for name, (model_config, params) in models.items():
        greedy = study.evaluate(s, model_config, params, corpus, tokenizer, lengths,
                                tasks=("passkey",))["passkey"]
        forced = {n: score(model_config, params, tokenizer, n, _PROMPTS.value)["exact"]
                  for n in lengths}
        results[name] = {"teacher_forced": forced, "greedy": greedy}
        print(f"{name}: passkey by length, teacher-forced " + ", ".join(
            f"{n}: {v:.2f}" for n, v in forced.items()) + "; greedy " + ", ".join(
            f"{n}: {v:.2f}" for n, v in greedy.items()), flush=True)
        if name in workdirs:
            results[name]["by_step"] = by_step = {}
            for step in study._checkpoint_steps(workdirs[name]):
                step_config, step_params = load_run(workdirs[name], step)[1:3]
                by_step[step] = score(step_config, step_params, tokenizer, s["train_len"],
                                      _PROMPTS.value)["exact"]
            print(f"{name}: teacher-forced at {s['train_len']} after k fine-tune steps " +
                  ", ".join(f"{k}: {v:.2f}" for k, v in by_step.items()), flush=True)
    with open(os.path.join(config.workdir, "extend.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv: list[str]) -> None:
    del argv
    from lctx import data as ld
    from lctx.eval.api import load_run

    out = flags.FLAGS.out
    s = study.sizes_from_flags()
    if _LR.value is not None and not _LR.value > 0:
        raise SystemExit(f"passkey_probe: --lr={_LR.value}: expected a learning rate > 0")
    tokenizer_path = os.path.join(out, f"spm{s['vocab']}.model")
    if not os.path.isfile(tokenizer_path):
        raise SystemExit(f"passkey_probe: {tokenizer_path} missing: run study.py --out={out} first")
    config = study.pretrain_config(out, s, _NAME.value, 0, tokenizer_path, _STEPS.value,
                                   _LR.value or s["pretrain_lr"], _INIT_FROM.value)
    tokenizer = ld.make_tokenizer(config.data.tokenizer)
    if _HEADS.value:
        _, model_config, params, _, _ = load_run(config.workdir)
        rows = first_digit_attention(model_config, params, tokenizer, _HEADS.value)
        layer, head = rows[0]["head"]
        print(f"{_NAME.value}: layer {layer} head {head} (most attention on the key's first "
              f"digit); per key and filler sentences after the key line: retrieved, its "
              f"attention on the first digit, the key digit it looks at most")
        for r in rows:
            print(f"  key {r['key']} after {r['after']:2d} (distance {r['distance']:3d}): "
                  f"{'yes' if r['retrieved'] else 'no '}  {r['head_on_first_digit']:.2f}  "
                  f"copy {r['head_digit'][0]} digit {r['head_digit'][1]}")
        on = [r["retrieved"] for r in rows if r["head_on_first_digit"] >= 0.5]
        off = [r["retrieved"] for r in rows if r["head_on_first_digit"] < 0.5]
        print(f"retrieved in {sum(on)} of {len(on)} prompts where the head puts at least half "
              f"its attention on the first digit, in {sum(off)} of {len(off)} elsewhere")
        return
    if _EXTEND.value:
        extend(out, s, config, tokenizer, tokenizer_path, _EXTEND.value)
        return
    if _BANDS.value:
        from lctx.eval.api import with_rope_scaling

        _, model_config, params, _, _ = load_run(config.workdir)
        L = s["train_len"]
        results = {"none": score(model_config, params, tokenizer, L, _PROMPTS.value)["exact"]}
        for name, scaling in band_scalings(model_config, float(s["factor"]), L).items():
            results[name] = score(with_rope_scaling(model_config, scaling), params, tokenizer,
                                  L, _PROMPTS.value)["exact"]
        print(f"{_NAME.value}: teacher-forced passkey at {L}, angles / {s['factor']} on the "
              "wavelengths (tokens) named: " +
              ", ".join(f"{n}: {v:.2f}" for n, v in results.items()))
        with open(os.path.join(config.workdir, "bands.json"), "w") as f:
            json.dump(results, f, indent=1)
        return
    if _LAYOUTS.value:
        _, model_config, params, _, _ = load_run(config.workdir)
        counts = by_layout(model_config, params, tokenizer, _LAYOUTS.value)
        print(f"{_NAME.value}: keys retrieved of 4 by filler sentences before the key line "
              f"(of {_LAYOUTS.value}): {counts}")
        return
    study.train(config)
    results = {}
    for step in study._checkpoint_steps(config.workdir):
        _, model_config, params, _, _ = load_run(config.workdir, step)
        results[step] = score(model_config, params, tokenizer, s["train_len"], _PROMPTS.value)
        print(f"step {step}: passkey@{s['train_len']} exact {results[step]['exact']:.2f}, "
              f"token accuracy {results[step]['token_accuracy']:.2f}", flush=True)
    record = {key: s[key] for key in ("mix", "passkey_share", "whole_docs")}
    record |= {"init_from": _INIT_FROM.value, "lr": config.stages.pretrain.learning_rate,
               "by_step": results}
    if _CHECK.value:
        from lctx.training.loop import open_run_corpus

        corpus = open_run_corpus(config, os.path.abspath(config.workdir))
        record["check"] = study.base_check(s, model_config, params, corpus, tokenizer)
        c = record["check"]
        print(f"base check: ppl@4x / ppl@1x {c['extrapolation_ratio']:.2f}, ppl@short / ppl@1x "
              f"{c['context_gain']:.2f}: {'passes' if c['passes'] else 'FAILS'}", flush=True)
    with open(os.path.join(config.workdir, "passkey_probe.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    app.run(main)
