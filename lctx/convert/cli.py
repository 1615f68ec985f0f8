"""Command line for checkpoint conversion (thin: parse, call lctx.convert, report).

    python -m lctx.convert hf-to-lctx --hf_dir=path/to/Llama-3.2-1B --out=ckpt/llama3_1b
    python -m lctx.convert gguf-to-lctx --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=ckpt/smollm2
    python -m lctx.convert lctx-to-hf --ckpt=ckpt/llama3_1b --out=hf_out/ [--max_shard_size=5GB]

An lctx checkpoint is `<dir>/model_config.json` + `<dir>/params/` (orbax), plus
`tokenizer.json` + `tokenizer_config.json` when the source has a tokenizer (GGUF);
lctx-to-hf copies those beside the safetensors. Bad input prints one line
`lctx.convert: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from lctx.convert.checkpoint import check_new_checkpoint, load_checkpoint, save_checkpoint
from lctx.convert.hf import load_llama, save_llama

EXIT_USAGE = 2
EXIT_MISSING_DEPENDENCY = 1
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of "5GB", "500MB", "2GiB" or a plain integer (argparse type)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 5GB, 500MB or 1000000")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lctx.convert",
        description="Convert LLaMA checkpoints between Hugging Face (safetensors), GGUF and "
                    "lctx (orbax params + model_config.json).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    to_lctx = commands.add_parser(
        "hf-to-lctx", help="Hugging Face LLaMA directory -> lctx checkpoint",
        description="Reads config.json + model.safetensors (or a sharded index) and writes "
                    "OUT/model_config.json and OUT/params (orbax).")
    to_lctx.add_argument("--hf_dir", required=True, help="Hugging Face model directory")
    to_lctx.add_argument("--out", required=True, help="new lctx checkpoint directory")
    to_lctx.add_argument("--param_dtype", choices=("float32", "bfloat16", "float16"),
                         default=None, help="parameter dtype (default: the checkpoint's)")
    from_gguf = commands.add_parser(
        "gguf-to-lctx", help="llama.cpp GGUF file (llama architecture) -> lctx checkpoint",
        description="Dequantizes every tensor to float32 and writes OUT/model_config.json, "
                    "OUT/params (orbax) and the GGUF's tokenizer (OUT/tokenizer.json, "
                    "OUT/tokenizer_config.json with the chat template).")
    from_gguf.add_argument("--gguf", required=True, help="GGUF file")
    from_gguf.add_argument("--out", required=True, help="new lctx checkpoint directory")
    from_gguf.add_argument("--param_dtype", choices=("float32", "bfloat16", "float16"),
                           default="float32", help="parameter dtype (default float32)")
    to_hf = commands.add_parser(
        "lctx-to-hf", help="lctx checkpoint -> Hugging Face LLaMA directory",
        description="Writes config.json + safetensors that "
                    "transformers.LlamaForCausalLM.from_pretrained loads.")
    to_hf.add_argument("--ckpt", required=True, help="lctx checkpoint directory (hf-to-lctx's --out)")
    to_hf.add_argument("--out", required=True, help="output Hugging Face model directory")
    to_hf.add_argument("--max_shard_size", type=parse_size, default="5GB",
                       help="split weights into shards of at most this size (default 5GB)")
    return parser


def hf_to_lctx(hf_dir: str, out: str, param_dtype: str | None) -> str:
    """Converts and returns a one-line summary."""
    check_new_checkpoint(out)  # fail before the (possibly long) load
    config, params = load_llama(hf_dir, param_dtype=param_dtype)
    path = save_checkpoint(config, params, out)
    return (f"wrote lctx checkpoint {path} ({config.n_layers} layers, d_model {config.d_model}, "
            f"rope {config.rope.rope_type}, {config.param_dtype})")


def gguf_to_lctx(gguf: str, out: str, param_dtype: str) -> str:
    """Converts and returns a one-line summary."""
    from lctx.convert.gguf import GGUFFile, load_gguf, tokenizer_from_gguf

    check_new_checkpoint(out)
    file = GGUFFile(gguf)
    config, params = load_gguf(file, param_dtype=param_dtype)
    path = save_checkpoint(config, params, out, tokenizer=tokenizer_from_gguf(file))
    return (f"wrote lctx checkpoint {path} with its tokenizer ({config.n_layers} layers, "
            f"d_model {config.d_model}, vocab {config.vocab_size}, {config.param_dtype})")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def lctx_to_hf(ckpt: str, out: str, max_shard_size: int) -> str:
    """Converts (tokenizer files copied along) and returns a one-line summary."""
    config, params = load_checkpoint(ckpt)
    path = save_llama(config, params, out, max_shard_bytes=max_shard_size)
    for name in TOKENIZER_FILES:
        if (Path(ckpt) / name).is_file():
            shutil.copyfile(Path(ckpt) / name, path / name)
    return f"wrote Hugging Face LLaMA directory {path}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-lctx":
            summary = hf_to_lctx(args.hf_dir, args.out, args.param_dtype)
        elif args.command == "gguf-to-lctx":
            summary = gguf_to_lctx(args.gguf, args.out, args.param_dtype)
        else:
            summary = lctx_to_hf(args.ckpt, args.out, args.max_shard_size)
    except (ValueError, OSError, ImportError) as err:
        # Bad input (or a missing extra) is the user's to fix: one line, no traceback.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"lctx.convert: error: {message}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY if isinstance(err, ImportError) else EXIT_USAGE
    print(summary)
    return 0
