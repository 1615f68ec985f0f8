"""lctx.data: corpora as TFDS datasets (no TensorFlow), tokenizers, Grain packing pipeline.

Typical use (what training does):

    corpus = open_corpus(data_dir=cfg.tfds_data_dir, corpus_dir=cfg.corpus_dir,
                         tfds_name=cfg.tfds_name)
    corpus.manifest.write(workdir / "corpus_manifest.json")   # text directories
    tokenizer = make_tokenizer(cfg.tokenizer)
    it = iter(make_dataset(corpus.splits["train"], tokenizer, seq_len=256, batch_size=8,
                           seed=0, shard_index=dp_index, shard_count=dp_size,
                           text_key=corpus.text_key))
    batch = next(it)          # dict of int32 [8, 256]: tokens, targets, loss_mask, ...
    state = it.get_state()    # JSON-able; `it.set_state(state)` resumes exactly
"""

from lctx.data.corpus import (STDLIB, CorpusSpec, Manifest, manifest, split_of,
                              stdlib_spec)
from lctx.data.dedup import DedupOptions, DedupReport
from lctx.data.pipeline import BATCH_KEYS, make_dataset
from lctx.data.stats import unigram_bits_per_byte
from lctx.data import synthetic
from lctx.data.synthetic import Mix
from lctx.data.tfds_corpus import (Corpus, TextDirectory, build_text_directory, data_problems,
                                   open_corpus, open_tfds)
from lctx.data.tokenizer import (TOKENIZER_KINDS, ByteTokenizer, HuggingFaceTokenizer,
                                 SentencePieceTokenizer, Tokenizer, encode_document,
                                 make_tokenizer)

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "Corpus", "CorpusSpec", "DedupOptions", "DedupReport",
    "HuggingFaceTokenizer", "Manifest", "Mix", "STDLIB", "SentencePieceTokenizer", "TOKENIZER_KINDS",
    "TextDirectory", "Tokenizer", "build_text_directory", "data_problems", "encode_document",
    "make_dataset", "make_tokenizer", "manifest", "open_corpus", "open_tfds", "split_of",
    "stdlib_spec", "unigram_bits_per_byte",
]
