"""Hugging Face LLaMA checkpoints <-> lctx `(ModelConfig, params)`.

    config, params = load_llama("path/to/Llama-3.2-1B")        # config.json + *.safetensors
    save_llama(config, params, "out/")                          # LlamaForCausalLM.from_pretrained("out/")

Loading needs only NumPy and `safetensors` (no torch). Weight mapping (HF Linear
weights are `[out, in]`; lctx kernels are `[in, ...out]`, layers stacked on axis 0):

    model.embed_tokens.weight [V, D]              -> embed/embedding [V, D]
    model.layers.i.input_layernorm.weight [D]     -> layers/attn_norm/scale [L, D]
    model.layers.i.self_attn.q_proj.weight [H*hd, D]   -> layers/attn/q/kernel [L, D, H, hd]
    model.layers.i.self_attn.{k,v}_proj.weight [K*hd, D] -> layers/attn/{k,v}/kernel [L, D, K, hd]
    model.layers.i.self_attn.o_proj.weight [D, H*hd]   -> layers/attn/o/kernel [L, H, hd, D]
    model.layers.i.post_attention_layernorm.weight [D] -> layers/mlp_norm/scale [L, D]
    model.layers.i.mlp.{gate,up}_proj.weight [F, D]    -> layers/mlp/{gate,up}/kernel [L, D, F]
    model.layers.i.mlp.down_proj.weight [D, F]         -> layers/mlp/down/kernel [L, F, D]
    model.norm.weight [D]                         -> final_norm/scale [D]
    lm_head.weight [V, D]                         -> lm_head/kernel [D, V]   (absent when tied)

q/k need no permutation: lctx's RoPE rotates pairs (i, i + hd/2) as HF LLaMA does.
Every projection converts as `w.T.reshape(lctx_shape)` and back as
`k.reshape(reversed hf_shape).T`.

Config: both RoPE styles are read (`rope_theta` + `rope_scaling`, and
transformers-5 `rope_parameters`); `save_llama` writes the former, which
transformers 4.x and 5.x both load. `dynamic` RoPE: transformers recomputes the
frequencies from the longest sequence its module has seen so far (state), lctx
from the static length of each call (`forward(..., rope_seq_len=)`, default the
sequence length); they agree on a fresh HF model and for ascending lengths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lctx.model.config import ModelConfig
from lctx.model.rope import RopeConfig

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "load_llama",
    "params_from_hf",
    "params_to_hf",
    "read_hf_config",
    "save_llama",
]

Params = dict[str, Any]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers 4.x's default shard size (5 GB)

# Non-parameter buffers some older exports carry; they are recomputed from the config.
_IGNORED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")
# safetensors dtype tags lctx reads; BF16 has no NumPy dtype of its own (ml_dtypes has).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": np.dtype(jax.numpy.bfloat16),
}
# RoPE keys transformers validates as floats (it warns on ints such as factor=4).
_FLOAT_ROPE_KEYS = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "low_freq_factor", "high_freq_factor")


# ----------------------------------------------------------------------------- weight table


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One HF tensor and the lctx parameter it becomes.

    hf: the HF name, with "{i}" for the layer index in per-layer weights; path: the
    lctx parameter path (under "layers", with a leading L axis, when per-layer);
    transpose: an `[out, in]` Linear weight (converted by transpose + reshape) rather
    than an embedding or norm scale (copied as is).
    """

    hf: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    lctx_shape: tuple[int, ...]  # per layer, without L
    transpose: bool

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def to_lctx(self, w: np.ndarray) -> np.ndarray:
        """HF tensor `hf_shape` -> lctx array `lctx_shape`."""
        return w.T.reshape(self.lctx_shape) if self.transpose else w

    def to_hf(self, k: np.ndarray) -> np.ndarray:
        """lctx array `lctx_shape` -> contiguous HF tensor `hf_shape`."""
        w = k.reshape(self.hf_shape[::-1]).T if self.transpose else k
        return np.ascontiguousarray(w)


def weight_specs(config: ModelConfig) -> list[WeightSpec]:
    """The HF <-> lctx weight table for `config`, in the order HF checkpoints list them."""
    c = config
    D, H, K, hd, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
    layer = "model.layers.{i}."
    specs = [
        WeightSpec("model.embed_tokens.weight", ("embed", "embedding"), (V, D), (V, D), False),
        WeightSpec(layer + "input_layernorm.weight", ("layers", "attn_norm", "scale"), (D,), (D,),
                   False),
        WeightSpec(layer + "self_attn.q_proj.weight", ("layers", "attn", "q", "kernel"),
                   (H * hd, D), (D, H, hd), True),
        WeightSpec(layer + "self_attn.k_proj.weight", ("layers", "attn", "k", "kernel"),
                   (K * hd, D), (D, K, hd), True),
        WeightSpec(layer + "self_attn.v_proj.weight", ("layers", "attn", "v", "kernel"),
                   (K * hd, D), (D, K, hd), True),
        WeightSpec(layer + "self_attn.o_proj.weight", ("layers", "attn", "o", "kernel"),
                   (D, H * hd), (H, hd, D), True),
        WeightSpec(layer + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"),
                   (D,), (D,), False),
        WeightSpec(layer + "mlp.gate_proj.weight", ("layers", "mlp", "gate", "kernel"), (F, D),
                   (D, F), True),
        WeightSpec(layer + "mlp.up_proj.weight", ("layers", "mlp", "up", "kernel"), (F, D),
                   (D, F), True),
        WeightSpec(layer + "mlp.down_proj.weight", ("layers", "mlp", "down", "kernel"), (D, F),
                   (F, D), True),
        WeightSpec("model.norm.weight", ("final_norm", "scale"), (D,), (D,), False),
    ]
    if not c.tie_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head", "kernel"), (V, D), (D, V), True))
    return specs


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name a checkpoint of `config` holds, with its shape."""
    shapes = {}
    for spec in weight_specs(config):
        for i in range(config.n_layers) if spec.per_layer else [None]:
            shapes[spec.hf.format(i=i)] = spec.hf_shape
    return shapes


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf(config: ModelConfig, read: Callable[[str], np.ndarray],
                   dtype: np.dtype | str) -> Params:
    """lctx params (host NumPy arrays of `dtype`) from `read(hf_name) -> array`.

    Shapes are assumed checked (`load_llama` checks them before reading anything).
    """
    dtype = np.dtype(dtype)
    params: Params = {}
    for spec in weight_specs(config):
        if spec.per_layer:
            value = np.stack([spec.to_lctx(read(spec.hf.format(i=i))).astype(dtype)
                              for i in range(config.n_layers)])
        else:
            value = spec.to_lctx(read(spec.hf)).astype(dtype)
        _set_path(params, spec.path, value)
    return params


def params_to_hf(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF-named host tensors (in the params' dtype) of lctx `params`; checks the tree first."""
    problems = []
    for spec in weight_specs(config):
        want = ((config.n_layers,) if spec.per_layer else ()) + spec.lctx_shape
        try:
            got = tuple(np.shape(_get_path(params, spec.path)))
        except (KeyError, TypeError):
            problems.append(f"params/{'/'.join(spec.path)}: missing")
            continue
        if got != want:
            problems.append(f"params/{'/'.join(spec.path)}: shape {got}, expected {want}")
    if problems:
        raise ValueError("params do not match the model config:\n  " + "\n  ".join(problems))
    host = jax.device_get(params)
    tensors: dict[str, np.ndarray] = {}
    for spec in weight_specs(config):
        value = np.asarray(_get_path(host, spec.path))
        if spec.per_layer:
            for i in range(config.n_layers):
                tensors[spec.hf.format(i=i)] = spec.to_hf(value[i])
        else:
            tensors[spec.hf] = spec.to_hf(value)
    return tensors


# ----------------------------------------------------------------------------- config


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a HF model directory; ValueError if absent or not JSON."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    path = hf_dir / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing; a Hugging Face model directory needs {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _architecture_problem(hf: Mapping[str, Any]) -> str | None:
    """Why `hf` is not a LLaMA causal LM with the layout lctx maps, or None."""
    archs = hf.get("architectures")
    model_type = hf.get("model_type")
    supported = (f"supported: architectures {list(SUPPORTED_ARCHITECTURES)} "
                 f"(model_type {list(SUPPORTED_MODEL_TYPES)})")
    if archs is None and model_type is None:
        return f"neither architectures nor model_type is set; {supported}"
    # Strict on purpose: near-relatives (Mistral, Qwen2, Gemma, ...) differ in details
    # (sliding windows, biases, norms) that a silent load would get wrong.
    if archs is not None and (not isinstance(archs, list) or len(archs) != 1
                              or archs[0] not in SUPPORTED_ARCHITECTURES):
        return f"architectures={archs!r} (model_type={model_type!r}) is not supported; {supported}"
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type={model_type!r} (architectures={archs!r}) is not supported; {supported}"
    return None


def _unsupported_features(hf: Mapping[str, Any]) -> list[str]:
    """Llama config options lctx's model does not implement, one line each."""
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: lctx's SwiGLU MLP needs 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            problems.append(f"{key}={hf[key]!r}: lctx's LLaMA has no biases; must be false")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return problems + [f"rope_scaling={rope!r}: must be an object of RoPE parameters or null"]
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        # HF Llama rotates the whole head whatever this says; refuse rather than guess.
        problems.append(f"partial_rotary_factor={partial!r}: LLaMA rotates the full head; "
                        "must be 1.0")
    return problems


_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """A validated ModelConfig from a HF LLaMA `config.json` dict.

    Reads the RoPE config in both styles (`rope_theta` + `rope_scaling`, or
    transformers-5 `rope_parameters`). Defaults for absent optional keys are
    transformers' LlamaConfig defaults. `overrides` set ModelConfig fields (e.g.
    attention_impl, param_dtype, dtype). Raises one ValueError, one line per problem
    (architecture and unsupported options first; then RoPE; then the model config).
    """
    problems = []
    arch = _architecture_problem(hf)
    if arch:
        problems.append(arch)
    problems += _unsupported_features(hf)
    problems += [f"{key}: missing (required)" for key in _REQUIRED_KEYS if key not in hf]
    if problems:
        raise ValueError("\n".join(problems))
    try:
        rope = RopeConfig.from_hf(hf)
    except (ValueError, TypeError) as err:
        raise ValueError("\n".join(f"rope: {line}" for line in str(err).splitlines())) from None
    fields = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        mlp_dim=hf["intermediate_size"],
        rope=rope,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
    )
    return ModelConfig(**{**fields, **overrides}).validate()


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A LlamaForCausalLM `config.json` dict for `config` (old-style `rope_scaling`).

    `rope_theta` + `rope_scaling` is the style every transformers version reads
    (5.x converts it to `rope_parameters` on load). Raises ValueError for what HF
    LLaMA cannot express: lctx's `ntk` RoPE, partial rotary, sliding windows.
    """
    config.validate()
    problems = []
    if config.rope.rope_type == "ntk":
        problems.append("rope.rope_type='ntk': static NTK has no Hugging Face equivalent "
                        "(transformers has 'dynamic'); export needs another rope type")
    if config.rope.partial_rotary_factor != 1.0:
        problems.append(f"rope.partial_rotary_factor={config.rope.partial_rotary_factor}: "
                        "HF LLaMA rotates the full head; must be 1.0")
    if config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window}: HF LLaMA has no sliding "
                        "window; must be None")
    if problems:
        raise ValueError("cannot export to Hugging Face LLaMA:\n  " + "\n  ".join(problems))
    rope = config.rope.to_hf(legacy=True)
    if rope.get("rope_scaling"):
        rope["rope_scaling"] = {k: float(v) if k in _FLOAT_ROPE_KEYS else v
                                for k, v in rope["rope_scaling"].items()}
    rope["rope_theta"] = float(rope["rope_theta"])
    return {
        "architectures": list(SUPPORTED_ARCHITECTURES),
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": config.param_dtype,
        **rope,
        # The model's context length wins over the rope's copy (they must agree anyway).
        "max_position_embeddings": config.max_position_embeddings,
    }


# ----------------------------------------------------------------------------- safetensors


def _safetensors() -> Any:
    """The `safetensors` module (the `hf` extra), with an install hint when it is missing."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as err:
        raise ImportError("lctx.convert.hf needs safetensors: pip install -e '.[hf]' "
                          "(or pip install safetensors)") from err
    return safetensors


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header {name: {dtype, shape, data_offsets}}, byte offset of the data) of a file."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= path.stat().st_size - 8:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Tensors of one safetensors checkpoint (single file or index + shards), read lazily.

    Names, dtypes and shapes come from the headers alone, so a checkpoint's layout is
    checked before any weight is read. Reading uses `safetensors.numpy` and reads
    BF16 (which NumPy lacks and safetensors.numpy refuses) straight from the file
    as ml_dtypes bfloat16.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        hf_dir = Path(hf_dir)
        self.files = self._weight_files(hf_dir)
        self.entries: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for path in self.files:
            header, data_start = _safetensors_header(path)
            for name, entry in header.items():
                self.entries[name] = (path, entry, data_start)

    @staticmethod
    def _weight_files(hf_dir: Path) -> list[Path]:
        index = hf_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a safetensors index with a weight_map "
                                 f"({err!r})") from None
            files = [hf_dir / name for name in sorted(set(weight_map.values()))]
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise ValueError(f"{index}: lists shard files that are missing: {missing}")
            return files
        single = hf_dir / WEIGHTS_NAME
        if single.is_file():
            return [single]
        others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
            p.name for p in hf_dir.glob("*.pth"))
        hint = (f"; found {others}: lctx reads only safetensors (re-save with "
                "save_pretrained, which writes safetensors)") if others else ""
        raise ValueError(f"{hf_dir}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a NumPy array in its stored dtype."""
        path, entry, data_start = self.entries[name]
        if entry["dtype"] == "BF16":
            begin, end = entry["data_offsets"]
            raw = np.fromfile(path, dtype=np.uint8, count=end - begin, offset=data_start + begin)
            return raw.view(_SAFETENSORS_DTYPES["BF16"]).reshape(entry["shape"])
        with _safetensors().safe_open(str(path), framework="numpy") as f:
            return f.get_tensor(name)

    def dtype(self, name: str) -> np.dtype | None:
        """The NumPy dtype of a stored tensor, or None for dtypes lctx does not load."""
        return _SAFETENSORS_DTYPES.get(self.entries[name][1]["dtype"])


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _layout_problems(config: ModelConfig, reader: SafetensorsReader) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors of a checkpoint, one line per kind."""
    expected = expected_hf_shapes(config)
    present = set(reader.entries)
    ignorable = {n for n in present if _IGNORED_TENSORS.search(n)}
    if config.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied exports store the shared matrix twice
    missing = set(expected) - present
    unexpected = present - set(expected) - ignorable
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}), not part of a "
                        f"{config.n_layers}-layer bias-free LLaMA: {_listing(unexpected)}")
    wrong = [f"{name}: shape {reader.shape(name)}, expected {shape}"
             for name, shape in expected.items()
             if name in present and reader.shape(name) != shape]
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:5])
                        + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    bad_dtype = [n for n in expected if n in present and reader.dtype(n) is None]
    if bad_dtype:
        kinds = sorted({reader.entries[n][1]["dtype"] for n in bad_dtype})
        problems.append(f"tensors of unsupported dtype {kinds}: {_listing(bad_dtype)}; "
                        f"supported: {sorted(_SAFETENSORS_DTYPES)}")
    return problems


# ----------------------------------------------------------------------------- entry points


def load_llama(hf_dir: str | os.PathLike, *, param_dtype: str | None = None,
               **overrides: Any) -> tuple[ModelConfig, Params]:
    """(config, params) of a Hugging Face LLaMA directory (`config.json` + safetensors).

    param_dtype: dtype of the returned parameters; None keeps the checkpoint's
    (that of `model.embed_tokens.weight`). The compute dtype defaults to the same.
    `overrides` set other ModelConfig fields (attention_impl, remat, dtype, ...).
    Params are host NumPy arrays in lctx's tree; place them on a mesh with
    `jax.device_put(params, lctx.model.param_shardings(config, mesh))`.

    Raises ValueError naming what is wrong: no config.json, a non-LLaMA architecture
    or unsupported option, missing / unexpected / wrongly shaped tensors.
    """
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    try:
        config = config_from_hf(hf)
    except ValueError as err:
        raise ValueError(f"{hf_dir / CONFIG_NAME}: " + "; ".join(str(err).splitlines())) from None
    reader = SafetensorsReader(hf_dir)
    problems = _layout_problems(config, reader)
    if problems:
        raise ValueError(f"{hf_dir}: weights do not match a LLaMA with this config.json: "
                         + " | ".join(problems))
    if param_dtype is None:
        stored = reader.dtype("model.embed_tokens.weight").name
        param_dtype = stored if stored in ("float32", "bfloat16", "float16") else "float32"
    fields = {"param_dtype": param_dtype, "dtype": param_dtype, **overrides}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"overrides {unknown}: not ModelConfig fields")
    config = config.replace(**fields).validate()
    params = params_from_hf(config, reader.read, config.weights_dtype)
    return config, params


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Tensor names packed in order into groups of at most max_bytes (a bigger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, value in tensors.items():
        if groups[-1] and size + value.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += value.nbytes
    return groups


def save_llama(config: ModelConfig, params: Params, out_dir: str | os.PathLike, *,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes `config.json` + safetensors weights that `LlamaForCausalLM.from_pretrained` loads.

    Weights keep the params' dtype (written as `torch_dtype`). Above max_shard_bytes
    they are split into `model-0000k-of-0000n.safetensors` with
    `model.safetensors.index.json`, as transformers does. Returns out_dir.
    """
    save_file = _safetensors().numpy.save_file
    hf_config = config_to_hf(config)
    tensors = params_to_hf(config, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Stale weights from an earlier save would shadow or contradict the new ones.
    for old in [*out.glob("model*.safetensors"), out / INDEX_NAME]:
        old.unlink(missing_ok=True)
    groups = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers checks this tag on safetensors it loads
    if len(groups) == 1:
        save_file(tensors, out / WEIGHTS_NAME, metadata=metadata)
    else:
        weight_map = {}
        for k, names in enumerate(groups, start=1):
            filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, out / filename, metadata=metadata)
            weight_map.update(dict.fromkeys(names, filename))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    return out

