"""`python -m lctx.convert hf-to-lctx|gguf-to-lctx|lctx-to-hf ...`: see lctx.convert.cli."""

import sys

from lctx.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
