"""lctx.eval: perplexity against length and retrieval tasks (passkey, needle, RULER-style
multi-key / multi-value / multi-query needles, variable tracking) from a task registry.

    results = lctx.eval.evaluate_source("smollm2-135m", tasks=("ppl", "multikey_needle"),
                                        lengths=(2048, 4096, 8192))
    # -> eval_results/smollm2-135m/results.json, ppl_vs_length.png, multikey_needle*.png
    results = lctx.eval.evaluate("runs/quickstart", tasks=("ppl", "passkey", "needle"))
    # -> RUN/eval/results.json, ppl_vs_length.png, passkey.png, needle_heatmap.png

Command line: python -m lctx.eval --model=SOURCE --tasks=ppl,multikey_needle --lengths=...
(or --workdir=RUN [--step=N]). Tasks: lctx.eval.tasks (one module each; TASKS).
"""

from lctx.eval.api import (TASKS, evaluate, evaluate_model, evaluate_source, format_table,
                           load_run, write_outputs)
from lctx.eval.perplexity import perplexity_by_length, sliding_windows
from lctx.eval.retrieval import (Needle, effective_length_20, effective_length_80, needle_prompt,
                                 passkey_prompt)

__all__ = [
    "Needle", "TASKS", "effective_length_20", "effective_length_80", "evaluate", "evaluate_model",
    "evaluate_source", "format_table", "load_run", "needle_prompt", "passkey_prompt",
    "perplexity_by_length", "sliding_windows", "write_outputs",
]
