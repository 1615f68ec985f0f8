"""The run configuration: schema with defaults, per-stage resolution, validation.

Recipes in `configs/` start from `base_config()` and add named stages with
`stage(...)`; every key a recipe or the command line may set is defined here, so
an unknown key, a wrong type or an impossible value is caught before anything
compiles, with one line per problem naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections
from ml_collections import ConfigDict

from lctx import model as lm
from lctx.data.synthetic import mix_problems
from lctx.eval.api import DEFAULT_LENGTHS, DEFAULTS as EVAL_DEFAULTS, check_options
# Stage resolution lives below training so loaders read run directories without it.
from lctx.convert.run import stage_mesh_shape as mesh_shape
from lctx.convert.run import as_dict, stage_model_config as model_config
from lctx.kernels.blockwise import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from lctx.kernels.registry import IMPLS, sequence_problems
from lctx.kernels.pallas import resolve_kernel
from lctx.models.registry import REGISTRY
from lctx.training.optim import SCHEDULES

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
OPTIMIZER_STATE = ("fresh", "carry")


def base_config() -> ConfigDict:
    """Every key of a run, with defaults. Recipes override and add stages."""
    c = ConfigDict()
    c.name = "run"  # recipe name; the default workdir is runs/<name>
    c.workdir = ""  # run directory; rerunning the same command resumes ("" -> runs/<name>)
    c.seed = 0  # parameter init and data shuffling
    # What to start from: any lctx.load source (a registered name such as smollm2-135m, a
    # .gguf file, an lctx checkpoint or Hugging Face directory); "" initialises randomly.
    c.init_from = ""

    # Model: a preset name plus any lctx.model.ModelConfig field to override.
    c.model = ConfigDict()
    c.model.preset = "tiny"
    c.model.attention_impl = "blockwise"  # reference | blockwise | ring | ulysses | pallas
    # block_q, block_k, layout, placement; ring_inner (xla | pallas), kernel (tpu | gpu),
    # interpret (Pallas interpret mode: the only way Pallas kernels run on a CPU)
    c.model.attention_options = ConfigDict()
    c.model.remat = "none"  # none | full | save_attention
    c.model.dtype = "float32"  # compute dtype (bfloat16 on TPU)
    c.model.param_dtype = "float32"
    c.model.ffn_chunk = ml_collections.config_dict.placeholder(int)  # blockwise feed-forward chunk
    c.model.max_position_embeddings = ml_collections.config_dict.placeholder(int)
    # The preset's shape, unless set (None keeps the preset's value).
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim",
                  "head_dim", "sliding_window"):
        c.model[field] = ml_collections.config_dict.placeholder(int)
    c.model.norm_eps = ml_collections.config_dict.placeholder(float)
    c.model.tie_embeddings = ml_collections.config_dict.placeholder(bool)

    # Mesh sizes over (data, fsdp, sequence, tensor); -1 takes the remaining devices.
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, sequence=1, tensor=1))

    c.data = ConfigDict()
    c.data.corpus_dir = ""  # directory of text files; "" -> this Python's standard library
    c.data.tfds_name = ""  # a named TFDS dataset instead (e.g. "pg19"), read from tfds_data_dir
    c.data.tfds_data_dir = ""  # where TFDS datasets live ("" -> runs/<name>/../tfds)
    # byte | path/to/spm.model | path/to/tokenizer.json | model (init_from's own tokenizer)
    c.data.tokenizer = "byte"
    c.data.validation_fraction = 0.05  # held-out share of files, split by path hash
    c.data.dedup = "exact"  # none | exact | near (duplicate file removal)
    c.data.whole_docs = False  # documents that fit in a row are never split (padding instead)
    # Synthetic passkey / needle documents in the training stream (lctx.data.synthetic).
    c.data.mix = ConfigDict()
    c.data.mix.fraction = 0.0  # share of training tokens that are synthetic (0: off)
    c.data.mix.passkey_share = 0.5  # share of synthetic documents in passkey format (rest needle)

    # Activation beacons (lctx.model.beacon): with ratios set, only a beacon module is
    # trained on the frozen init_from model (its optimizer state too), each chunk of
    # `chunk` tokens at a ratio drawn from `ratios`; () trains the model itself.
    c.beacon = ConfigDict()
    c.beacon.ratios = ()
    c.beacon.chunk = 1024

    c.stage_order = ()  # stage names in the order they run (ConfigDict sorts its keys)
    c.stages = ConfigDict()

    c.optimizer = ConfigDict()
    c.optimizer.weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0  # global-norm gradient clipping (0 disables)
    c.optimizer.decay_norms_and_embeddings = False

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 100  # also saved at every stage end and on SIGTERM/SIGINT
    # Where checkpoints go ("" -> <workdir>/checkpoints). A multi-host run needs a
    # directory every host sees, e.g. gs://bucket/runs/x/checkpoints on a TPU pod slice.
    c.checkpoint.directory = ""
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log_every_steps = 10  # metrics.jsonl / TensorBoard / progress-bar cadence

    # End-of-run evaluation; defaults are python -m lctx.eval's (lctx.eval.api.DEFAULTS).
    c.eval = ConfigDict()
    c.eval.lengths = DEFAULT_LENGTHS  # held-out perplexity at these lengths
    c.eval.stride = EVAL_DEFAULTS["stride"]  # sliding window: only the last `stride` tokens score
    c.eval.max_tokens = EVAL_DEFAULTS["max_tokens"]  # held-out tokens scored per length
    c.eval.batch_size = EVAL_DEFAULTS["batch_size"]
    c.eval.tasks = ("ppl",)  # any of ppl, passkey, needle (lctx.eval)
    c.eval.depths = EVAL_DEFAULTS["depths"]  # passkey / needle depths
    c.eval.trials = EVAL_DEFAULTS["trials"]  # random keys / haystacks per (length, depth)
    c.eval.seed = EVAL_DEFAULTS["seed"]  # passkey keys
    # Retrieval reads through this cache policy (lctx.infer.kvcache spec). A beacon run
    # reads everything through `beacon:ratio=R,chunk=C`, params= defaulting to its module.
    c.eval.kv_cache = EVAL_DEFAULTS["kv_cache"]
    return c


def trains_beacons(config: ConfigDict) -> bool:
    """Whether the run trains an activation-beacon module, not the model."""
    return bool(config.beacon.ratios)


def stage(*, seq_len: int, batch_size: int, steps: int, learning_rate: float,
          warmup_steps: int = 0, schedule: str = "cosine", final_lr_fraction: float = 0.1,
          rope_scaling: dict | None = None, optimizer_state: str = "fresh", min_doc_len: int = 0,
          grad_accum_steps: int = 1, model: dict | None = None, mesh: dict | None = None) -> ConfigDict:
    """One stage's keys (see `STAGE_FIELDS`)."""
    values = dict(seq_len=seq_len, batch_size=batch_size, steps=steps, learning_rate=learning_rate,
                  warmup_steps=warmup_steps, schedule=schedule, final_lr_fraction=final_lr_fraction,
                  rope_scaling=rope_scaling, optimizer_state=optimizer_state, min_doc_len=min_doc_len,
                  grad_accum_steps=grad_accum_steps, model=model, mesh=mesh)
    c = ConfigDict(values)
    for key in ("rope_scaling", "model", "mesh"):
        if values[key] is None:
            c[key] = ml_collections.config_dict.placeholder(dict)
    return c


STAGE_FIELDS = {
    "seq_len": "tokens per sequence",
    "batch_size": "global batch (sequences)",
    "steps": "optimizer updates",
    "learning_rate": "peak learning rate",
    "warmup_steps": "linear warmup",
    "schedule": "cosine | constant | linear after warmup",
    "final_lr_fraction": "end learning rate / peak",
    "rope_scaling": "HF-style rope scaling dict (None: the model's)",
    "optimizer_state": "fresh | carry from the previous stage",
    "min_doc_len": "only sample windows from documents at least this long (0: all)",
    "grad_accum_steps": "micro-batches per update",
    "model": "overrides of config.model for this stage",
    "mesh": "overrides of config.mesh for this stage",
}


# ----------------------------------------------------------------------------- resolution


def workdir(config: ConfigDict) -> str:
    return config.workdir or os.path.join("runs", config.name)


# ----------------------------------------------------------------------------- validation


def _type_problems(config: ConfigDict, schema: ConfigDict, prefix: str) -> list[str]:
    """Unknown keys and wrong types, recursively, against the schema's defaults."""
    problems = []
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            problems.append(f"{name}: unknown key; allowed: {', '.join(sorted(schema.keys()))}")
            continue
        value, default = config[key], schema[key]
        if isinstance(default, ConfigDict):
            if key in ("attention_options", "stages"):  # free-form; checked per stage / by the model
                continue
            if isinstance(value, ConfigDict):
                problems += _type_problems(value, default, name + ".")
            else:
                problems.append(f"{name}={value!r}: expected a group of keys")
        elif default is not None and value is not None and not _same_kind(value, default):
            problems.append(f"{name}={value!r}: expected {type(default).__name__}")
    return problems


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _model_errors(build) -> list[str]:
    """The lines of the ValueError `build()` raises (a ModelConfig's validation), else []."""
    try:
        build()
    except ValueError as err:
        return [ln.strip() for ln in str(err).splitlines()[1:]] or [str(err)]
    return []


def _shared_model(config: ConfigDict) -> dict[str, Any]:
    """config.model's overrides alone, without any stage's."""
    values = {k: v for k, v in as_dict(config.model).items() if v is not None and k != "preset"}
    values["attention_options"] = dict(values.get("attention_options", {}))
    return values


def _stage_problems(config: ConfigDict, name: str, num_devices: int) -> list[str]:
    s = config.stages[name]
    key = f"stages.{name}"
    problems = []
    unknown = sorted(set(s.keys()) - set(STAGE_FIELDS))
    for k in unknown:
        problems.append(f"{key}.{k}: unknown key; allowed: {', '.join(STAGE_FIELDS)}")
    for field in ("seq_len", "batch_size", "steps", "grad_accum_steps"):
        value = s.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key}.{field}={value!r}: expected a positive int")
    for field in ("warmup_steps", "min_doc_len"):
        value = s.get(field, 0)
        if not isinstance(value, int) or value < 0:
            problems.append(f"{key}.{field}={value!r}: expected an int >= 0")
    lr = s.get("learning_rate")
    if not isinstance(lr, (int, float)) or lr < 0:
        problems.append(f"{key}.learning_rate={lr!r}: expected a float >= 0")
    if s.get("schedule") not in SCHEDULES:
        problems.append(f"{key}.schedule={s.get('schedule')!r}: expected one of {', '.join(SCHEDULES)}")
    if s.get("optimizer_state") not in OPTIMIZER_STATE:
        problems.append(f"{key}.optimizer_state={s.get('optimizer_state')!r}: expected one of "
                        f"{', '.join(OPTIMIZER_STATE)}")
    if problems:
        return problems

    # Problems of config.model / config.mesh name those keys (problems() keeps one copy).
    lines = _model_errors(lambda: model_config(config, name))
    if lines:
        shared = set(_model_errors(lambda: lm.preset(config.model.preset, **_shared_model(config))))
        return [f"model.{ln}" if ln in shared else f"{key} model: {ln}" for ln in lines]
    mc = model_config(config, name)

    sizes = mesh_shape(config, name, num_devices)
    mesh_key = f"{key}.mesh" if s.get("mesh") is not None else "mesh"
    bad_axes = sorted(set(sizes) - set(MESH_AXES))
    if bad_axes:
        return [f"{mesh_key}: unknown axes {bad_axes}; allowed: {', '.join(MESH_AXES)}"]
    if any(not isinstance(v, int) or v <= 0 for v in sizes.values()) or math.prod(sizes.values()) != num_devices:
        return [f"{mesh_key}={sizes}: the product of the axis sizes must equal the {num_devices} "
                "devices (one axis may be -1 to fill)"]
    seq_len, batch = s.seq_len, s.batch_size
    data_parallel = sizes["data"] * sizes["fsdp"]
    if batch % (data_parallel * s.grad_accum_steps):
        problems.append(f"{key}.batch_size={batch}: must be divisible by data x fsdp ({data_parallel}) "
                        f"x grad_accum_steps ({s.grad_accum_steps})")
    options = dict(mc.attention_options)
    impl = IMPLS[mc.attention_impl]
    if "block_q" in impl.options:  # the blocks the kernels default to must divide too
        options = {"block_q": DEFAULT_BLOCK_Q, "block_k": DEFAULT_BLOCK_K, **options}
    for opt, value, allowed in sequence_problems(mc.attention_impl, options, seq=seq_len,
                                                 shards=sizes["sequence"]):
        what = "" if opt == "seq" else f"model.attention_options.{opt}={value} "
        problems.append(f"{key}.seq_len={seq_len}: {what}{allowed}")
    if impl.uses_pallas(mc.attention_options):
        try:
            resolve_kernel(mc.attention_options.get("kernel"), mc.attention_options.get("interpret", False))
        except ValueError as err:
            problems.append(f"{key} model: {err}")
    if mc.ffn_chunk and seq_len % mc.ffn_chunk:
        problems.append(f"{key}.seq_len={seq_len}: model.ffn_chunk={mc.ffn_chunk} must divide it")
    return problems


def problems(config: ConfigDict, num_devices: int) -> list[str]:
    """Every problem with `config` on `num_devices` devices, one line each."""
    found = _type_problems(config, base_config(), "")
    if found:
        return found
    order = tuple(config.stage_order)
    if not order:
        found.append("stage_order=(): expected at least one stage name")
    missing = [n for n in order if n not in config.stages]
    if missing:
        found.append(f"stage_order={order!r}: no stages named {missing}; defined: {sorted(config.stages.keys())}")
    unused = sorted(set(config.stages.keys()) - set(order))
    if unused:
        found.append(f"stages: {unused} are not in stage_order={order!r}")
    for name in order:
        if name in config.stages:
            found += _stage_problems(config, name, num_devices)
    found += _data_problems(config)
    found += _eval_problems(config)
    if config.init_from and not (config.init_from in REGISTRY or os.path.exists(config.init_from)):
        found.append(f"init_from={config.init_from!r}: no such file or directory and not a "
                     f"registered model ({', '.join(sorted(REGISTRY))})")
    found += _beacon_problems(config)
    for key in ("checkpoint.every_steps", "checkpoint.keep", "log_every_steps"):
        value = config[key]
        if value <= 0:
            found.append(f"{key}={value}: expected a positive int")
    return list(dict.fromkeys(found))  # a problem of the shared model or mesh: once, not per stage


def _beacon_problems(config: ConfigDict) -> list[str]:
    b, found = config.beacon, []
    if not trains_beacons(config):
        return found
    if not isinstance(b.chunk, int) or b.chunk < 1:
        return [f"beacon.chunk={b.chunk!r}: expected a positive int"]
    for ratio in b.ratios:
        if not isinstance(ratio, int) or ratio < 1 or b.chunk % ratio:
            found.append(f"beacon.ratios={tuple(b.ratios)}: {ratio!r} is not a positive divisor "
                         f"of beacon.chunk={b.chunk}")
    if not config.init_from:
        found.append(f"beacon.ratios={tuple(b.ratios)}: beacons train on a frozen model; set "
                     "init_from")
    for name in config.stage_order:
        seq = config.stages[name].get("seq_len") if name in config.stages else None
        if isinstance(seq, int) and seq % b.chunk:
            found.append(f"stages.{name}.seq_len={seq}: must be a multiple of beacon.chunk={b.chunk}")
    return found


def _data_problems(config: ConfigDict) -> list[str]:
    d = config.data
    found = []
    if d.corpus_dir and not os.path.isdir(d.corpus_dir):
        found.append(f"data.corpus_dir={d.corpus_dir!r}: no such directory")
    if d.corpus_dir and d.tfds_name:
        found.append("data.corpus_dir and data.tfds_name: give one source, not both")
    if d.tfds_data_dir and d.tfds_name and not os.path.isdir(d.tfds_data_dir):
        found.append(f"data.tfds_data_dir={d.tfds_data_dir!r}: no such directory")
    tok = d.tokenizer
    path = tok.split(":", 1)[1] if tok.startswith(("spm:", "sentencepiece:", "hf:")) else tok
    if tok == "model" and not config.init_from:
        found.append("data.tokenizer='model': the tokenizer of init_from, which is not set")
    elif tok not in ("byte", "model") and not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "tokenizer.json"))):
        found.append(f"data.tokenizer={tok!r}: expected 'byte', a SentencePiece .model file or a "
                     "Hugging Face tokenizer.json file that exists (optionally prefixed spm: or hf:)")
    if not 0.0 < d.validation_fraction < 1.0:
        found.append(f"data.validation_fraction={d.validation_fraction}: expected a value in (0, 1)")
    if d.dedup not in ("none", "exact", "near"):
        found.append(f"data.dedup={d.dedup!r}: expected none, exact or near")
    found += mix_problems(d.mix)
    return found


def _eval_problems(config: ConfigDict) -> list[str]:
    e = config.eval
    options = dict(stride=e.stride, max_tokens=e.max_tokens, batch_size=e.batch_size,
                   depths=tuple(e.depths), trials=e.trials, seed=e.seed, kv_cache=e.kv_cache)
    found = [f"eval.{line}" for line in check_options(tuple(e.tasks), tuple(e.lengths), options)]
    if trains_beacons(config) and not e.kv_cache.startswith("beacon"):
        found.append(f"eval.kv_cache={e.kv_cache!r}: a beacon run evaluates through its module; "
                     "expected beacon:ratio=R,chunk=C")
    return found


def describe(config: ConfigDict) -> dict[str, Any]:
    """A JSON-able copy of the config (written into the run directory and checkpoints)."""
    return config.to_dict()

