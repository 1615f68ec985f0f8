"""lctx: long-context language models in JAX/Flax (TPU-first)."""

from setuptools import find_packages, setup

# Ranges are the ones tested here; JAX's public shard_map / AxisType API needs >= 0.7.
INSTALL_REQUIRES = [
    "jax>=0.7.1",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.89",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    # Data: TFDS text datasets in array_record format (no TensorFlow), Grain loading.
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8.6",
    "importlib_resources>=6",
    "etils[epath]>=1.7",
    "grain>=0.2.18,<0.3",
    "sentencepiece>=0.2.0",
    "tokenizers>=0.21",
    # Renders a model's chat template (Hugging Face tokenizers store them as Jinja).
    "jinja2>=3.1",
    "safetensors>=0.4",
    # GGUF (llama.cpp) reading and dequantization: lctx.load of .gguf files.
    "gguf>=0.10",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        # Baseline of the attention benchmark (its pure-JAX ring); needs einops.
        "ringattention==0.1.2",
        "einops>=0.7",
        # tests/test_notebooks.py executes the experiments/ notebooks.
        "nbclient>=0.10,<0.12",
        "nbformat>=5.9,<6",
        "ipykernel>=6.29,<8",
    ],
    # Hugging Face checkpoint import/export and parity tests. Install torch first as
    # `pip install torch==2.13.0` (CPU build) where an unpinned torch would pull CUDA.
    "hf": [
        "torch>=2.4",
        "transformers>=4.50,<5.1",
        # transformers needs it to load a GGUF file (the real-model parity tests).
        "accelerate>=0.26",
    ],
    # gcsfs: gs:// checkpoint directories (Orbax reads and writes them through etils/fsspec).
    "tpu": ["jax[tpu]>=0.7.1", "gcsfs>=2024.2"],
    "gpu": ["jax[cuda12]>=0.7.1"],
}

setup(
    name="lctx",
    version="0.1.0",
    description="Long-context language models in JAX/Flax: RoPE scaling, blockwise/ring attention, evaluation.",
    packages=find_packages(include=["lctx", "lctx.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
