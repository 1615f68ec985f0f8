"""lctx.data: corpus builder (TFDS without TensorFlow), dedup, splits, tokenizers, packing.

Uses the small corpus shipped in tests/data/corpus, never the real standard library
(except one stat-only manifest test). No downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from lctx.data import (BATCH_KEYS, ByteTokenizer, CorpusSpec, DedupOptions, build_text_directory,
                       data_problems, make_dataset, make_tokenizer, manifest, open_corpus,
                       split_of, stdlib_spec, unigram_bits_per_byte)
from lctx.data.corpus import iter_texts
from lctx.data.dedup import deduplicate, jaccard, shingle_hashes
from lctx.data.tfds_corpus import dedup_report, resolve_text_key
from lctx.data.tokenizer import train_sentencepiece

CORPUS = Path(__file__).parent / "data" / "corpus"
REPO = Path(__file__).parent.parent
# Every shipped file but one is in train at this fraction, so both splits are non-empty.
VALIDATION_FRACTION = 0.3
BYTE = ByteTokenizer()
P, B, E = BYTE.pad_id, BYTE.bos_id, BYTE.eos_id


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def corpus(data_dir):
    return open_corpus(data_dir=data_dir, corpus_dir=str(CORPUS),
                       validation_fraction=VALIDATION_FRACTION)


def take(dataset, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(dataset)
    batches = [next(it) for _ in range(n)]
    it.close()
    return batches


def pieces(batches):
    """Each document piece of each row, in stream order: dict of `[len]` arrays."""
    for batch in batches:
        for row in range(batch["tokens"].shape[0]):
            seg = batch["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
                yield {k: batch[k][row, idx] for k in BATCH_KEYS}


def documents(batches) -> list[tuple[int, ...]]:
    """The documents (BOS ... EOS) the rows hold, joining pieces split across rows
    (consecutive in the stream with interleave=1)."""
    docs, current = [], []
    for piece in pieces(batches):
        current += piece["tokens"].tolist()
        if piece["targets"][-1] == E:
            docs.append(tuple(current) + (E,))
            current = []
    assert not current, "stream ended inside a document"
    return docs


def encoded(texts) -> list[tuple[int, ...]]:
    return [(B, *BYTE.encode(t).tolist(), E) for t in texts]


def synthetic_docs(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    return [{"text": "".join(rng.choice(list("abcdefgh \n"), rng.integers(1, 90)))}
            for _ in range(n)]


# ---------------------------------------------------------------- packing


def test_packing_matches_hand_made_example():
    # Pairs: "abc" -> B>a a>b b>c c>E (4), "x" -> B>x x>E (2), "hello" -> 6 pairs, which
    # is split: 2 pairs end row 0, 4 start row 1. Row 2 is the final batch's padding.
    src = [{"text": "abc"}, {"text": "x"}, {"text": "hello"}]
    (batch,) = list(make_dataset(src, BYTE, seq_len=8, batch_size=3, seed=None, num_epochs=1,
                                 interleave=1))
    a, b, c, x, h, e, l, o = (ord(ch) for ch in "abcxhelo")
    expected = {
        "tokens": [[B, a, b, c, B, x, B, h], [e, l, l, o, P, P, P, P], [P] * 8],
        "targets": [[a, b, c, E, x, E, h, e], [l, l, o, E, P, P, P, P], [P] * 8],
        "segment_ids": [[1, 1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8],
        "positions": [[0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 3, 0, 0, 0, 0], [0] * 8],
        "loss_mask": [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [0] * 8],
    }
    assert sorted(batch) == sorted(expected)
    for key, want in expected.items():
        assert batch[key].dtype == np.int32, key
        np.testing.assert_array_equal(batch[key], np.array(want), err_msg=key)


def test_whole_docs_packing_pads_instead_of_splitting_a_fitting_document():
    # "hello" (6 pairs) does not fit in the 2 pairs row 0 has left but fits in a row:
    # row 0 is padded and "hello" starts row 1. Ten q's (11 pairs) cannot fit any row,
    # so it is split as before: 2 pairs end row 1, 8 fill row 2, 1 starts row 3.
    src = [{"text": "abc"}, {"text": "x"}, {"text": "hello"}, {"text": "q" * 10}]
    def dataset():
        return make_dataset(src, BYTE, seq_len=8, batch_size=1, seed=None, num_epochs=1,
                            interleave=1, whole_docs=True)
    rows = list(dataset())
    a, b, c, x, h, e, l, o, q = (ord(ch) for ch in "abcxheloq")
    expected = {
        "tokens": [[B, a, b, c, B, x, P, P], [B, h, e, l, l, o, B, q], [q] * 8, [q] + [P] * 7],
        "targets": [[a, b, c, E, x, E, P, P], [h, e, l, l, o, E, q, q], [q] * 8, [E] + [P] * 7],
        "segment_ids": [[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 2, 2], [1] * 8,
                        [1] + [0] * 7],
        "positions": [[0, 1, 2, 3, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1], list(range(8)),
                      [0] * 8],
        "loss_mask": [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [1] * 8, [1] + [0] * 7],
    }
    for key, want in expected.items():
        np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), np.array(want),
                                      err_msg=key)
    # The document held back for the next row survives a save and restore.
    it = iter(dataset())
    next(it)
    state = it.get_state()
    resumed = iter(dataset())
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], rows[1]["tokens"])


def test_interleaved_packing_matches_hand_made_example():
    # Two cursors: row 0 is cursor 0 ("abc"); row 1 is cursor 1, which takes "x" and
    # then the start of "hello"; row 2 is cursor 0 again, but the stream has ended, so
    # cursor 1 finishes "hello". The second batch is padded to 2 rows.
    src = [{"text": "abc"}, {"text": "x"}, {"text": "hello"}]
    batches = list(make_dataset(src, BYTE, seq_len=4, batch_size=2, seed=None, num_epochs=1,
                                interleave=2))
    a, b, c, x, h, e, l, o = (ord(ch) for ch in "abcxhelo")
    expected = {
        "tokens": [[[B, a, b, c], [B, x, B, h]], [[e, l, l, o], [P] * 4]],
        "targets": [[[a, b, c, E], [x, E, h, e]], [[l, l, o, E], [P] * 4]],
        "segment_ids": [[[1, 1, 1, 1], [1, 1, 2, 2]], [[1, 1, 1, 1], [0] * 4]],
        "positions": [[[0, 1, 2, 3], [0, 1, 0, 1]], [[0, 1, 2, 3], [0] * 4]],
        "loss_mask": [[[1] * 4, [1] * 4], [[1] * 4, [0] * 4]],
    }
    for key, want in expected.items():
        np.testing.assert_array_equal(np.stack([bt[key] for bt in batches]), np.array(want),
                                      err_msg=key)


@pytest.mark.parametrize("interleave", [1, 3])
def test_long_documents_split_never_dropped_and_no_cross_document_target(interleave):
    texts = ["q" * 50, "short", "z" * 7, "m" * 33, "w", "y" * 20]  # 50 > 3 windows of 16
    batches = list(make_dataset([{"text": t} for t in texts], BYTE, seq_len=16, batch_size=2,
                                seed=7, num_epochs=1, interleave=interleave))
    if interleave == 1:  # pieces of one document follow each other in the stream
        assert sorted(documents(batches)) == sorted(encoded(texts))
    pairs = sorted((t, y) for p in pieces(batches) for t, y in zip(p["tokens"], p["targets"]))
    assert pairs == sorted((d[k], d[k + 1]) for d in encoded(texts) for k in range(len(d) - 1))
    for piece in pieces(batches):
        np.testing.assert_array_equal(piece["positions"], np.arange(len(piece["tokens"])))
        np.testing.assert_array_equal(piece["tokens"][1:], piece["targets"][:-1])
        assert piece["loss_mask"].all()
    for batch in batches:
        scored = batch["loss_mask"] == 1
        assert not (batch["targets"][scored] == B).any(), "a token predicts a document's start"
        assert np.array_equal(scored, batch["segment_ids"] > 0), "padding scored or pair unscored"


def test_min_doc_len_keeps_only_long_documents():
    texts = ["a" * n for n in (3, 40, 10, 64, 15, 100)]
    batches = list(make_dataset([{"text": t} for t in texts], BYTE, seq_len=16, batch_size=1,
                                seed=None, num_epochs=1, min_doc_len=16, interleave=1))
    # A document of n characters has n + 1 pairs; n + 1 >= 16 keeps 40, 64, 15 and 100.
    assert sorted(documents(batches)) == sorted(encoded(["a" * 40, "a" * 64, "a" * 15, "a" * 100]))
    with pytest.raises(ValueError, match="min_doc_len=1000"):
        take(make_dataset([{"text": t} for t in texts], BYTE, seq_len=16, batch_size=1, seed=0,
                          min_doc_len=1000), 1)


def test_iterator_state_resumes_at_the_exact_position(corpus, tmp_path):
    def dataset():  # every stateful stage: cursors, row shuffle, prefetch thread
        return make_dataset(corpus.splits["train"], BYTE, seq_len=32, batch_size=4, seed=3,
                            interleave=3, shuffle_window=8, prefetch_batches=2,
                            text_key=corpus.text_key)
    # ~52 batches per epoch: N + M crosses an epoch boundary (a reshuffle).
    n, m = 50, 8
    it = iter(dataset())
    for _ in range(n):
        next(it)
    # Saved as an Orbax checkpoint item does it: grain's handler writes the state as JSON.
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    straight = [next(it) for _ in range(m)]
    it.close()
    resumed_it = handler.restore(epath.Path(tmp_path), item=iter(dataset()))
    resumed = [next(resumed_it) for _ in range(m)]
    resumed_it.close()
    for want, got in zip(straight, resumed):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_shards_by_coordinate_are_disjoint_and_complete():
    src = synthetic_docs(23)
    shards = [documents(make_dataset(src, BYTE, seq_len=24, batch_size=2, seed=5, num_epochs=1,
                                     shard_index=i, shard_count=3, interleave=1))
              for i in range(3)]
    all_docs = sorted(d for shard in shards for d in shard)
    assert all_docs == sorted(encoded(r["text"] for r in src))
    assert len(set(all_docs)) == len(all_docs)  # no document in two shards


_DIGEST_SCRIPT = """
import hashlib, sys
import numpy as np
from lctx.data import ByteTokenizer, make_dataset
rng = np.random.default_rng(0)
src = [{"text": "".join(rng.choice(list("abcdefgh \\n"), rng.integers(1, 90)))} for _ in range(23)]
it = iter(make_dataset(src, ByteTokenizer(), seq_len=24, batch_size=2, seed=5, shard_index=1,
                       shard_count=3, shuffle_window=4))
h = hashlib.sha256()
for _ in range(12):
    batch = next(it)
    for k in sorted(batch):
        h.update(batch[k].tobytes())
it.close()
print(h.hexdigest())
"""


def test_same_coordinate_in_another_process_reads_identical_batches():
    h = hashlib.sha256()
    for batch in take(make_dataset(synthetic_docs(23), BYTE, seq_len=24, batch_size=2, seed=5,
                                   shard_index=1, shard_count=3, shuffle_window=4), 12):
        for k in sorted(batch):
            h.update(batch[k].tobytes())
    # Another interpreter with another hash seed: nothing may depend on process state.
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == h.hexdigest()


# ---------------------------------------------------------------- corpus, splits, dedup


def test_splits_are_deterministic_disjoint_and_about_the_fraction(corpus):
    paths = [f"pkg{i // 50}/module_{i}.py" for i in range(4000)]
    splits = [split_of(p, 0.1) for p in paths]
    assert splits == [split_of(p, 0.1) for p in paths]
    assert 0.085 < splits.count("validation") / len(paths) < 0.115
    train = {r["path"].decode() for r in corpus.splits["train"]}
    validation = {r["path"].decode() for r in corpus.splits["validation"]}
    assert train and validation and not train & validation
    assert all(split_of(p, VALIDATION_FRACTION) == "validation" for p in validation)
    assert all(split_of(p, VALIDATION_FRACTION) == "train" for p in train)


def test_dedup_removes_exact_and_near_duplicates_and_reports_bytes():
    files = {rel: (CORPUS / rel).read_bytes() for rel in
             ["README.txt", "code/queue_ring.py", "code/stack.py", "code/stack_v2.py",
              "notes/mountains.txt", "notes/rivers.txt", "notes/rivers_copy.txt"]}
    kept, report = deduplicate(list(files), files.__getitem__, DedupOptions())
    removed = {d.path: (d.kind, d.kept) for d in report.removed}
    assert removed == {"notes/rivers_copy.txt": ("exact", "notes/rivers.txt"),
                       "code/stack_v2.py": ("near", "code/stack.py")}
    assert sorted(kept) == sorted(set(files) - set(removed))
    assert report.bytes_saved("exact") == len(files["notes/rivers_copy.txt"])
    assert report.bytes_saved() == sum(len(files[p]) for p in removed)
    assert "2 of 7 files removed" in report.summary()
    _, only_exact = deduplicate(list(files), files.__getitem__, DedupOptions(near=False))
    assert [d.path for d in only_exact.removed] == ["notes/rivers_copy.txt"]


def test_shingle_jaccard_ignores_whitespace_runs():
    text = b"def f(x):\n    return x + 1\n"
    same = shingle_hashes(text, 8)
    assert jaccard(same, shingle_hashes(b"def f(x):\n\treturn  x + 1\n", 8)) == 1.0
    assert jaccard(same, shingle_hashes(b"an entirely different sentence", 8)) == 0.0
    assert 0.3 < jaccard(same, shingle_hashes(b"def f(x):\n    return x + 2\n", 8)) < 1.0


def test_builder_builds_and_reads_back_without_tensorflow(corpus, data_dir):
    records = [r for split in ("train", "validation") for r in corpus.splits[split]]
    got = {r["path"].decode(): r["text"].decode() for r in records}
    # Not the duplicates, the binary file, or the hidden directory.
    assert sorted(got) == ["README.txt", "code/queue_ring.py", "code/stack.py",
                           "letters/lighthouse.md", "letters/short.txt", "notes/mountains.txt",
                           "notes/rivers.txt", "notes/tides.txt"]
    for rel, text in got.items():
        assert text == (CORPUS / rel).read_text()
    assert corpus.metadata["dedup"]["bytes_saved"] == sum(
        (CORPUS / p).stat().st_size for p in ("notes/rivers_copy.txt", "code/stack_v2.py"))
    assert corpus.manifest.sha256 == corpus.metadata["manifest_sha256"]
    assert "tensorflow" not in sys.modules  # built and read back without importing it
    # Built once: reopening reuses it; the report is stored with the dataset.
    builder = build_text_directory(CorpusSpec.from_dir(str(CORPUS)), data_dir,
                                   validation_fraction=VALIDATION_FRACTION)
    assert builder.is_prepared()
    assert dedup_report(builder).bytes_saved() == corpus.metadata["dedup"]["bytes_saved"]


def test_different_directories_get_different_datasets(corpus, data_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(CORPUS, other)
    (other / "letters" / "lighthouse.md").unlink()
    other_corpus = open_corpus(data_dir=data_dir, corpus_dir=str(other),
                               validation_fraction=VALIDATION_FRACTION)
    assert other_corpus.name != corpus.name
    assert len(other_corpus.splits["train"]) == len(corpus.splits["train"]) - 1
    assert len(corpus.splits["train"]) == 6  # the first dataset is untouched


def test_named_tfds_dataset_reads_through_data_sources(corpus, data_dir):
    named = open_corpus(data_dir=data_dir, tfds_name=corpus.name, corpus_dir="ignored")
    assert named.text_key == "text"
    assert [r["path"] for r in named.splits["validation"]] == \
        [r["path"] for r in corpus.splits["validation"]]
    with pytest.raises(ValueError, match="not found"):
        open_corpus(data_dir=data_dir, tfds_name="no_such_dataset_xyz")


def test_a_pg19_like_dataset_prepared_elsewhere(tmp_path):
    """Stands in for a dataset the user prepared: its builder class is not importable
    here (TFDS reads it from its files), its text is `book_text`, it has a test split."""
    class BooksStandin(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"book_text": tfds.features.Text(), "book_title": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in ("train", "test")}

        def _generate_examples(self, split):
            for i in range(3):
                yield f"{split}{i}", {"book_text": f"{split} book {i}. " * 20,
                                      "book_title": f"{split} {i}"}

    BooksStandin(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    books = open_corpus(data_dir=str(tmp_path), tfds_name="books_standin",
                        text_key="book_text", eval_split="test")
    assert sorted(r["book_title"] for r in books.splits["validation"]) == [
        b"test 0", b"test 1", b"test 2"]
    (batch,) = take(make_dataset(books.splits["train"], BYTE, seq_len=64, batch_size=2, seed=0,
                                 text_key=books.text_key), 1)
    assert batch["loss_mask"].all()
    with pytest.raises(ValueError, match="cannot tell which feature"):
        open_corpus(data_dir=str(tmp_path), tfds_name="books_standin", eval_split="test")
    with pytest.raises(ValueError, match="no split 'validation'"):
        open_corpus(data_dir=str(tmp_path), tfds_name="books_standin", text_key="book_text")
    assert "tensorflow" not in sys.modules


def test_text_feature_of_a_named_dataset_must_be_unambiguous():
    features = {"book_text": tfds.features.Text(), "book_title": tfds.features.Text(),
                "year": tfds.features.Scalar(np.int32)}
    assert resolve_text_key("pg19", features, "book_text") == "book_text"
    assert resolve_text_key("x", {"body": tfds.features.Text()}, "") == "body"
    with pytest.raises(ValueError, match="cannot tell which feature"):
        resolve_text_key("pg19", features, "")
    with pytest.raises(ValueError, match="not a Text feature"):
        resolve_text_key("pg19", features, "year")


def test_stdlib_manifest_excludes_tests_and_site_packages(tmp_path):
    found = manifest(stdlib_spec())
    paths = [p for p, _ in found.files]
    assert "os.py" in paths and len(paths) > 100 and all(p.endswith(".py") for p in paths)
    for p in paths:
        dirs = p.split("/")[:-1]
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(dirs), p
    assert manifest(stdlib_spec()).sha256 == found.sha256
    found.write(tmp_path / "manifest.json")
    record = json.loads((tmp_path / "manifest.json").read_text())
    assert record["sha256"] == found.sha256 and record["num_files"] == len(paths)
    assert found.sha256[:16] in found.summary()


# ---------------------------------------------------------------- tokenizers


SAMPLE = (CORPUS / "code" / "stack.py").read_text() + "\ttabs,  spaces, ünïcödé 日本語\n\n"


def check_round_trip(tokenizer) -> None:
    ids = tokenizer.encode(SAMPLE)
    assert ids.dtype == np.int32 and ids.ndim == 1 and (ids < tokenizer.vocab_size).all()
    assert tokenizer.decode(ids) == SAMPLE
    assert len({tokenizer.bos_id, tokenizer.eos_id}) == 2
    assert 0 <= tokenizer.pad_id < tokenizer.vocab_size
    clone = pickle.loads(pickle.dumps(tokenizer))  # grain workers receive it pickled
    np.testing.assert_array_equal(clone.encode(SAMPLE), ids)


def test_byte_tokenizer_round_trips():
    tok = make_tokenizer("byte")
    check_round_trip(tok)
    assert tok.vocab_size == 259 and tok.encode("A").tolist() == [65]


def test_sentencepiece_trains_on_the_corpus_and_round_trips(tmp_path):
    texts = [t for _, t in iter_texts(CorpusSpec.from_dir(str(CORPUS)))]
    path = train_sentencepiece(texts, 400, str(tmp_path / "tok.model"))
    tok = make_tokenizer(f"sentencepiece:{path}")
    check_round_trip(tok)
    assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode())  # it learned merges
    with pytest.raises(ValueError, match="vocab_size=200: must be >= 261"):
        train_sentencepiece(texts, 200, str(tmp_path / "small.model"))
    assert type(make_tokenizer(str(path))) is type(tok)


def test_train_tokenizer_command(tmp_path):
    out = tmp_path / "cli.model"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "lctx.data.train_tokenizer",
                          f"--corpus_dir={CORPUS}", "--vocab_size=400", f"--out={out}",
                          f"--validation_fraction={VALIDATION_FRACTION}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check_round_trip(make_tokenizer(f"spm:{out}"))
    bad = subprocess.run([sys.executable, "-m", "lctx.data.train_tokenizer",
                          f"--corpus_dir={tmp_path / 'missing'}", f"--out={out}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "not a directory" in bad.stderr


def test_hugging_face_tokenizer_json_round_trips(tmp_path):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, t in iter_texts(CorpusSpec.from_dir(str(CORPUS)))], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = make_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    check_round_trip(loaded)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
    # A tokenizer_config.json beside it names the specials.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": {"content": "<s>"}}))
    reloaded = make_tokenizer(f"hf:{tmp_path}")
    assert (reloaded.bos_id, reloaded.eos_id) == (2, 1)


# ---------------------------------------------------------------- statistics and errors


def test_unigram_bits_per_byte_by_hand():
    # Train targets of "ab": a, b, EOS. Add-one counts: those 2, the other 256 ids 1; total 262.
    # Held-out "ab" scores a, b, EOS at log2(262 / 2) bits each over 2 bytes.
    assert unigram_bits_per_byte(["ab"], [b"ab"], BYTE) == pytest.approx(1.5 * np.log2(131))


@pytest.mark.parametrize("call, message", [
    (lambda: open_corpus(data_dir="/tmp", corpus_dir="/no/such/dir"),
     "corpus_dir='/no/such/dir': not a directory"),
    (lambda: make_tokenizer("wordpiece"), "tokenizer='wordpiece': unknown kind"),
    (lambda: make_tokenizer("sentencepiece:/no/such.model"), "does not exist"),
    (lambda: make_tokenizer("hf"), "'hf' needs a path"),
    (lambda: make_dataset([{"text": "a"}], BYTE, seq_len=0, batch_size=-1, seed=0),
     "seq_len=0: must be > 0; batch_size=-1: must be > 0"),
    (lambda: make_dataset([{"text": "a"}], BYTE, seq_len=8, batch_size=1, seed=0,
                          shard_index=1, shard_count=2), "shard 1 of 2 has no documents"),
])
def test_bad_inputs_raise_one_clear_value_error(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_data_problems_lists_one_line_per_problem(corpus, data_dir):
    assert data_problems(data_dir=data_dir, corpus_dir=str(CORPUS)) == []
    assert data_problems(data_dir=data_dir, tfds_name=corpus.name, corpus_dir="/no/dir") == []
    problems = data_problems(data_dir=data_dir, corpus_dir="/no/such/dir", tokenizer="bpe")
    assert len(problems) == 2
    assert problems[0].startswith("tokenizer='bpe': unknown kind")
    assert problems[1] == "corpus_dir='/no/such/dir': not a directory"
    (problem,) = data_problems(data_dir=data_dir, tfds_name="pg19_missing")
    assert problem.startswith("tfds_name='pg19_missing': not found")
