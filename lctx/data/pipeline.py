"""Grain input pipeline: documents -> tokens -> packed fixed-length rows -> batches.

Packing. Each document is tokenized as d = [BOS, t_1, ..., t_n, EOS] and contributes
its n + 1 next-token pairs (d[k] -> d[k+1], k = 0..n): BOS predicts t_1, t_n predicts
EOS, and EOS is never an input. Pairs are laid into rows of `seq_len` in stream
order; a document that does not fit continues at the start of a later row (split,
never dropped), its positions restarting at 0. With `whole_docs`, a document that
fits in one row is never split: when it does not fit in what is left of a row, the
row is padded and the document starts the next one (a retrieval document split
after its key would teach answering without it). With `interleave` > 1, several
documents are packed at once and consecutive rows alternate between them. So within
a row:

  tokens[i] -> targets[i] is always a pair of one document: nothing ever predicts
               the first token of the next document;
  segment_ids  1, 2, ... per document piece in the row, 0 = padding;
  positions    0, 1, ... within each piece, 0 for padding;
  loss_mask    1 on every pair, 0 on padding (padding only ends the stream).

Example, seq_len 8, documents [B a b c E] and [B x E] (B = bos, E = eos, P = pad):
  tokens      B a b c B x P P        targets  a b c E x E P P
  segment_ids 1 1 1 1 2 2 0 0        positions 0 1 2 3 0 1 0 0
  loss_mask   1 1 1 1 1 1 0 0
(with interleave=1; the padding here is the end of the stream.)

Order. Documents are sharded by data-parallel coordinate (shard_index of
shard_count; processes holding the same replica pass the same coordinate and read
identical batches), shuffled per epoch with `seed`, repeated, tokenized and packed;
rows may be shuffled again in windows. Every stage is deterministic and
checkpointable: `iterator.get_state()` is a small JSON-able dict, and
`set_state` on a fresh iterator of the same pipeline continues at that exact row.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from lctx.data.synthetic import Mix, mix_documents
from lctx.data.tokenizer import Tokenizer, encode_document

Row = dict[str, np.ndarray]  # int32 [seq_len] per key
Batch = dict[str, np.ndarray]  # int32 [batch, seq_len] per key
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class PackIterDataset(grain.IterDataset):
    """Packs a stream of int32 documents `[n]` (BOS ... EOS) into rows: dict of int32 `[seq_len]`.

    interleave: documents read at once. Row r continues the document of cursor
      r % interleave; a cursor whose document ends takes the next one from the
      stream. So consecutive rows come from different documents even when one
      document spans many rows, while every document is still read exactly once per
      epoch, in stream order. 1 packs plainly in sequence.
    min_doc_len: documents with fewer than this many pairs (len - 1) are skipped.
    whole_docs: a document of at most seq_len pairs that does not fit in the rest of a
      row starts the cursor's next row instead (the rest of this row is padding).
    docs_per_epoch: documents in one pass of the parent. Any 2 * docs_per_epoch
      consecutive documents hold a whole epoch, so after that many skips in a row no
      document can qualify and iteration raises ValueError instead of spinning.
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
                 interleave: int = 1, min_doc_len: int = 0, whole_docs: bool = False,
                 docs_per_epoch: int):
        super().__init__(parent)
        self._options = dict(seq_len=seq_len, pad_id=pad_id, interleave=interleave,
                             min_doc_len=min_doc_len, whole_docs=whole_docs,
                             docs_per_epoch=docs_per_epoch)

    def __iter__(self) -> "_PackIterator":
        return _PackIterator(self._parent.__iter__(), **self._options)

    def __str__(self) -> str:
        return f"PackIterDataset({self._options})"


@dataclasses.dataclass
class _Cursor:
    """A document being packed, the pairs of it already used, and the parent's state
    just before the document was read (to read it again on restore)."""

    doc: np.ndarray | None = None
    offset: int = 0
    read_state: Any = None

    def pairs_left(self) -> int:
        return 0 if self.doc is None else len(self.doc) - 1 - self.offset


class _PackIterator(grain.DatasetIterator):
    """State: the stream position, each cursor's (read state, offset), the next cursor."""

    def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int,
                 interleave: int, min_doc_len: int, whole_docs: bool, docs_per_epoch: int):
        super().__init__(parent)
        self._seq_len, self._pad_id, self._whole_docs = seq_len, pad_id, whole_docs
        self._min_doc_len, self._docs_per_epoch = min_doc_len, docs_per_epoch
        self._cursors = [_Cursor() for _ in range(interleave)]
        self._next_cursor = 0

    def _read_next_doc(self, cursor: _Cursor) -> bool:
        """Points `cursor` at the stream's next long-enough document; False at the end."""
        for _ in range(2 * self._docs_per_epoch):
            read_state = copy.deepcopy(self._parent.get_state())
            try:
                doc = next(self._parent)
            except StopIteration:
                cursor.doc = None
                return False
            if len(doc) - 1 >= max(1, self._min_doc_len):
                cursor.doc, cursor.offset, cursor.read_state = doc, 0, read_state
                return True
        raise ValueError(f"min_doc_len={self._min_doc_len}: no document of this shard "
                         f"({self._docs_per_epoch} documents) is that long")

    def _fill_row(self, cursor: _Cursor) -> Row | None:
        """The next row from `cursor`'s documents; None when the stream has ended."""
        length = self._seq_len
        tokens = np.full(length, self._pad_id, np.int32)
        targets = np.full(length, self._pad_id, np.int32)
        segment_ids = np.zeros(length, np.int32)
        positions = np.zeros(length, np.int32)
        filled = segment = 0
        while filled < length:
            if cursor.pairs_left() <= 0 and not self._read_next_doc(cursor):
                break
            if (self._whole_docs and cursor.offset == 0
                    and length - filled < cursor.pairs_left() <= length):
                break  # the unstarted document opens this cursor's next row whole
            n = min(length - filled, cursor.pairs_left())
            piece, start = slice(filled, filled + n), cursor.offset
            tokens[piece] = cursor.doc[start:start + n]
            targets[piece] = cursor.doc[start + 1:start + n + 1]
            segment += 1
            segment_ids[piece] = segment
            positions[piece] = np.arange(n, dtype=np.int32)
            filled += n
            cursor.offset += n
        if filled == 0:
            return None
        return {"tokens": tokens, "targets": targets,
                "loss_mask": (segment_ids > 0).astype(np.int32),
                "segment_ids": segment_ids, "positions": positions}

    def __next__(self) -> Row:
        # At the end of a finite stream, cursors drain one by one; skip the empty ones.
        for _ in range(len(self._cursors)):
            cursor = self._cursors[self._next_cursor]
            self._next_cursor = (self._next_cursor + 1) % len(self._cursors)
            row = self._fill_row(cursor)
            if row is not None:
                return row
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"stream": copy.deepcopy(self._parent.get_state()),
                "cursors": [None if c.doc is None else
                            {"read_state": copy.deepcopy(c.read_state), "offset": c.offset}
                            for c in self._cursors],
                "next_cursor": self._next_cursor}

    def set_state(self, state: dict[str, Any]) -> None:
        for cursor, saved in zip(self._cursors, state["cursors"], strict=True):
            cursor.doc, cursor.offset, cursor.read_state = None, 0, None
            if saved is not None:
                # Read the document again; it passed the length filter when first read.
                self._parent.set_state(copy.deepcopy(saved["read_state"]))
                cursor.doc, cursor.offset = next(self._parent), saved["offset"]
                cursor.read_state = copy.deepcopy(saved["read_state"])
        self._parent.set_state(copy.deepcopy(state["stream"]))
        self._next_cursor = state["next_cursor"]

    def __str__(self) -> str:
        return "PackIterator"


def tokenize_record(record: Mapping[str, Any], *, tokenizer: Tokenizer, text_key: str
                    ) -> np.ndarray:
    """int32 `[n + 2]` BOS, ids, EOS of a record's text (a module-level function so that
    grain worker processes can pickle it)."""
    return encode_document(tokenizer, record[text_key])


def pad_batch(batch: Batch, *, batch_size: int, pad_id: int) -> Batch:
    """Pads a final batch `[b, L]` to `[batch_size, L]` with padding rows (segment 0, mask 0)."""
    short = batch_size - batch["tokens"].shape[0]
    if short == 0:
        return batch
    fill = {k: pad_id if k in ("tokens", "targets") else 0 for k in batch}
    return {k: np.concatenate([v, np.full((short,) + v.shape[1:], fill[k], v.dtype)])
            for k, v in batch.items()}


def make_dataset(source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                 seq_len: int, batch_size: int, seed: int | None,
                 shard_index: int = 0, shard_count: int = 1, text_key: str = "text",
                 min_doc_len: int = 0, num_epochs: int | None = None, interleave: int = 16,
                 shuffle_window: int = 0, num_workers: int = 0, prefetch_batches: int = 2,
                 mix: Mix | None = None, whole_docs: bool = False) -> grain.IterDataset:
    """Batches of packed rows: dict of int32 `[batch_size, seq_len]` under BATCH_KEYS.

    source: random-access records (a TFDS data source, a list of dicts); record[text_key]
      is str or UTF-8 bytes.
    batch_size: rows per batch of this shard (the global batch / shard_count).
    seed: shuffles documents (a new order each epoch) and, with shuffle_window > 1,
      rows within windows of that many rows; None keeps the source order (evaluation).
    shard_index, shard_count: this data-parallel replica's coordinate; documents
      i with i % shard_count == shard_index are this shard's. Not the process index.
    min_doc_len: only documents with at least this many next-token pairs (their
      token count + 1, for EOS) are used; set it to the stage's seq_len for a
      context-extension stage, so rows come from documents that fill a whole row.
    num_epochs: None repeats forever (training); an int ends the stream, and the last
      batch is padded with all-padding rows so every batch has the same shape.
    interleave: documents packed at once; consecutive rows come from different ones
      (PackIterDataset). Large files then do not fill whole batches on their own.
    num_workers: grain worker processes (0: in-process, the default on CPU). Each
      worker packs its own slice of the documents, so the order depends on it: resume
      with the same value.
    prefetch_batches: batches prepared ahead in a background thread (0: none).
    mix: a `lctx.data.synthetic.Mix`: that share of the tokens comes from synthetic
      passkey / needle documents (training; see lctx.data.synthetic).
    whole_docs: documents that fit in one row are never split across rows
      (PackIterDataset); costs padding, keeps each retrieval document's key with its
      question.
    """
    _check_args(seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index,
                shard_count=shard_count, min_doc_len=min_doc_len, num_epochs=num_epochs,
                interleave=interleave, shuffle_window=shuffle_window, num_workers=num_workers,
                prefetch_batches=prefetch_batches)
    docs = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(docs) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} has no documents "
                         f"(the source has {len(source)})")
    if seed is not None:
        docs = docs.shuffle(seed=seed)
    docs_per_epoch = len(docs)
    docs = docs.repeat(num_epochs).map(
        functools.partial(tokenize_record, tokenizer=tokenizer, text_key=text_key))
    if mix is not None and mix.fraction > 0:  # synthetic retrieval documents (data.mix.*)
        shard_source = grain.MapDataset.source(source)[shard_index::shard_count]
        docs, real_share = mix_documents(docs, shard_source, mix, tokenizer=tokenizer,
                                         text_key=text_key, seq_len=seq_len,
                                         min_doc_len=min_doc_len,
                                         seed=(seed or 0) + 1000 * shard_index)
        docs_per_epoch = int(docs_per_epoch / real_share) + 1
    # Tokenizing in the calling thread: threads would contend for the GIL on CPU.
    rows = PackIterDataset(docs.to_iter_dataset(grain.ReadOptions(num_threads=0)),
                           seq_len=seq_len, pad_id=tokenizer.pad_id, interleave=interleave,
                           min_doc_len=min_doc_len, whole_docs=whole_docs,
                           docs_per_epoch=docs_per_epoch)
    if seed is not None and shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=shuffle_window,
                                                           seed=seed)
    batches = rows.batch(batch_size, drop_remainder=False)
    if num_epochs is not None:
        batches = batches.map(functools.partial(pad_batch, batch_size=batch_size,
                                                 pad_id=tokenizer.pad_id))
    if num_workers > 0:
        # Grain's worker processes read absl flags; a program that is not an absl app
        # has not parsed them, so parse none (defaults) rather than fail inside grain.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    if prefetch_batches > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=prefetch_batches)
    return batches


def _check_args(**kw: Any) -> None:
    """One ValueError naming every bad argument."""
    problems = [f"{k}={kw[k]}: must be > 0" for k in
                ("seq_len", "batch_size", "shard_count", "interleave") if kw[k] <= 0]
    problems += [f"{k}={kw[k]}: must be >= 0" for k in
                 ("min_doc_len", "shuffle_window", "num_workers", "prefetch_batches") if kw[k] < 0]
    if not 0 <= kw["shard_index"] < max(kw["shard_count"], 1):
        problems.append(f"shard_index={kw['shard_index']}: must be in [0, shard_count)")
    if kw["seed"] is not None and not 0 <= kw["seed"] < 2**32:
        problems.append(f"seed={kw['seed']}: must be in [0, 2**32) or None")
    if kw["num_epochs"] is not None and kw["num_epochs"] <= 0:
        problems.append(f"num_epochs={kw['num_epochs']}: must be > 0 or None")
    if problems:
        raise ValueError("; ".join(problems))
