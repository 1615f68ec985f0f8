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
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        # Baseline of the attention benchmark (its pure-JAX ring); needs einops.
        "ringattention==0.1.2",
        "einops>=0.7",
    ],
    # Hugging Face checkpoint import/export and parity tests. Install torch first as
    # `pip install torch==2.13.0` (CPU build) where an unpinned torch would pull CUDA.
    "hf": [
        "torch>=2.4",
        "transformers>=4.50,<5.1",
        "safetensors>=0.4",
    ],
    "tpu": ["jax[tpu]>=0.7.1"],
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
