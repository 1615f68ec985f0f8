"""Trains a SentencePiece tokenizer on a corpus's train split.

  python -m lctx.data.train_tokenizer --corpus_dir=stdlib --vocab_size=8192 --out=tok/stdlib.model

then point the config at it: `--config.data.tokenizer=sentencepiece:tok/stdlib.model`.
Validation files (by the same path hash as the TFDS builder, with the same
--validation_fraction) are left out, so held-out text stays held out. The model is
lossless on code: identity normalisation, whitespace kept, byte fallback for any
character it has no piece for.
"""

from __future__ import annotations

import sys

from absl import app, flags

from lctx.data.corpus import CorpusSpec, iter_texts
from lctx.data.tokenizer import train_sentencepiece

_CORPUS_DIR = flags.DEFINE_string("corpus_dir", None, "Directory of text files, or 'stdlib'.")
_PATTERNS = flags.DEFINE_list("patterns", ["*"], "fnmatch patterns of files to read "
                              "(ignored for 'stdlib', which reads *.py).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size, >= 261.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece model.")
_VALIDATION_FRACTION = flags.DEFINE_float(
    "validation_fraction", 0.05, "Share of files held out; use the data config's value.")
_OUT = flags.DEFINE_string("out", None, "Model file to write, e.g. tok/stdlib.model.")


def main(argv: list[str]) -> None:
    del argv
    try:
        spec = CorpusSpec.from_dir(_CORPUS_DIR.value, _PATTERNS.value)
        texts = (text for _, text in iter_texts(spec, "train", _VALIDATION_FRACTION.value))
        path = train_sentencepiece(texts, _VOCAB_SIZE.value, _OUT.value, _MODEL_TYPE.value)
    except ValueError as e:  # a bad flag value: one line, exit code 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path} (vocab {_VOCAB_SIZE.value}, {_MODEL_TYPE.value}) "
          f"from the train split of {spec.root}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["corpus_dir", "out"])
    app.run(main)
