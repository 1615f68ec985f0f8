"""python -m lctx.bench.train: model FLOPs utilisation of a recipe's train steps.

For each stage of the recipe (default configs/quickstart.py) it compiles the real
jitted train step, times it (median after warm-up), counts model FLOPs as
6 x parameters x tokens plus attention (forward 4·B·S²·H·D per layer, causal
halved, x3 for forward+backward), and reports them as a share of a large fp32
matmul's rate measured in the same run. It also times the data pipeline alone
and reports how many times faster it produces tokens than the step consumes.
Prints a table and writes JSON (bench_results/train.json).
"""

from __future__ import annotations

import os
import time

import jax

from lctx import cli
from lctx import data as ld
from lctx import model as lm
from lctx.bench import common
from lctx.training import config as cfg
from lctx.training import loop


def model_flops(param_count: int, n_layers: int, n_heads: int, head_dim: int, batch: int,
                seq: int, causal: bool = True) -> float:
    """Training FLOPs of one step: 6·N·T for the weights plus attention scores."""
    dense = 6.0 * param_count * batch * seq
    attention_fwd = 4.0 * batch * seq * seq * n_heads * head_dim * n_layers
    if causal:
        attention_fwd /= 2
    return dense + 3.0 * attention_fwd


def _pipeline_tokens_per_sec(dataset, batches: int) -> float:
    iterator = iter(dataset)
    next(iterator)  # first batch: open files, fill buffers
    start, tokens = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(iterator)
        tokens += batch["tokens"].size
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m lctx.bench.train",
                                description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.py", help="recipe file")
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed steps per stage")
    parser.add_argument("--pipeline_batches", type=cli.positive_int, default=50)
    parser.add_argument("--out", default="bench_results/train.json")
    args = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", 8)
    recipe = cli.load_config_file("config", args.config)
    problems = cfg.problems(recipe, jax.device_count())
    if problems:
        raise cli.UsageError(*problems)
    run_dir = os.path.abspath(cfg.workdir(recipe))
    os.makedirs(run_dir, exist_ok=True)
    corpus = loop.open_run_corpus(recipe, run_dir)
    tokenizer = ld.make_tokenizer(recipe.data.tokenizer)
    meter = common.MatmulMeter()
    meter.sample()
    rows, results = [], []
    for index, name in enumerate(recipe.stage_order):
        stage = loop._build_stage(recipe, index)
        s = stage.settings
        params = lm.init(stage.model_config, jax.random.key(0), mesh=stage.mesh)
        state = loop._fresh_state(stage, params, recipe.seed)
        dataset = ld.make_dataset(corpus.splits["train"], tokenizer, seq_len=s.seq_len,
                                  batch_size=s.batch_size, seed=0, text_key=corpus.text_key,
                                  min_doc_len=s.min_doc_len)
        batch = loop._to_device(next(iter(dataset)), stage)
        start = time.perf_counter()
        state, _ = stage.step_fn(state, batch)
        common.block(state)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = stage.step_fn(state, batch)
            common.block(metrics)
            times.append(time.perf_counter() - start)
        meter.sample()
        step_s = sorted(times)[len(times) // 2]
        mc = stage.model_config
        flops = model_flops(lm.param_count(mc), mc.n_layers, mc.n_heads, mc.head_dim,
                            s.batch_size, s.seq_len)
        achieved = flops / step_s / 1e9
        step_tps = s.batch_size * s.seq_len / step_s
        pipeline_tps = _pipeline_tokens_per_sec(dataset, args.pipeline_batches)
        result = {"stage": name, "seq_len": s.seq_len, "batch": s.batch_size,
                  "step_s": step_s, "steps_s": times, "compile_s": compile_s,
                  "model_gflop": flops / 1e9, "achieved_gflops": achieved,
                  "train_tokens_per_s": step_tps, "pipeline_tokens_per_s": pipeline_tps}
        results.append(result)
        rows.append([name, s.seq_len, s.batch_size, f"{step_s:.3f}", f"{achieved:.1f}",
                     None, f"{step_tps:,.0f}", f"{pipeline_tps:,.0f}",
                     f"{pipeline_tps / step_tps:.0f}x"])
    rate = meter.median
    for row, result in zip(rows, results):
        result["mfu_vs_matmul"] = result["achieved_gflops"] / rate
        row[5] = f"{100 * result['mfu_vs_matmul']:.0f}%"
    print(common.format_table(
        ["stage", "seq", "batch", "step s", "GFLOP/s", "of matmul", "train tok/s", "data tok/s",
         "data/train"], rows))
    print(f"fp32 matmul rate (median of {len(meter.samples)} samples): {rate:.1f} GFLOP/s")
    path = common.write_json(args.out, {"environment": common.environment_info(),
                                        "config": args.config, "matmul_gflops": meter.samples,
                                        "stages": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run_main(main, prog="lctx.bench.train")
