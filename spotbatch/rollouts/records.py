"""What the models topic holds, and the state it folds into.

Keys (compaction keeps the latest value of each): ``version/<name>/<n>`` -> a
:class:`ModelVersion`; ``alias/<name>/<alias>`` -> ``{"version": n}`` (a tombstone
removes the alias). Values are JSON objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelVersion", "RegistryState", "PRECISIONS", "parse_model_ref", "check_name", "version_key", "alias_key"]

PRECISIONS = ("fp32", "int8")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value or ""):
        raise ValueError(f"bad {kind} {value!r}: start with a letter; letters, digits, '_', '.', '-' only (max 64)")
    return value


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    ref: str
    digest: str
    precision: str = "fp32"
    created_at: float = 0.0
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def version_key(name: str, version: int) -> str:
    return f"version/{name}/{version}"


def alias_key(name: str, alias: str) -> str:
    return f"alias/{name}/{alias}"


@dataclass
class RegistryState:
    """Versions and aliases per model name, built by applying the topic's records in order."""

    versions: dict[str, dict[int, ModelVersion]] = field(default_factory=dict)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)

    def apply(self, key: str, value: bytes | None) -> None:
        kind, _, rest = key.partition("/")
        name, _, tail = rest.partition("/")
        if kind == "version" and value is not None:
            data = json.loads(value)
            self.versions.setdefault(name, {})[int(tail)] = ModelVersion(**data)
        elif kind == "alias":
            if value is None:
                self.aliases.get(name, {}).pop(tail, None)
            else:
                self.aliases.setdefault(name, {})[tail] = int(json.loads(value)["version"])

    def names(self) -> list[str]:
        return sorted(self.versions)

    def resolve(self, name: str, selector: str | None = None) -> ModelVersion:
        """``name`` (its champion), ``name@3`` or ``name@alias``; ValueError naming the fix."""
        known = self.versions.get(name)
        if not known:
            raise ValueError(f"model {name!r} is not in the registry; register it: spotbatch models register {name} "
                             "--version 1 --ref REF")
        selector = selector or "champion"
        if selector.isdigit():
            version = int(selector)
        elif selector in self.aliases.get(name, {}):
            version = self.aliases[name][selector]
        else:
            have = ", ".join(sorted(self.aliases.get(name, {}))) or "none"
            raise ValueError(f"model {name!r} has no alias {selector!r} (aliases: {have}); set one: spotbatch models "
                             f"alias {name} {selector} VERSION")
        if version not in known:
            have = ", ".join(str(v) for v in sorted(known))
            raise ValueError(f"model {name!r} has no version {version} (versions: {have})")
        return known[version]


def parse_model_ref(model: str) -> tuple[str, str | None]:
    """``embedder@2`` -> ("embedder", "2"); ``embedder`` -> ("embedder", None)."""
    name, sep, selector = model.partition("@")
    return name, (selector if sep else None)
