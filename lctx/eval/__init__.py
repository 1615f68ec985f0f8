"""lctx.eval: perplexity against length, passkey retrieval, needle in a haystack.

    results = lctx.eval.evaluate("runs/quickstart", tasks=("ppl", "passkey", "needle"),
                                 lengths=(256, 512, 1024, 2048))
    # -> RUN/eval/results.json, ppl_vs_length.png, passkey.png, needle_heatmap.png

Command line: python -m lctx.eval --workdir=RUN [--step=N] --tasks=ppl,passkey,needle
"""

from lctx.eval.api import TASKS, evaluate, evaluate_model, format_table, load_run, write_outputs
from lctx.eval.perplexity import perplexity_by_length, sliding_windows
from lctx.eval.retrieval import (Needle, effective_length_20, effective_length_80, needle_prompt,
                                 passkey_prompt)

__all__ = [
    "Needle", "TASKS", "effective_length_20", "effective_length_80", "evaluate", "evaluate_model",
    "format_table", "load_run", "needle_prompt", "passkey_prompt", "perplexity_by_length",
    "sliding_windows", "write_outputs",
]
