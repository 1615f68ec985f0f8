"""lctx.models: `load(source) -> Model` for every model source, and the model registry.

    model = lctx.load("smollm2-135m")        # or a .gguf file, an HF / lctx / run directory
    model.generate("def fib(n):", max_new_tokens=32)
    model.logits(tokens)                     # float32 [b, s, V]

Sources and errors: lctx.models.loader. Registered names: `REGISTRY`.
"""

from lctx.models.loader import load
from lctx.models.model import Model, with_rope_scaling
from lctx.models.registry import REGISTRY, RegisteredModel, SourceError, registered_file

__all__ = ["Model", "REGISTRY", "RegisteredModel", "SourceError", "load", "registered_file",
           "with_rope_scaling"]
