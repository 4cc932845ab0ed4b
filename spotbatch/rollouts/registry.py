"""The registry's Kafka side: read the models topic into a state, append versions, aliases
and the one rollout record of each name.

One partition keeps every record in order. Versions are immutable: registering an
existing number is refused. The topic is created on first use with
``cleanup.policy=compact``, so it holds the latest record of each key for ever.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Mapping

from kafka import KafkaProducer

from spotbatch.kafka_admin import ensure_topics, read_all
from spotbatch.rollouts.digest import digest_of_ref
from spotbatch.rollouts.records import (PRECISIONS, ModelVersion, RegistryState, Rollout, alias_key, check_name,
                                        rollout_key, version_key)

__all__ = ["Registry", "RegistryError", "TOPIC_CONFIGS"]

TOPIC_CONFIGS = {"cleanup.policy": "compact"}

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A refused registry change; ``str()`` is one line naming the fix."""


class Registry:
    def __init__(self, bootstrap: str, topic: str = "spotbatch.models", *,
                 client_options: Mapping | None = None) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self._options = dict(client_options or {})
        self._ready = False

    def ensure_topic(self) -> None:
        if not self._ready:
            ensure_topics(self.bootstrap, {self.topic: 1}, configs={self.topic: TOPIC_CONFIGS},
                          client_options=self._options)
            self._ready = True

    def state(self) -> RegistryState:
        """The registry as of now: every record of the topic, folded in order."""
        self.ensure_topic()
        state = RegistryState()
        for record in read_all(self.bootstrap, self.topic, client_options=self._options):
            if record.key is None:
                continue
            try:
                state.apply(record.key.decode(), record.value)
            except (ValueError, TypeError, KeyError) as exc:  # one bad record must not blind every worker
                log.warning("models topic offset %d: skipped an unreadable record (%s)", record.offset, exc)
        return state

    def register(self, name: str, version: int, ref: str, *, precision: str = "fp32", notes: str = "",
                 digest: str | None = None) -> ModelVersion:
        """Hash ``ref``'s files (here, where they are) and append the new version."""
        check_name("model name", name)
        if version < 1:
            raise RegistryError(f"bad --version {version}: versions are numbered from 1")
        if precision not in PRECISIONS:
            raise RegistryError(f"bad --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        if "@" in ref or ref == name:
            raise RegistryError(f"bad --ref {ref!r}: a ref names files or a built-in model, not a registry name")
        existing = self.state().versions.get(name, {})
        if version in existing:
            raise RegistryError(f"model {name!r} version {version} exists (ref {existing[version].ref}); versions are "
                                f"immutable: register {max(existing) + 1} instead")
        entry = ModelVersion(name=name, version=version, ref=ref, digest=digest or digest_of_ref(ref),
                             precision=precision, created_at=round(time.time(), 3), notes=notes)
        self._send({version_key(name, version): json.dumps(entry.to_json()).encode()})
        if not existing:  # the first version of a name is its champion: workers can serve it at once
            self._send({alias_key(name, "champion"): json.dumps({"version": version}).encode()})
        return entry

    def set_alias(self, name: str, alias: str, version: int | None) -> None:
        """Point ``alias`` at ``version``; None removes it."""
        check_name("alias", alias)
        if alias.isdigit():
            raise RegistryError(f"bad alias {alias!r}: a number would read as a version")
        known = self.state().versions.get(name, {})
        if not known:
            raise RegistryError(f"model {name!r} is not in the registry; register it first: spotbatch models register "
                                f"{name} --version 1 --ref REF")
        if version is not None and version not in known:
            have = ", ".join(str(v) for v in sorted(known))
            raise RegistryError(f"model {name!r} has no version {version} (versions: {have})")
        value = None if version is None else json.dumps({"version": version}).encode()
        self._send({alias_key(name, alias): value})

    def rollout(self, name: str) -> Rollout | None:
        """The current rollout record of ``name`` (running or final), None if it never had one."""
        return self.state().rollouts.get(name)

    def put_rollout(self, rollout: Rollout) -> None:
        """Write the rollout record: workers route by it, controllers resume from it."""
        check_name("model name", rollout.name)
        self._send({rollout_key(rollout.name): json.dumps(rollout.to_json()).encode()})

    def _send(self, records: Mapping[str, bytes | None]) -> None:
        self.ensure_topic()
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", **self._options)
        try:
            futures = [producer.send(self.topic, key=k.encode(), value=v, partition=0) for k, v in records.items()]
            for fut in futures:
                fut.get(timeout=30)
        finally:
            producer.close(timeout=5)
