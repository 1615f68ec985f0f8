"""Corpus statistics that give a model's numbers a baseline."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from lctx.data.tokenizer import Tokenizer, encode_document


def unigram_bits_per_byte(train_texts: Iterable[str | bytes], held_out_texts: Iterable[str | bytes],
                          tokenizer: Tokenizer) -> float:
    """Bits per UTF-8 byte of `held_out_texts` under a unigram model of `train_texts`' tokens.

    Scores the same targets the packed pipeline does (every token after BOS, EOS
    included), with add-one smoothing over the vocabulary, and divides by the held-out
    text's bytes: directly comparable to a model's held-out loss / ln 2 / bytes.
    """
    counts = np.ones(tokenizer.vocab_size, np.float64)
    for text in train_texts:
        counts += np.bincount(encode_document(tokenizer, text)[1:], minlength=tokenizer.vocab_size)
    neg_log2_p = np.log2(counts.sum()) - np.log2(counts)
    bits = num_bytes = 0.0
    for text in held_out_texts:
        bits += neg_log2_p[encode_document(tokenizer, text)[1:]].sum()
        num_bytes += len(text.encode("utf-8") if isinstance(text, str) else text)
    if num_bytes == 0:
        raise ValueError("held_out_texts: no text")
    return float(bits / num_bytes)
