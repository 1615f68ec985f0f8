"""The cache policies by name, and the one parser of cache spec strings.

    parse("int4:group=32,residual=128")   # -> the int4 policy with those options

A spec is `name` or `name:key=value,key=value`; the keys are the policy dataclass's
fields (their defaults apply to the keys left out) and each value must have the
field's type (int or str). Every command, config and benchmark takes a policy
through `parse`, so the messages are the same everywhere.
"""

from __future__ import annotations

import dataclasses

from lctx.cli import did_you_mean
from lctx.infer.kvcache.base import CachePolicy

POLICIES: dict[str, type[CachePolicy]] = {}


def register(cls: type[CachePolicy]) -> type[CachePolicy]:
    """Class decorator: makes `cls.name` a spec name."""
    if cls.name in POLICIES:
        raise ValueError(f"cache policy {cls.name!r} registered twice")
    POLICIES[cls.name] = cls
    return cls


def _value(key: str, text: str, kind: type, spec: str) -> object:
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"kv_cache={spec!r}: {key}={text!r} is not an integer") from None
    return text


def parse(spec: str) -> CachePolicy:
    """The policy `spec` names, validated; ValueError (one line) naming what is wrong."""
    name, _, rest = str(spec).strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"kv_cache={spec!r}: unknown policy {name!r}{did_you_mean(name, POLICIES)}; "
                         f"allowed: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, text = item.partition("=")
        key = key.strip()
        if key not in fields or not eq:
            allowed = ", ".join(fields) or "none"
            raise ValueError(f"kv_cache={spec!r}: {item!r} is not key=value with a key of "
                             f"{name!r}; allowed keys: {allowed}")
        kind = int if fields[key].type in (int, "int") else str
        options[key] = _value(key, text.strip(), kind, spec)
    policy = cls(**options)
    problems = policy.problems()
    if problems:
        raise ValueError(f"kv_cache={spec!r}: " + "; ".join(problems))
    return policy
