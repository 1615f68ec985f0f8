"""Corpora as TFDS datasets in array_record format, read without TensorFlow.

`TextDirectory` turns any directory of text files into a TFDS dataset with features
{text, path}, split into train/validation by a hash of each file's relative path,
after optional exact / near-duplicate removal. Writing array_record shards and
reading them back through `builder.as_data_source()` (random access, what Grain
wants) needs `array_record`, not TensorFlow; `tfds.as_dataset` / tfrecord would.

Each directory gets its own builder config, named from the directory and a hash of
everything that shapes the result (root, patterns, exclusions, split fraction,
dedup options, the files' manifest), so corpora never collide in one data_dir and a
changed corpus is rebuilt rather than silently reused.

`open_corpus` is what training calls: a named TFDS dataset (`tfds_name`) when given,
else a text directory ("stdlib" by default), built once into `data_dir` and reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds

from lctx.data.corpus import (DEFAULT_EXCLUDE_DIRS, VALIDATION_FRACTION, CorpusSpec, Manifest,
                              decode_text, iter_files, manifest, split_of)
from lctx.data.dedup import DedupOptions, DedupReport, deduplicate
from lctx.data.tokenizer import make_tokenizer

SPLITS = ("train", "validation")


@dataclasses.dataclass(eq=False)
class TextDirectoryConfig(tfds.core.BuilderConfig):
    """A directory of text files as a dataset; make one with `text_directory_config`."""

    corpus: CorpusSpec | None = None
    validation_fraction: float = VALIDATION_FRACTION
    dedup: DedupOptions = DedupOptions()
    manifest_sha256: str = ""


def text_directory_config(spec: CorpusSpec, *, validation_fraction: float = VALIDATION_FRACTION,
                          dedup: DedupOptions = DedupOptions(),
                          corpus_manifest: Manifest | None = None) -> TextDirectoryConfig:
    """The builder config of a corpus, named `<directory>_<hash of all options + manifest>`."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction}: must be in (0, 1)")
    corpus_manifest = corpus_manifest or manifest(spec)
    key = json.dumps([dataclasses.asdict(spec), validation_fraction, dataclasses.asdict(dedup),
                      corpus_manifest.sha256], sort_keys=True)
    slug = re.sub(r"[^a-z0-9]+", "_", Path(spec.root).name.lower()).strip("_") or "root"
    name = f"{slug}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return TextDirectoryConfig(
        name=name, description=f"text files of {spec.root}", corpus=spec,
        validation_fraction=validation_fraction, dedup=dedup,
        manifest_sha256=corpus_manifest.sha256)


class TextDirectory(tfds.core.GeneratorBasedBuilder):
    """Text files of a directory: {text, path}; train / validation by path hash."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Text files, path-hash splits, exact and near dedup."}
    BUILDER_CONFIGS: list[TextDirectoryConfig] = []  # one per directory, made at run time

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Text files of a directory.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # nothing is downloaded
        config: TextDirectoryConfig = self.builder_config
        files = dict(iter_files(config.corpus))
        texts = [rel for rel, path in files.items() if decode_text(path.read_bytes()) is not None]
        kept, report = deduplicate(texts, lambda rel: files[rel].read_bytes(), config.dedup)
        split_paths = {s: [rel for rel in kept if split_of(rel, config.validation_fraction) == s]
                       for s in SPLITS}
        for split, paths in split_paths.items():
            if not paths:
                raise ValueError(f"corpus {config.corpus.root}: the {split} split is empty "
                                 f"({len(kept)} files after dedup, validation_fraction="
                                 f"{config.validation_fraction})")
        self.info.metadata.update({
            "root": config.corpus.root, "manifest_sha256": config.manifest_sha256,
            "num_files": len(files), "num_non_text_files": len(files) - len(texts),
            "dedup": report.to_json(),
            "split_bytes": {s: sum(files[rel].stat().st_size for rel in paths)
                            for s, paths in split_paths.items()}})
        return {s: self._generate_examples(files, paths) for s, paths in split_paths.items()}

    def _generate_examples(self, files: Mapping[str, Path], paths: Sequence[str]
                           ) -> Iterator[tuple[str, dict[str, str]]]:
        for rel in paths:
            yield rel, {"text": files[rel].read_bytes().decode("utf-8"), "path": rel}


def build_text_directory(spec: CorpusSpec, data_dir: str, *, validation_fraction: float = VALIDATION_FRACTION,
                         dedup: DedupOptions = DedupOptions(),
                         corpus_manifest: Manifest | None = None) -> TextDirectory:
    """The prepared builder of `spec` in `data_dir`, built on first use (under a file lock,
    so processes sharing data_dir build it once), then reused."""
    corpus_manifest = corpus_manifest or manifest(spec)
    if not corpus_manifest.files:
        raise ValueError(f"corpus {spec.root}: no files match {list(spec.patterns)}")
    config = text_directory_config(spec, validation_fraction=validation_fraction, dedup=dedup,
                                   corpus_manifest=corpus_manifest)
    with _quiet_tfds():
        builder = TextDirectory(config=config, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            with _file_lock(Path(data_dir) / builder.name / f"{config.name}.lock"):
                # Another process may have built it while this one waited.
                builder = TextDirectory(config=config, data_dir=data_dir,
                                        file_format="array_record")
                builder.download_and_prepare()
    return builder


class _DropBenignWarnings(logging.Filter):
    """TFDS warns that every per-directory config is "custom" and that a folder it is
    about to create is empty; both are expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Using custom data configuration", "Variant folder"))


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    quiet = _DropBenignWarnings()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dedup_report(builder: TextDirectory) -> DedupReport:
    """The dedup report stored with a built text-directory dataset."""
    return DedupReport.from_json(builder.info.metadata["dedup"])


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Random-access train / validation records and where their text is.

    splits: {"train", "validation"} -> sequences of records (dicts of numpy values;
      record[text_key] is UTF-8 bytes). manifest: the files, for text directories.
    metadata: what the builder recorded (dedup report, split sizes), text directories only.
    """

    name: str
    splits: Mapping[str, Sequence[Mapping[str, Any]]]
    text_key: str
    manifest: Manifest | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(src)}" for s, src in self.splits.items())
        lines = [f"dataset {self.name}: {sizes} documents"]
        if self.manifest is not None:
            lines.append(self.manifest.summary())
        if "dedup" in self.metadata:
            lines.append(DedupReport.from_json(self.metadata["dedup"]).summary())
        return "\n".join(lines)


def open_corpus(*, data_dir: str, corpus_dir: str = "stdlib", tfds_name: str = "",
                patterns: Sequence[str] = ("*",),
                exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS,
                validation_fraction: float = VALIDATION_FRACTION, dedup: DedupOptions = DedupOptions(),
                text_key: str = "", eval_split: str = "validation") -> Corpus:
    """The corpus a data config names: `tfds_name` when non-empty, else `corpus_dir`.

    corpus_dir: a directory of text files ("stdlib": the Python standard library;
      `patterns` and `exclude_dirs` then do not apply), built into `data_dir` once.
    tfds_name: a TFDS dataset already prepared in `data_dir` in array_record format
      (e.g. "pg19", "c4/en:3.1.0"); its `eval_split` serves as "validation".
    text_key: the text feature of a named dataset; "" picks "text" or the only Text feature.
    Raises ValueError (one line) for a missing directory, an unknown or unprepared
    dataset, a non-array_record dataset, or an ambiguous text feature.
    """
    data_dir = os.path.expanduser(data_dir)
    if tfds_name:
        return open_tfds(tfds_name, data_dir, text_key=text_key, eval_split=eval_split)
    spec = CorpusSpec.from_dir(corpus_dir, patterns, exclude_dirs)
    corpus_manifest = manifest(spec)
    builder = build_text_directory(spec, data_dir, validation_fraction=validation_fraction,
                                   dedup=dedup, corpus_manifest=corpus_manifest)
    return Corpus(f"{builder.name}/{builder.builder_config.name}:{builder.version}",
                  builder.as_data_source(), "text", corpus_manifest,
                  dict(builder.info.metadata))


def data_problems(*, data_dir: str, corpus_dir: str = "stdlib", tfds_name: str = "",
                  tokenizer: str = "byte", text_key: str = "",
                  eval_split: str = "validation") -> list[str]:
    """One line per problem with these data settings, found without building anything:
    a missing corpus directory, an unknown / unprepared / non-array_record dataset or
    text feature, an unknown tokenizer kind or a missing tokenizer file. [] when fine."""
    checks = [lambda: make_tokenizer(tokenizer)]
    if tfds_name:
        checks.append(lambda: open_tfds(tfds_name, os.path.expanduser(data_dir),
                                        text_key=text_key, eval_split=eval_split))
    else:
        checks.append(lambda: CorpusSpec.from_dir(corpus_dir))
    problems = []
    for check in checks:
        try:
            check()
        except ValueError as e:
            problems.append(str(e))
    return problems


def open_tfds(name: str, data_dir: str, *, text_key: str = "",
              eval_split: str = "validation") -> Corpus:
    """A prepared TFDS dataset read through `as_data_source` (array_record, no TensorFlow)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"tfds_name={name!r}: not found in tfds_data_dir={data_dir!r} "
                         f"({first})") from None
    if not builder.is_prepared():
        raise ValueError(f"tfds_name={name!r}: not prepared in tfds_data_dir={data_dir!r}; "
                         f"nothing is downloaded at run time: prepare it beforehand with "
                         f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`")
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"tfds_name={name!r}: stored as {file_format.value}, which needs "
                         "TensorFlow to read; re-prepare it with --file_format=array_record")
    available = list(builder.info.splits)
    for split in ("train", eval_split):
        if split not in available:
            raise ValueError(f"tfds_name={name!r}: no split {split!r}; it has {available}")
    key = resolve_text_key(name, builder.info.features, text_key)
    sources = builder.as_data_source()
    return Corpus(name, {"train": sources["train"], "validation": sources[eval_split]}, key)


def resolve_text_key(name: str, features: Mapping[str, Any], text_key: str) -> str:
    """`text_key` if given, else "text", else the only Text feature; ValueError otherwise."""
    text_features = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if text_key:
        if text_key not in text_features:
            raise ValueError(f"text_key={text_key!r}: not a Text feature of {name!r} "
                             f"(its Text features: {text_features})")
        return text_key
    if "text" in text_features:
        return "text"
    if len(text_features) == 1:
        return text_features[0]
    raise ValueError(f"tfds_name={name!r}: cannot tell which feature is the text among "
                     f"{text_features}; set text_key")
