"""Tokenizers behind one small interface, chosen by a spec string.

Specs (what `config.data.tokenizer` holds):
  "byte"                     256 byte ids + pad/bos/eos; needs no files (the default)
  "sentencepiece:PATH.model" a SentencePiece model (train one with
                             `python -m lctx.data.train_tokenizer`); "spm:" also works
  "hf:PATH"                  a Hugging Face `tokenizer.json` (or a directory holding one),
                             read by the `tokenizers` library from a local file only
A bare path ending in ".model" or ".json" picks its kind from the suffix.

Every tokenizer pickles (grain worker processes receive it) and returns int32 ids.
"""

from __future__ import annotations

import abc
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np


class Tokenizer(abc.ABC):
    """encode(text) -> int32 `[n]` ids without specials; decode(ids) -> text."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """int32 `[n]` token ids of `text`, without BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of `ids`; special ids (pad, bos, eos) are dropped."""


def encode_document(tokenizer: Tokenizer, text: str | bytes) -> np.ndarray:
    """int32 `[n + 2]`: BOS, the ids of `text`, EOS (bytes are decoded as UTF-8)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    ids = tokenizer.encode(text)
    return np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; pad 256, bos 257, eos 258."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 256, 257, 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file. Without a pad piece, padding uses the EOS id
    (padding is never scored, so any valid id will do)."""

    def __init__(self, path: str):
        self.path = str(path)
        self._load(_read_local_file(self.path, "sentencepiece model"))

    def _load(self, proto: bytes) -> None:
        import sentencepiece as spm  # an optional dependency of this one tokenizer

        self._proto = proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"tokenizer {self.path!r}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path!r}: the model needs bos and eos pieces "
                             f"(bos_id={self.bos_id}, eos_id={self.eos_id})")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._load(state["proto"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])


# SentencePiece training. Special ids: pad 0, unk 1, bos 2, eos 3 (padding gets a real
# id; it is never scored).
_SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
# SentencePiece trains on "sentences"; chunks of whole lines up to this many
# characters keep newlines and indentation inside the training text.
_CHUNK_CHARS = 4096


def line_chunks(texts: Iterable[str], max_chars: int = _CHUNK_CHARS) -> Iterator[str]:
    """Consecutive whole lines of each text, joined into chunks of at most ~max_chars."""
    for text in texts:
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if chunk and size + len(line) > max_chars:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line[:max_chars])
            size += len(chunk[-1])
        if chunk:
            yield "".join(chunk)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out: str,
                        model_type: str = "bpe") -> Path:
    """Trains on `texts` and writes the model file `out` (parents created); returns its path.

    ValueError when the vocabulary is too small for the byte-fallback pieces and the
    corpus's common characters, which SentencePiece keeps as pieces.
    """
    import sentencepiece as spm

    min_vocab = 256 + len(_SPECIAL_IDS) + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {min_vocab} "
                         "(256 byte-fallback pieces, specials, and at least one more)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=line_chunks(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True,
            # Rare characters get no piece of their own; byte fallback still encodes them.
            character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=4 * _CHUNK_CHARS + 16, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, hard_vocab_limit=False, minloglevel=2,
            **_SPECIAL_IDS)
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        reason = str(e).strip().splitlines()[0].rpartition("] ")[2]
        raise ValueError(f"vocab_size={vocab_size}: sentencepiece training failed: {reason}"
                         ) from None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


# Names of BOS / EOS / PAD tokens in common tokenizer.json files, tried in order
# when no tokenizer_config.json beside the file names them.
_HF_SPECIAL_NAMES = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|endoftext|>"),
    "pad": ("<pad>", "[PAD]", "<|finetune_right_pad_id|>"),
}


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizer.json` (no hub access). BOS/EOS/PAD come from a `tokenizer_config.json`
    beside it when there is one, else from common special-token names; PAD falls back
    to EOS. Specials are not added by `encode` (`encode_document` adds BOS/EOS).

    `chat_template` (a Jinja string or None) and `add_bos` (whether the model expects
    BOS before a prompt) come from the same tokenizer_config.json.
    """

    def __init__(self, path: str):
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        self.path = str(file)
        self._load(_read_local_file(self.path, "tokenizer.json").decode("utf-8"),
                   _read_config(file.parent / TOKENIZER_CONFIG))

    @classmethod
    def from_json(cls, json_text: str, config: dict[str, Any], *, name: str = "<memory>"
                  ) -> HuggingFaceTokenizer:
        """A tokenizer from tokenizer.json text and a tokenizer_config.json dict."""
        tokenizer = cls.__new__(cls)
        tokenizer.path = name
        tokenizer._load(json_text, config)
        return tokenizer

    def _load(self, json_text: str, config: dict[str, Any]) -> None:
        import tokenizers  # an optional dependency of this one tokenizer

        self._json, self._config = json_text, config
        try:
            self._tok = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # the library raises a bare Exception for bad JSON
            raise ValueError(f"tokenizer {self.path!r}: not a tokenizer.json ({e})") from None
        self._configured = _config_specials(config)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos")
        self.eos_id = self._special_id("eos")
        try:
            self.pad_id = self._special_id("pad")
        except ValueError:
            self.pad_id = self.eos_id
        self.chat_template: str | None = config.get("chat_template")
        self.add_bos = bool(config.get("add_bos_token", False))

    def _special_id(self, kind: str) -> int:
        names = ((self._configured[kind],) if kind in self._configured
                 else _HF_SPECIAL_NAMES[kind])
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(f"tokenizer {self.path!r}: no {kind} token among {list(names)}; "
                         "put a tokenizer_config.json with bos_token/eos_token beside it")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "json": self._json, "config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._load(state["json"], state["config"])

    def save(self, directory: str | Path) -> Path:
        """Writes tokenizer.json and tokenizer_config.json into `directory`; returns it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self._json, encoding="utf-8")
        (out / TOKENIZER_CONFIG).write_text(json.dumps(self._config, indent=2, ensure_ascii=False)
                                            + "\n", encoding="utf-8")
        return out

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


TOKENIZER_CONFIG = "tokenizer_config.json"


def _read_config(config_file: Path) -> dict[str, Any]:
    """The parsed tokenizer_config.json beside a tokenizer.json ({} when absent)."""
    return json.loads(config_file.read_text()) if config_file.is_file() else {}


def _config_specials(config: dict[str, Any]) -> dict[str, str]:
    """{"bos": ..., "eos": ..., "pad": ...}: the special tokens a tokenizer_config names."""
    found = {}
    for kind in ("bos", "eos", "pad"):
        value = config.get(f"{kind}_token")
        if isinstance(value, dict):  # AddedToken serialisation
            value = value.get("content")
        if isinstance(value, str):
            found[kind] = value
    return found


def _read_local_file(path: str, what: str) -> bytes:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"tokenizer: {what} {str(path)!r} does not exist")
    return file.read_bytes()


TOKENIZER_KINDS = ("byte", "sentencepiece", "hf")
_ALIASES = {"spm": "sentencepiece", "huggingface": "hf"}


def parse_tokenizer_spec(spec: str) -> tuple[str, str | None]:
    """(kind, path or None) of a spec string; ValueError for an unknown kind or a missing path."""
    kind, sep, path = spec.partition(":")
    if not sep:
        if spec.endswith(".model"):
            kind, path = "sentencepiece", spec
        elif spec.endswith(".json"):
            kind, path = "hf", spec
    kind = _ALIASES.get(kind, kind)
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer={spec!r}: unknown kind {kind!r}; expected 'byte', "
                         "'sentencepiece:PATH.model', 'hf:PATH/tokenizer.json', or a path "
                         "ending in .model or .json")
    if kind == "byte":
        if path:
            raise ValueError(f"tokenizer={spec!r}: 'byte' takes no path")
        return kind, None
    if not path:
        raise ValueError(f"tokenizer={spec!r}: {kind!r} needs a path, e.g. '{kind}:PATH'")
    return kind, path


def make_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer a spec names (module docstring); ValueError for bad specs or missing files."""
    kind, path = parse_tokenizer_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)
