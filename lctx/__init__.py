"""lctx: long-context language models in JAX/Flax.

    model = lctx.load("smollm2-135m")      # lctx.models: any source -> lctx.Model
"""

__version__ = "0.1.0"

# Loaded on first use so `import lctx` stays light (no JAX import).
_LAZY = ("load", "Model", "SourceError")


def __getattr__(name: str):
    if name in _LAZY:
        from lctx import models

        return getattr(models, name)
    raise AttributeError(f"module 'lctx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
