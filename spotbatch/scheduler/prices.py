"""Instance prices: the YAML prices file, its loader and writer.

The file maps an instance type to its hourly prices::

    note: "Example prices ..."          # optional, free text (say where the figures come from)
    g5.xlarge: {on_demand_per_h: 1.006, spot_per_h: 0.3622, gpus: 1, region: us-east-1}

Every error is one line naming the file, the key and the fix: a cost report built on a
mistyped price would be silently wrong, so nothing is guessed or defaulted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["InstancePrice", "PricesError", "load_prices", "parse_prices", "save_prices", "demo_prices", "NOTE_KEY"]

NOTE_KEY = "note"  # the one top-level key that is not an instance type
_FIELDS = ("on_demand_per_h", "spot_per_h", "gpus", "region")


class PricesError(ValueError):
    """A bad prices file; the message is one line that names the key and the fix."""


@dataclass(frozen=True)
class InstancePrice:
    instance_type: str
    on_demand_per_h: float
    spot_per_h: float
    gpus: int
    region: str

    def per_h(self, pool: str) -> float:
        """The hourly price a worker in ``pool`` pays: "spot" the spot price; "on-demand"
        and "unknown" (a worker not told its pool) the on-demand price, so a report never
        shows savings nobody made."""
        if pool == "spot":
            return self.spot_per_h
        if pool in ("on-demand", "unknown"):
            return self.on_demand_per_h
        raise ValueError(f"unknown pool {pool!r}; expected 'spot', 'on-demand' or 'unknown'")


def load_prices(path: str | Path) -> dict[str, InstancePrice]:
    """Read and validate a prices file; raise PricesError (one line) on any problem."""
    p = Path(path)
    if not p.is_file():
        raise PricesError(f"prices file {p} does not exist; copy examples/prices.example.yaml or run "
                          f"`spotbatch scheduler prices --refresh --region R --file {p}`")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise PricesError(f"prices file {p} is not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    return parse_prices(doc, source=str(p))


def parse_prices(doc: Any, *, source: str = "<prices>") -> dict[str, InstancePrice]:
    """Validate an already-parsed prices document (see the module docstring)."""
    if not isinstance(doc, Mapping) or not doc:
        raise PricesError(f"{source}: expected a mapping of instance type -> "
                          f"{{{', '.join(_FIELDS)}}}; see examples/prices.example.yaml")
    prices: dict[str, InstancePrice] = {}
    for key, entry in doc.items():
        if key == NOTE_KEY:
            if not isinstance(entry, str):
                raise PricesError(f"{source}: {NOTE_KEY!r} must be a string (free text about the figures)")
            continue
        prices[str(key)] = _entry(str(key), entry, source)
    if not prices:
        raise PricesError(f"{source}: no instance types; add one like 'g5.xlarge: {{on_demand_per_h: 1.006, "
                          f"spot_per_h: 0.36, gpus: 1, region: us-east-1}}'")
    return prices


def _entry(name: str, entry: Any, source: str) -> InstancePrice:
    if not isinstance(entry, Mapping):
        raise PricesError(f"{source}: {name} must be a mapping with keys {', '.join(_FIELDS)}")
    unknown = sorted(set(map(str, entry)) - set(_FIELDS))
    if unknown:
        raise PricesError(f"{source}: {name}.{unknown[0]} is not a price field; valid keys: {', '.join(_FIELDS)}")
    missing = [f for f in _FIELDS if f not in entry]
    if missing:
        raise PricesError(f"{source}: {name}.{missing[0]} is missing; add it (keys: {', '.join(_FIELDS)})")
    return InstancePrice(
        instance_type=name,
        on_demand_per_h=_money(name, "on_demand_per_h", entry["on_demand_per_h"], source),
        spot_per_h=_money(name, "spot_per_h", entry["spot_per_h"], source),
        gpus=_gpus(name, entry["gpus"], source),
        region=_region(name, entry["region"], source),
    )


def _money(name: str, key: str, value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PricesError(f"{source}: {name}.{key} must be a number of dollars per hour >= 0, got {value!r}")
    return float(value)


def _gpus(name: str, value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PricesError(f"{source}: {name}.gpus must be a whole number >= 0, got {value!r}")
    return value


def _region(name: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PricesError(f"{source}: {name}.region must be a region name such as us-east-1, got {value!r}")
    return value


def save_prices(path: str | Path, prices: Mapping[str, InstancePrice], *, note: str | None = None) -> None:
    """Write ``prices`` as a prices file (sorted by type) that load_prices reads back."""
    doc: dict[str, Any] = {NOTE_KEY: note} if note else {}
    for name in sorted(prices):
        fields = asdict(prices[name])
        fields.pop("instance_type")
        doc[name] = fields
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))


def demo_prices() -> dict[str, InstancePrice]:
    """Illustrative prices for the local demo's workers (instance type "local").

    Not a quote: the figures mirror a g5.xlarge in us-east-1 (on-demand $1.006/h, spot
    about a third of that) so the demo's report shows realistic proportions.
    """
    return {"local": InstancePrice("local", on_demand_per_h=1.006, spot_per_h=0.36, gpus=1, region="illustrative")}
