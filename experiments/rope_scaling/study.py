"""A small-scale reproduction of RoPE-scaling results (PI, NTK, dynamic NTK, YaRN, Llama 3).

    python experiments/rope_scaling/study.py --out=runs/rope_study            # the study
    python experiments/rope_scaling/study.py --quick --out=/tmp/rope_quick    # pipeline check

Steps (each resumable: rerun the same command and finished parts are skipped):
1. A SentencePiece tokenizer trained on the corpus's train split (lengths count its tokens).
2. Per seed, the `small` model pretrained at 256 tokens with the synthetic retrieval
   mix (lctx.data.synthetic), then, when `retrieval_steps` (default 0), a second stage
   at 256 on a passkey-heavy mix of whole documents: more retrieval training while
   the first stage keeps enough real text for the base check (README, follow-up 4).
3. The base check: plain extrapolation at 4x must have at least 2x the in-distribution
   perplexity, and perplexity at 256 must be well below that at 32 (a model that does
   not use its context shows no extrapolation failure worth repairing). Scored on
   `check_tokens` held-out tokens per length: 4096 put the ratio's noise across the rule.
4. Per method: none, none + fine-tune, linear (PI) + fine-tune, ntk, dynamic, yarn +
   fine-tune, llama3 + fine-tune; fine-tunes at 4x the training length. Perplexity and
   bits per byte at 1x-16x and passkey accuracy at the same lengths.
Results append to OUT/results.jsonl (one line per method and seed); `--report` turns
them into OUT/report.md and plots (mean and spread over seeds).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from absl import app, flags

_OUT = flags.DEFINE_string("out", "runs/rope_study", "Directory for runs, tokenizer and results.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny pipeline check (the test suite runs it).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Pretraining seeds (each method runs per seed).")
_METHODS = flags.DEFINE_list("methods", [], "Subset of methods (default: all).")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", None, "Override the pretraining steps.")
_FT_STEPS = flags.DEFINE_integer("ft_steps", None, "Override the fine-tune steps (<= 200).")
_FT_LR = flags.DEFINE_float("ft_lr", None, "Override the fine-tunes' (constant) learning rate.")
_SHARE_BASE = flags.DEFINE_bool(
    "share_base", False, "Pretrain once (the first seed) and vary only the fine-tune data order "
    "and passkey keys over seeds: the cheap variant when the CPU is short.")
_MIX = flags.DEFINE_float("mix", None, "Override data.mix.fraction (synthetic share of tokens).")
_PASSKEY_SHARE = flags.DEFINE_float("passkey_share", None, "Override data.mix.passkey_share.")
_WHOLE_DOCS = flags.DEFINE_bool(
    "whole_docs", False, "Pack with data.whole_docs: a document that fits a row is never split "
    "(with plain packing about a quarter of the passkey questions lose their key).")
_RETRIEVAL_STEPS = flags.DEFINE_integer(
    "retrieval_steps", None, "Override the second pretraining stage's steps (0: no second "
    "stage): the same length, the retrieval mix, whole documents.")
_RETRIEVAL_MIX = flags.DEFINE_float("retrieval_mix", None, "Override its data.mix.fraction.")
_RETRIEVAL_LR = flags.DEFINE_float("retrieval_lr", None, "Override its peak learning rate.")
_FT_MIX = flags.DEFINE_enum(
    "ft_mix", None, ["pretrain", "retrieval"], "The fine-tunes' data: the first pretraining "
    "stage's mix (default) or the second stage's (retrieval mix, whole documents).")
_REPORT = flags.DEFINE_bool("report", True, "Write OUT/report.md and plots at the end.")
_PLOTS = flags.DEFINE_string("plots", "", "Also copy the plots here (e.g. experiments/rope_scaling).")

# Sizes. Full: the study on a 2-core CPU. Quick: seconds per part (each run's
# time is mostly compiling, hence its dense attention).
FULL = dict(preset="small", corpus_dir="", vocab=2048, train_len=256, factor=4,
            pretrain_steps=1200, pretrain_batch=16, pretrain_lr=3e-3,
            ft_steps=100, ft_batch=4, ft_lr=5e-4, ft_every=10, mix=0.25, passkey_share=0.7,
            retrieval_steps=0, retrieval_mix=0.5, retrieval_passkey_share=1.0, retrieval_lr=1e-3,
            ft_mix="pretrain",
            lengths=(256, 512, 1024, 2048, 4096), short=32, stride=256, max_tokens=4096,
            check_tokens=16384, depths=(0.1, 0.5, 0.9), trials=3, curve_tokens=2048,
            attention="blockwise", block=256, validation_fraction=0.05)
QUICK = dict(preset="tiny", corpus_dir="TEST", vocab=384, train_len=64, factor=2,
             pretrain_steps=4, pretrain_batch=8, pretrain_lr=3e-3,
             ft_steps=2, ft_batch=8, ft_lr=1e-3, ft_every=2, mix=0.2, passkey_share=0.5,
              retrieval_steps=2, retrieval_mix=0.5, retrieval_passkey_share=1.0, retrieval_lr=1e-3,
             ft_mix="pretrain",
             lengths=(64, 128), short=16, stride=32, max_tokens=256,
             check_tokens=256, depths=(0.5,), trials=1, curve_tokens=128,
             attention="reference", block=0,  # dense: a third of the compile time at 128 tokens
             validation_fraction=0.25)


def methods(s: dict) -> dict[str, dict[str, Any]]:
    """name -> {"rope_scaling": HF dict or None, "finetune": bool}."""
    L, f = s["train_len"], float(s["factor"])
    return {
        "none": {"rope_scaling": None, "finetune": False},
        "none_ft": {"rope_scaling": None, "finetune": True},
        "pi_ft": {"rope_scaling": {"rope_type": "linear", "factor": f}, "finetune": True},
        "ntk": {"rope_scaling": {"rope_type": "ntk", "factor": f}, "finetune": False},
        "dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": f}, "finetune": False},
        "yarn_ft": {"rope_scaling": {"rope_type": "yarn", "factor": f,
                                     "original_max_position_embeddings": L}, "finetune": True},
        "llama3_ft": {"rope_scaling": {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": L}, "finetune": True},
    }


def _corpus_dir(s: dict) -> str:
    if s["corpus_dir"] == "TEST":
        return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "tests", "data", "corpus")
    return s["corpus_dir"]


def ensure_tokenizer(out: str, s: dict) -> str:
    """A SentencePiece model trained on the train split (validation files left out)."""
    from lctx.data.corpus import CorpusSpec, iter_texts
    from lctx.data.tokenizer import train_sentencepiece

    path = os.path.join(out, f"spm{s['vocab']}.model")
    if not os.path.isfile(path):
        spec = CorpusSpec.from_dir(_corpus_dir(s) or "stdlib", ["*"])
        texts = (text for _, text in iter_texts(spec, "train", s["validation_fraction"]))
        train_sentencepiece(texts, s["vocab"], path)
    return path


def run_config(out: str, s: dict, name: str, seed: int, tokenizer: str, stages: dict,
               init_from: str = ""):
    """A lctx.training config: the study's model and data, the given stages."""
    from lctx.training.config import base_config, stage

    c = base_config()
    c.name = name
    c.workdir = os.path.join(out, "runs", name)
    c.seed = seed
    c.init_from = init_from
    c.model.preset = s["preset"]
    c.model.max_position_embeddings = s["train_len"]  # dynamic NTK's L: the training length
    c.model.attention_impl = s["attention"]
    if s["attention"] == "blockwise":
        c.model.attention_options.block_q = s["block"]
        c.model.attention_options.block_k = s["block"]
    c.data.corpus_dir = _corpus_dir(s)
    c.data.tfds_data_dir = os.path.join(out, "tfds")
    c.data.tokenizer = f"sentencepiece:{tokenizer}"
    c.data.validation_fraction = s["validation_fraction"]
    c.data.mix.fraction = s["mix"]
    c.data.mix.passkey_share = s["passkey_share"]
    c.data.whole_docs = s["whole_docs"]
    c.stage_order = tuple(stages)
    vocab = int(math.ceil(s["vocab"] / 128) * 128)  # the tokenizer's ids, padded for TP
    for key, values in stages.items():
        c.stages[key] = stage(**values, model={"vocab_size": vocab})
    c.checkpoint.every_steps = s["ft_every"]
    c.checkpoint.keep = 100
    c.checkpoint.async_save = False
    c.log_every_steps = max(1, min(25, values["steps"]))
    c.eval.lengths = (s["train_len"],)  # the study evaluates itself, below
    c.eval.max_tokens = s["curve_tokens"]
    c.eval.stride = s["stride"]
    return c


def train(config) -> None:
    import jax

    from lctx.training import config as cfg
    from lctx.training.loop import run

    problems = cfg.problems(config, jax.device_count())
    if problems:
        raise SystemExit("invalid study config:\n  " + "\n  ".join(problems))
    summary = run(config)
    if "interrupted" in summary:  # a checkpoint is saved; rerunning resumes
        raise SystemExit(f"study: {config.name} interrupted by {summary['interrupted']}")


def _done(results_path: str) -> dict[tuple, dict]:
    found = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            for line in f:
                r = json.loads(line)
                found[(r["kind"], r["method"], r["seed"])] = r
    return found


def _append(results_path: str, record: dict) -> None:
    with open(results_path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    print(f"[study] {record['kind']} {record['method']} seed {record['seed']}: "
          f"{json.dumps(_brief(record), default=float)}", flush=True)


def _brief(r: dict) -> dict:
    out = {}
    for n, v in r.get("ppl", {}).items():
        out[f"ppl@{n}"] = round(v["ppl"], 2)
    for n, a in r.get("passkey", {}).items():
        out[f"pk@{n}"] = a
    return out or {k: v for k, v in r.items() if k not in ("kind", "method", "seed")}


def evaluate(s: dict, model_config, params, corpus, tokenizer, lengths, tasks=("ppl", "passkey"),
             max_tokens=None, seed=0) -> dict:
    from lctx.eval.api import evaluate_model

    r = evaluate_model(model_config, params, tokenizer, corpus.splits["validation"],
                       text_key=corpus.text_key, tasks=tasks, lengths=lengths, stride=s["stride"],
                       max_tokens=max_tokens or s["max_tokens"], batch_size=4,
                       depths=s["depths"], trials=s["trials"], seed=seed, progress=False)
    out = {"ppl": {n: {"ppl": v["ppl"], "bits_per_byte": v["bits_per_byte"], "tokens": v["tokens"]}
                   for n, v in r.get("ppl", {}).items()}}
    if "passkey" in r:
        out["passkey"] = r["passkey"]["accuracy"]
        out["passkey_skipped"] = r["passkey"]["skipped"]
        out["passkey_effective"] = r["passkey"]["effective_length"]
    return out


def pretrain(out: str, s: dict, seed: int, tokenizer: str):
    """The base model: `pretrain_steps` on the study's mix, then, when `retrieval_steps`,
    a second stage at the same length on the retrieval mix (whole documents), started
    from the first's weights. Returns the last stage's config, model config, params and
    its export directory (an lctx checkpoint the fine-tunes start from)."""
    from lctx.eval.api import load_run

    def stage_run(name, sizes, steps, lr, init_from=""):
        config = pretrain_config(out, sizes, name, seed, tokenizer, steps, lr, init_from)
        train(config)
        _, model_config, params, _, _ = load_run(config.workdir)
        return config, model_config, params, ensure_export(config.workdir, model_config, params)

    base = stage_run(f"base_s{seed}", s, s["pretrain_steps"], s["pretrain_lr"])
    if not s["retrieval_steps"]:
        return base
    return stage_run(f"base_s{seed}_retrieval", retrieval_sizes(s), s["retrieval_steps"],
                     s["retrieval_lr"], init_from=base[3])


def ensure_export(workdir: str, model_config, params) -> str:
    """workdir/export: the run's final weights as an lctx checkpoint a fine-tune can start
    from (written once)."""
    from lctx.convert.checkpoint import save_checkpoint

    export = os.path.join(workdir, "export")
    if not os.path.isdir(export):
        save_checkpoint(model_config, params, export)
    return export


def pretrain_config(out: str, s: dict, name: str, seed: int, tokenizer: str, steps: int,
                    lr: float, init_from: str = ""):
    """One pretraining run at the training length: warmup 10%, cosine, checkpoints every 100."""
    config = run_config(out, s, name, seed, tokenizer, {"pretrain": dict(
        seq_len=s["train_len"], batch_size=s["pretrain_batch"], steps=steps, learning_rate=lr,
        warmup_steps=max(1, steps // 10))}, init_from=init_from)
    config.checkpoint.every_steps = 100
    return config


def finetune_config(out: str, s: dict, name: str, seed: int, tokenizer: str,
                    rope_scaling: dict | None, init_from: str):
    """One extension fine-tune from `init_from`: `ft_steps` at factor x the training length,
    constant lr after 10% warmup, windows from documents at least that long."""
    n = s["factor"] * s["train_len"]
    return run_config(out, s, name, seed, tokenizer, {"extend": dict(
        seq_len=n, batch_size=s["ft_batch"], steps=s["ft_steps"], learning_rate=s["ft_lr"],
        warmup_steps=max(1, s["ft_steps"] // 10), schedule="constant", min_doc_len=n,
        rope_scaling=rope_scaling)}, init_from=init_from)


def retrieval_sizes(s: dict) -> dict:
    """The sizes with the second stage's data: the retrieval mix, whole documents."""
    return dict(s, mix=s["retrieval_mix"], passkey_share=s["retrieval_passkey_share"],
                whole_docs=True)


def base_check(s: dict, model_config, params, corpus, tokenizer) -> dict:
    """Perplexity at the short length, 1x and 4x on `check_tokens` held-out tokens, the
    two ratios and whether they pass (4x / 1x >= 2, short / 1x >= 1.3)."""
    L, factor = s["train_len"], s["factor"]
    r = evaluate(s, model_config, params, corpus, tokenizer, (s["short"], L, factor * L),
                 tasks=("ppl",), max_tokens=s["check_tokens"])
    p = {int(n): v["ppl"] for n, v in r["ppl"].items()}
    r["extrapolation_ratio"] = p[factor * L] / p[L]
    r["context_gain"] = p[s["short"]] / p[L]
    r["passes"] = r["extrapolation_ratio"] >= 2.0 and r["context_gain"] >= 1.3
    return r


def study(out: str, s: dict, seeds: list[int], names: list[str]) -> None:
    from lctx import data as ld
    from lctx.eval.api import load_run, with_rope_scaling
    from lctx.training.loop import open_run_corpus

    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, "results.jsonl")
    done = _done(results_path)
    t0 = time.time()
    tok_path = ensure_tokenizer(out, s)
    tokenizer = ld.make_tokenizer(f"sentencepiece:{tok_path}")
    if ("setup", "tokenizer", -1) not in done:
        _append(results_path, {"kind": "setup", "method": "tokenizer", "seed": -1,
                               "path": tok_path, "vocab": tokenizer.vocab_size, "sizes": s})
    table = methods(s)
    L, factor = s["train_len"], s["factor"]
    for seed in seeds:
        base_seed = seeds[0] if _SHARE_BASE.value else seed
        base_cfg, base_model, base_params, export = pretrain(out, s, base_seed, tok_path)
        corpus = open_run_corpus(base_cfg, os.path.abspath(base_cfg.workdir))
        if ("check", "base", base_seed) not in done:
            record = {"kind": "check", "method": "base", "seed": base_seed,
                      **base_check(s, base_model, base_params, corpus, tokenizer)}
            _append(results_path, record)
            done[("check", "base", base_seed)] = record
        for name in names:
            if ("method", name, seed) in done:
                continue
            m = table[name]
            if m["finetune"]:
                ft_sizes = retrieval_sizes(s) if s["ft_mix"] == "retrieval" else s
                ft_cfg = finetune_config(out, ft_sizes, f"{name}_s{seed}", seed, tok_path,
                                         m["rope_scaling"], export)
                train(ft_cfg)
                _, model_config, params, _, _ = load_run(ft_cfg.workdir)
            else:
                model_config, params = with_rope_scaling(base_model, m["rope_scaling"]), base_params
            record = {"kind": "method", "method": name, "seed": seed, "base_seed": base_seed,
                      "rope_scaling": m["rope_scaling"], "finetune": m["finetune"],
                      "ft_steps": s["ft_steps"] if m["finetune"] else 0,
                      **evaluate(s, model_config, params, corpus, tokenizer, s["lengths"],
                                 seed=seed)}
            if name in ("pi_ft", "yarn_ft"):  # perplexity at 4x after every ft_every steps
                curve = {}
                for step in _checkpoint_steps(ft_cfg.workdir):
                    _, mc, pr, _, _ = load_run(ft_cfg.workdir, step)
                    r = evaluate(s, mc, pr, corpus, tokenizer, (factor * L,), tasks=("ppl",),
                                 max_tokens=s["curve_tokens"])
                    curve[step] = r["ppl"][str(factor * L)]["ppl"]
                record["ft_curve"] = curve
            record["elapsed_s"] = round(time.time() - t0, 1)
            _append(results_path, record)
            done[("method", name, seed)] = record


def _checkpoint_steps(workdir: str) -> list[int]:
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


# ----------------------------------------------------------------------------- report


def report(out: str, plots_dir: str = "") -> str:
    """OUT/report.md (tables: mean +- half-range over seeds) and plots; returns the markdown."""
    import numpy as np

    from lctx.eval import plots

    records = list(_done(os.path.join(out, "results.jsonl")).values())
    checks = [r for r in records if r["kind"] == "check"]
    by_method: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "method":
            by_method.setdefault(r["method"], []).append(r)
    lines = ["## Base model check (plain RoPE, no fine-tune)", "",
             "| seed | " + " | ".join(f"ppl@{n}" for n in checks[0]["ppl"]) +
             " | ppl@4x / ppl@1x | ppl@short / ppl@1x | passes |" if checks else "(no base yet)",
             "|---" * (len(checks[0]["ppl"]) + 4) + "|" if checks else ""]
    for c in checks:
        lines.append(f"| {c['seed']} | " + " | ".join(f"{v['ppl']:.2f}" for v in c["ppl"].values())
                     + f" | {c['extrapolation_ratio']:.2f} | {c['context_gain']:.2f} | "
                       f"{'yes' if c['passes'] else 'NO'} |")
    ppl_curves, bpb_rows, pk_curves = {}, [], {}

    def stat(values):
        v = np.asarray(values, float)
        return v.mean(), (v.max() - v.min()) / 2, len(v)

    lengths = sorted({int(n) for rs in by_method.values() for r in rs for n in r["ppl"]})
    head = "| method | seeds | " + " | ".join(f"ppl@{n}" for n in lengths) + " |"
    lines += ["", "## Perplexity (mean ± half-range over seeds)", "", head,
              "|---" * (len(lengths) + 2) + "|"]
    order = [m for m in methods(FULL) if m in by_method]
    for name in order:
        rs = by_method[name]
        cells, curve = [], {}
        for n in lengths:
            vals = [r["ppl"][str(n)]["ppl"] for r in rs if str(n) in r["ppl"]]
            mean, spread, k = stat(vals)
            cells.append(f"{mean:.2f} ± {spread:.2f}")
            curve[n] = mean
        ppl_curves[name] = curve
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
        bpb = []
        for n in lengths:
            mean, spread, _ = stat([r["ppl"][str(n)]["bits_per_byte"] for r in rs])
            bpb.append(f"{mean:.3f} ± {spread:.3f}")
        bpb_rows.append(f"| {name} | {len(rs)} | " + " | ".join(bpb) + " |")
    lines += ["", "## Bits per byte", "", head.replace("ppl@", "bpb@"),
              "|---" * (len(lengths) + 2) + "|", *bpb_rows]
    lines += ["", "## Passkey accuracy (mean over seeds; trials x depths per cell)", "",
              "| method | " + " | ".join(f"@{n}" for n in lengths) +
              " | effective (>=80%) | effective (all <= k >= 20%) |", "|---" * (len(lengths) + 3) + "|"]
    for name in order:
        rs = by_method[name]
        accs = {n: [r["passkey"].get(str(n)) for r in rs if r.get("passkey")] for n in lengths}
        cells = []
        for n in lengths:
            vals = [a for a in accs[n] if a is not None]
            cells.append(f"{np.mean(vals):.2f}" if vals else "skipped")
        pk_curves[name] = {n: float(np.mean([a for a in accs[n] if a is not None]))
                           for n in lengths if any(a is not None for a in accs[n])}
        eff = [r.get("passkey_effective", {}) for r in rs]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " +
                     ", ".join(str(e.get("yarn_80")) for e in eff) + " | " +
                     ", ".join(str(e.get("pi_20")) for e in eff) + " |")
    curves = {name: by_method[name] for name in ("pi_ft", "yarn_ft") if name in by_method}
    if curves:
        lines += ["", "## Fine-tune curves: perplexity at 4x after k steps (per seed)", ""]
        for name, rs in curves.items():
            for r in rs:
                lines.append(f"- {name} seed {r['seed']}: " + ", ".join(
                    f"{k}: {v:.2f}" for k, v in sorted(r.get("ft_curve", {}).items(), key=lambda kv: int(kv[0]))))
    if by_method:
        lines += ["", "## Against the literature (thresholds in brackets)", "",
                  "| claim | measured (per seed) | verdict |", "|---|---|---|",
                  *claims(by_method, min(lengths))]
    os.makedirs(out, exist_ok=True)
    written = []
    if ppl_curves:
        train_len = min(lengths)
        written.append(plots.plot_perplexity(ppl_curves, os.path.join(out, "ppl_vs_length.png"),
                                             training_lengths=(train_len, 4 * train_len)))
    if pk_curves:
        written.append(plots.plot_accuracy(pk_curves, os.path.join(out, "passkey.png"),
                                           training_lengths=(min(lengths),)))
    if curves:
        fine = {f"{name} s{r['seed']}": {int(k): v for k, v in r.get("ft_curve", {}).items()}
                for name, rs in curves.items() for r in rs}
        written.append(_plot_curves(fine, os.path.join(out, "ft_curves.png")))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    if plots_dir:
        import shutil

        os.makedirs(plots_dir, exist_ok=True)
        for path in written:
            shutil.copy(path, os.path.join(plots_dir, os.path.basename(path)))
    return text


def claims(by_method: dict[str, list[dict]], train_len: int) -> list[str]:
    """Markdown rows: each direction the literature predicts, measured per seed from the
    method records (paired by seed), with a verdict; claims without their data are left out."""
    def ppl(name, n):
        return {r["seed"]: r["ppl"][str(n)]["ppl"] for r in by_method.get(name, [])
                if str(n) in r["ppl"]}

    def passkey(name, n):
        return {r["seed"]: r["passkey"][str(n)] for r in by_method.get(name, [])
                if r.get("passkey", {}).get(str(n)) is not None}

    def row(claim, values, ok, fmt="{:.2f}x"):
        if not values:
            return []
        cells = ", ".join(fmt.format(v) for _, v in sorted(values.items()))
        verdict = "agrees" if all(ok(v) for v in values.values()) else (
            "differs" if not any(ok(v) for v in values.values()) else "mixed")
        return [f"| {claim} | {cells} | {verdict} |"]

    L, base = train_len, ppl("none", train_len)
    ratio = lambda a, b: {s: a[s] / b[s] for s in a if s in b}
    rows = row("plain extrapolation: ppl@4x / ppl@1x [>= 2]", ratio(ppl("none", 4 * L), base),
               lambda v: v >= 2.0)
    for name, label in (("pi_ft", "PI"), ("yarn_ft", "YaRN")):
        rows += row(f"{label} + fine-tune: ppl@4x / base ppl@1x [<= 1.10]",
                    ratio(ppl(name, 4 * L), base), lambda v: v <= 1.10)
    reach = {}
    pi_final = {r["seed"]: r["ft_curve"][max(r["ft_curve"], key=int)]
                for r in by_method.get("pi_ft", []) if r.get("ft_curve")}
    for r in by_method.get("yarn_ft", []):
        if r["seed"] in pi_final and r.get("ft_curve"):
            hits = [int(k) for k, v in r["ft_curve"].items() if v <= pi_final[r["seed"]]]
            reach[r["seed"]] = min(hits) if hits else float("inf")
    last = max((int(k) for r in by_method.get("pi_ft", []) for k in r.get("ft_curve", {})),
               default=0)
    rows += row(f"YaRN reaches PI's final ppl@4x (step {last}) sooner [step < {last}]", reach,
                lambda v: v < last, fmt="step {}")
    rows += row("dynamic NTK, no fine-tune: ppl@2x / ppl@1x [<= 1.2]",
                ratio(ppl("dynamic", 2 * L), base), lambda v: v <= 1.2)
    rows += row("dynamic NTK, no fine-tune: ppl@8x / ppl@1x [>= 2]",
                ratio(ppl("dynamic", 8 * L), base), lambda v: v >= 2.0)
    for name, label in (("pi_ft", "PI"), ("yarn_ft", "YaRN")):
        rows += row(f"passkey@4x after {label} + fine-tune [>= 0.9]", passkey(name, 4 * L),
                    lambda v: v >= 0.9, fmt="{:.2f}")
    pi, yarn = passkey("pi_ft", 4 * L), passkey("yarn_ft", 4 * L)
    plain = passkey("none_ft", 4 * L)
    rows += row("passkey@4x: fine-tune without scaling minus the better of PI / YaRN [<= -0.3]",
                {seed: v - max(pi.get(seed, 0.0), yarn.get(seed, 0.0))
                 for seed, v in plain.items()},
                lambda v: v <= -0.3, fmt="{:+.2f}")
    return rows


def _plot_curves(curves: dict, path: str) -> str:
    from lctx.eval.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        xs = sorted(c)
        ax.plot(xs, [c[x] for x in xs], marker="o", label=label)
    ax.set_xlabel("fine-tune steps")
    ax.set_ylabel("perplexity at 4x the training length")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sizes_from_flags() -> dict:
    """QUICK or FULL with the command line's overrides applied (exits 2 on a bad one)."""
    s = dict(QUICK if _QUICK.value else FULL)
    if _PRETRAIN_STEPS.value:
        s["pretrain_steps"] = _PRETRAIN_STEPS.value
    if _FT_STEPS.value:
        if not 1 <= _FT_STEPS.value <= 200:
            print(f"study: --ft_steps={_FT_STEPS.value}: expected 1..200", file=sys.stderr)
            sys.exit(2)
        s["ft_steps"] = _FT_STEPS.value
    for name, flag in (("ft_lr", _FT_LR), ("retrieval_lr", _RETRIEVAL_LR)):
        if flag.value is not None and not flag.value > 0:
            print(f"study: --{name}={flag.value}: expected a learning rate > 0", file=sys.stderr)
            sys.exit(2)
    if _RETRIEVAL_STEPS.value is not None and _RETRIEVAL_STEPS.value < 0:
        print(f"study: --retrieval_steps={_RETRIEVAL_STEPS.value}: expected >= 0 (0: no second "
              "stage)", file=sys.stderr)
        sys.exit(2)
    for key, flag in (("mix", _MIX), ("passkey_share", _PASSKEY_SHARE),
                      ("retrieval_steps", _RETRIEVAL_STEPS), ("retrieval_mix", _RETRIEVAL_MIX),
                      ("retrieval_lr", _RETRIEVAL_LR), ("ft_mix", _FT_MIX), ("ft_lr", _FT_LR)):
        if flag.value is not None:
            s[key] = flag.value
    s["whole_docs"] = _WHOLE_DOCS.value
    return s


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"study: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    s = sizes_from_flags()
    table = methods(s)
    names = _METHODS.value or list(table)
    bad = [n for n in names if n not in table]
    if bad:
        print(f"study: --methods={','.join(names)}: unknown {bad}; allowed: {', '.join(table)}",
              file=sys.stderr)
        sys.exit(2)
    try:
        seeds = [int(x) for x in _SEEDS.value]
    except ValueError:
        print(f"study: --seeds={','.join(_SEEDS.value)}: expected comma-separated ints",
              file=sys.stderr)
        sys.exit(2)
    study(_OUT.value, s, seeds, names)
    if _REPORT.value:
        print(report(_OUT.value, _PLOTS.value))


if __name__ == "__main__":
    app.run(main)
