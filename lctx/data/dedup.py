"""Exact and near-duplicate file removal (MinHash + LSH over byte shingles).

Files are visited in sorted path order and the first of a group is kept, so the
result depends only on the files, not on the order they were found in. A file is
an exact duplicate of a kept file with the same bytes (sha256), and a near
duplicate of a kept file whose set of shingles (k-byte windows of the
whitespace-collapsed text) has Jaccard similarity >= the threshold. MinHash with
banded LSH proposes candidates; the Jaccard of each candidate pair is then computed
exactly, so the threshold means what it says.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import numpy as np

_NUM_PERM = 64
# 16 bands of 4 rows: a pair with Jaccard 0.5 becomes a candidate with probability
# 0.65, one with 0.7 with 0.98, one with 0.8 with 0.9998; candidates are checked exactly.
_BANDS = 16
_ROWS = _NUM_PERM // _BANDS
_BLOCK = 1 << 14  # shingles per MinHash block: bounds memory at [block, num_perm] uint64.
_WHITESPACE = np.array([9, 10, 11, 12, 13, 32], np.uint8)
_P = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_P_INV = np.uint64(pow(0x100000001B3, -1, 2**64))
_rng = np.random.default_rng(0x5EED)
_PERM_A = _rng.integers(0, 2**63, _NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_PERM_B = _rng.integers(0, 2**63, _NUM_PERM, dtype=np.uint64)


@dataclasses.dataclass(frozen=True)
class DedupOptions:
    """exact: drop byte-identical files. near: drop files whose shingle Jaccard with a
    kept file is >= near_threshold. shingle_bytes: shingle length in bytes."""

    exact: bool = True
    near: bool = True
    near_threshold: float = 0.8
    shingle_bytes: int = 16

    def __post_init__(self):
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near_threshold={self.near_threshold}: must be in (0, 1]")
        if self.shingle_bytes < 1:
            raise ValueError(f"shingle_bytes={self.shingle_bytes}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """A removed file: its path and size, the kept file it duplicates, how similar."""

    path: str
    size: int
    kept: str
    kind: str  # "exact" or "near"
    jaccard: float


@dataclasses.dataclass(frozen=True)
class DedupReport:
    """What deduplication removed from `num_files` files of `total_bytes` bytes."""

    num_files: int
    total_bytes: int
    removed: tuple[Duplicate, ...]

    def bytes_saved(self, kind: str | None = None) -> int:
        """Bytes of removed files, all or only those of `kind` ("exact" / "near")."""
        return sum(d.size for d in self.removed if kind in (None, d.kind))

    def summary(self) -> str:
        n_exact = sum(d.kind == "exact" for d in self.removed)
        saved = self.bytes_saved()
        share = saved / self.total_bytes if self.total_bytes else 0.0
        return (f"dedup: {len(self.removed)} of {self.num_files} files removed "
                f"({n_exact} exact, {len(self.removed) - n_exact} near), "
                f"{saved} of {self.total_bytes} bytes saved ({share:.1%})")

    def to_json(self) -> dict:
        return {"num_files": self.num_files, "total_bytes": self.total_bytes,
                "bytes_saved": self.bytes_saved(),
                "bytes_saved_exact": self.bytes_saved("exact"),
                "bytes_saved_near": self.bytes_saved("near"),
                "removed": [dataclasses.asdict(d) for d in self.removed]}

    @classmethod
    def from_json(cls, obj: dict) -> "DedupReport":
        return cls(obj["num_files"], obj["total_bytes"],
                   tuple(Duplicate(**d) for d in obj["removed"]))


def collapse_whitespace(data: bytes) -> np.ndarray:
    """uint8 `[n']`: the bytes with every whitespace run replaced by one space."""
    b = np.frombuffer(data, np.uint8)
    ws = np.isin(b, _WHITESPACE)
    keep = ~ws
    keep[1:] |= ws[1:] & ~ws[:-1]
    keep[:1] |= ws[:1]
    return np.where(ws, np.uint8(32), b)[keep]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads polynomial-hash bits before MinHash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(data: bytes, k: int) -> np.ndarray:
    """Sorted unique uint64 hashes `[m]` of the k-byte windows of the whitespace-collapsed text.

    Text shorter than k is one shingle; empty text has none. Every window's
    polynomial hash comes from prefix sums (all numpy, uint64 arithmetic wraps):
    h[i, i+k) = sum_j b_j P^(i+k-1-j) = P^(i+k-1) * (S[i+k] - S[i]), S[j] = sum_{t<j} b_t P^-t.
    """
    b = collapse_whitespace(data).astype(np.uint64) + np.uint64(1)
    n = b.size
    if n == 0:
        return np.zeros(0, np.uint64)
    k = min(k, n)
    with np.errstate(over="ignore"):
        inv_pows = np.cumprod(np.full(n, _P_INV, np.uint64)) * _P  # P^-t, t = 0..n-1
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(b * inv_pows, dtype=np.uint64)])
        pows = np.cumprod(np.full(n, _P, np.uint64)) * _P_INV  # P^t
        windows = (prefix[k:] - prefix[:-k]) * pows[k - 1:]
        return np.unique(_mix64(windows))


def minhash(shingles: np.ndarray) -> np.ndarray:
    """uint64 `[num_perm]` MinHash signature of a set of uint64 shingle hashes `[m]`, m >= 1."""
    sig = np.full(_NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, shingles.size, _BLOCK):
            block = shingles[start:start + _BLOCK, None]
            sig = np.minimum(sig, (block * _PERM_A + _PERM_B).min(axis=0))
    return sig


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def deduplicate(paths: Sequence[str], read: Callable[[str], bytes],
                options: DedupOptions) -> tuple[list[str], DedupReport]:
    """The paths to keep (sorted) and a report of what was removed.

    paths: relative paths; read(path) returns the file's bytes. Files are read once
    for hashing and once more only when they are a near-duplicate candidate, so the
    corpus need not fit in memory.
    """
    kept: list[str] = []
    removed: list[Duplicate] = []
    by_digest: dict[bytes, str] = {}
    buckets: dict[tuple[int, bytes], list[str]] = {}
    total = 0
    for path in sorted(paths):
        data = read(path)
        total += len(data)
        if options.exact:
            digest = hashlib.sha256(data).digest()
            if digest in by_digest:
                removed.append(Duplicate(path, len(data), by_digest[digest], "exact", 1.0))
                continue
            by_digest[digest] = path
        if options.near:
            shingles = shingle_hashes(data, options.shingle_bytes)
            if shingles.size:
                keys = [(band, sig.tobytes()) for band, sig in
                        enumerate(minhash(shingles).reshape(_BANDS, _ROWS))]
                match = _near_match(shingles, keys, buckets, read, options)
                if match is not None:
                    removed.append(Duplicate(path, len(data), match[0], "near", match[1]))
                    continue
                for key in keys:
                    buckets.setdefault(key, []).append(path)
        kept.append(path)
    return kept, DedupReport(len(paths), total, tuple(removed))


def _near_match(shingles: np.ndarray, keys: list[tuple[int, bytes]],
                buckets: dict[tuple[int, bytes], list[str]], read: Callable[[str], bytes],
                options: DedupOptions) -> tuple[str, float] | None:
    """The first kept candidate (path order) with Jaccard >= threshold, and that Jaccard."""
    candidates = sorted({p for key in keys for p in buckets.get(key, ())})
    for cand in candidates:
        sim = jaccard(shingles, shingle_hashes(read(cand), options.shingle_bytes))
        if sim >= options.near_threshold:
            return cand, sim
    return None
