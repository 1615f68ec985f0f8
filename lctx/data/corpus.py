"""Corpus selection: which files of a directory are documents, their manifest, their split.

A corpus is a directory, fnmatch patterns that pick files, and directory-name patterns
that exclude subtrees. The default corpus is the running Python's standard library
source (`stdlib_spec()`): real code with long files on every machine, no download.
Python builds differ, so a corpus is identified by its manifest (relative paths and
sizes) and that manifest's sha256, which a training run records in its run directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

# Directory names never worth reading as text: VCS metadata, caches, hidden dirs.
DEFAULT_EXCLUDE_DIRS: tuple[str, ...] = (".*", "__pycache__", "node_modules")

# Installed third-party packages and the stdlib's own test suites (`test`, `tests`,
# `idlelib/idle_test`, `unittest/test`, `ctypes/test`, `lib2to3/tests`, ...).
STDLIB_EXCLUDE_DIRS: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS + (
    "site-packages", "dist-packages", "test", "tests", "idle_test", "test_*", "*_test",
    "*_tests")

# The value of `corpus_dir` that selects the standard-library corpus.
STDLIB = "stdlib"

# The default share of files held out (validation), chosen per file by path hash.
VALIDATION_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Which files under `root` are documents.

    root: absolute directory.
    patterns: fnmatch patterns on the relative posix path, where `*` also crosses
      "/" (so "*.py" selects .py files at any depth, "docs/*.md" those under docs/).
    exclude_dirs: fnmatch patterns on directory names; subtrees whose directory name
      (below root) matches are not walked.
    """

    root: str
    patterns: tuple[str, ...] = ("*",)
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS

    @classmethod
    def from_dir(cls, corpus_dir: str, patterns: Sequence[str] = ("*",),
                 exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS) -> "CorpusSpec":
        """A spec for `corpus_dir` ("stdlib" selects `stdlib_spec()`; a directory of that
        name is "./stdlib"); ValueError if it is not a directory."""
        if corpus_dir == STDLIB:
            return stdlib_spec()
        root = Path(corpus_dir).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"corpus_dir={corpus_dir!r}: not a directory")
        if not patterns:
            raise ValueError("patterns: need at least one fnmatch pattern, e.g. '*.txt'")
        return cls(str(root), tuple(patterns), tuple(exclude_dirs))


def stdlib_spec() -> CorpusSpec:
    """The running Python's standard-library `.py` files, without site-packages or tests."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return CorpusSpec(str(root), ("*.py",), STDLIB_EXCLUDE_DIRS)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def iter_files(spec: CorpusSpec) -> Iterator[tuple[str, Path]]:
    """(relative posix path, absolute path) of every selected regular file, sorted by path.

    Symlinks are not followed (no loops, no files from outside the root).
    """
    root = Path(spec.root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into excluded subtrees.
        dirnames[:] = [d for d in dirnames if not _matches(d, spec.exclude_dirs)]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            path = root / rel
            if _matches(rel, spec.patterns) and path.is_file() and not path.is_symlink():
                found.append(rel)
    for rel in sorted(found):
        yield rel, root / rel


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The files of a corpus: `files` is ((relative path, size in bytes), ...), sorted."""

    root: str
    files: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def sha256(self) -> str:
        """Hash of the paths and sizes (not the root: the same tree elsewhere hashes equal)."""
        h = hashlib.sha256()
        for rel, size in self.files:
            h.update(f"{rel}\t{size}\n".encode())
        return h.hexdigest()

    def summary(self) -> str:
        """One line for logs: root, file count, size, hash, Python version."""
        return (f"corpus {self.root}: {len(self.files)} files, {self.total_bytes / 1e6:.2f} MB, "
                f"manifest sha256 {self.sha256[:16]} (python {platform.python_version()})")

    def to_json(self) -> dict:
        return {"root": self.root, "python": platform.python_version(),
                "num_files": len(self.files), "total_bytes": self.total_bytes,
                "sha256": self.sha256, "files": [list(f) for f in self.files]}

    def write(self, path: str | os.PathLike) -> None:
        """Records the manifest as JSON (the training run writes it into its run directory)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


def manifest(spec: CorpusSpec) -> Manifest:
    """The manifest of the selected files (a stat per file; no file is read)."""
    return Manifest(spec.root, tuple((rel, p.stat().st_size) for rel, p in iter_files(spec)))


def validation_score(rel_path: str) -> float:
    """A stable pseudo-random number in [0, 1) from the relative path (sha256, not `hash()`)."""
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(rel_path: str, validation_fraction: float) -> str:
    """"validation" for about `validation_fraction` of paths, else "train".

    Depends only on the path, so a file keeps its split when others are added or removed.
    """
    return "validation" if validation_score(rel_path) < validation_fraction else "train"


def decode_text(data: bytes) -> str | None:
    """The UTF-8 text of a file's bytes, or None when it is binary (a NUL byte, not
    UTF-8) or blank: such files are not documents."""
    if b"\0" in data or not data.strip():
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def iter_texts(spec: CorpusSpec, split: str | None = None,
               validation_fraction: float = 0.0) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the text files of a corpus, optionally of one split only."""
    for rel, path in iter_files(spec):
        if split is None or split_of(rel, validation_fraction) == split:
            text = decode_text(path.read_bytes())
            if text is not None:
                yield rel, text
