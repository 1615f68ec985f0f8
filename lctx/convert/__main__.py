"""`python -m lctx.convert hf-to-lctx|gguf-to-lctx|lctx-to-hf ...`: see lctx.convert.cli."""

from lctx.cli import run_main
from lctx.convert.cli import main

if __name__ == "__main__":
    run_main(main, prog="lctx.convert")
