"""Every test sees 8 virtual CPU devices (set before any JAX backend starts)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: extra parametrisations left out of the default run (-m 'not slow')")
