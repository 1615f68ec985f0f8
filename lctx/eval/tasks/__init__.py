"""Evaluation tasks, one module each; every module here registers its task on import.

    from lctx.eval.tasks import TASKS     # {"ppl": ..., "passkey": ..., "needle": ..., ...}

Adding a task is one new file in this package: a `Task` (or `RetrievalTask`) subclass
with a `name`, decorated with `@register` (see base.py and multikey_needle.py). Its
name is then accepted by --tasks and config.eval.tasks, and its plots and table
columns appear in the outputs.
"""

import importlib
import pkgutil

from lctx.eval.tasks.base import TASKS, EvalContext, RetrievalTask, RulerTask, Task, register

# Import every task module so that each registers itself; a new file needs no edit here.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["EvalContext", "RetrievalTask", "RulerTask", "TASKS", "Task", "register"]
