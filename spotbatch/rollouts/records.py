"""What the models topic holds, and the state it folds into.

Keys (compaction keeps the latest value of each): ``version/<name>/<n>`` -> a
:class:`ModelVersion`; ``alias/<name>/<alias>`` -> ``{"version": n}`` (a tombstone
removes the alias); ``rollout/<name>`` -> a :class:`Rollout`, the one rollout of a name
(its controller rewrites it at every step; workers route by it). Values are JSON objects.

Workers also write one :class:`ShadowRecord` per shadowed job to ``<jobs topic>.shadow``,
and their status records name the version that wrote each output (``model``,
``model_version``, ``model_digest``, ``route``): the controller's gates read both.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelVersion", "RegistryState", "Rollout", "ShadowRecord", "PRECISIONS", "ROLLOUT_STATES", "parse_model_ref",
           "check_name", "version_key", "alias_key", "rollout_key", "shadow_topic"]

PRECISIONS = ("fp32", "int8", "int8-token", "bf16")  # fp32, or a scheme of spotbatch.models.quantize
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


# running: the challenger takes ``fraction`` of the jobs (and shadows ``shadow`` of the
# champion's); the others are final: workers route every job to the champion.
ROLLOUT_STATES = ("running", "promoted", "rolled_back", "aborted")


@dataclass(frozen=True)
class Rollout:
    name: str
    champion: int
    challenger: int
    steps: tuple[float, ...]  # fractions of jobs, ascending, the last 1.0
    step: int = 0  # index into steps
    state: str = "running"
    shadow: float = 0.0  # fraction of the champion's jobs the challenger also runs, unwritten
    reason: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    step_started_at: float = 0.0  # jobs finished before this belong to an earlier step
    settings: dict[str, Any] = field(default_factory=dict)  # bake and gate thresholds, as started
    gates: list[dict[str, Any]] = field(default_factory=list)  # the last evaluation, for `rollout status`

    @property
    def fraction(self) -> float:
        """The share of jobs the challenger takes now: 0 unless running."""
        return self.steps[self.step] if self.state == "running" else 0.0

    @property
    def shadow_fraction(self) -> float:
        return self.shadow if self.state == "running" else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"steps": list(self.steps)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Rollout":
        return cls(**(data | {"steps": tuple(float(f) for f in data["steps"])}))


@dataclass(frozen=True)
class ShadowRecord:
    """How far the challenger agreed with the champion on one champion job's rows."""

    job_id: str
    model: str
    champion: int
    challenger: int
    rows: int
    mean: float  # per-row agreement (cosine for embeddings, 1 - relative difference otherwise)
    low: float  # its 5th percentile
    min: float
    worker: str = ""
    at: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self) | {"v": 1}).encode()

    @classmethod
    def from_json(cls, value: bytes) -> "ShadowRecord":
        data = json.loads(value)
        data.pop("v", None)
        return cls(**data)


def shadow_topic(topic: str) -> str:
    return f"{topic}.shadow"


def rollout_key(name: str) -> str:
    return f"rollout/{name}"


def version_key(name: str, version: int) -> str:
    return f"version/{name}/{version}"


def alias_key(name: str, alias: str) -> str:
    return f"alias/{name}/{alias}"


@dataclass
class RegistryState:
    """Versions and aliases per model name, built by applying the topic's records in order."""

    versions: dict[str, dict[int, ModelVersion]] = field(default_factory=dict)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    rollouts: dict[str, Rollout] = field(default_factory=dict)

    def apply(self, key: str, value: bytes | None) -> None:
        kind, _, rest = key.partition("/")
        name, _, tail = rest.partition("/")
        if kind == "version" and value is not None:
            data = json.loads(value)
            self.versions.setdefault(name, {})[int(tail)] = ModelVersion(**data)
        elif kind == "rollout":
            if value is None:
                self.rollouts.pop(name, None)
            else:
                self.rollouts[name] = Rollout.from_json(json.loads(value))
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
