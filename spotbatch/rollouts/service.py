"""``spotbatch rollout controller``'s pass: tick every running rollout of the registry.

One broken rollout (or a broker hiccup) is logged and retried next pass; it never stops
the others. Each rollout is ticked against the jobs topic it was started on (recorded
in its settings), so one service drives the rollouts of every fleet sharing a registry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from spotbatch.rollouts.controller import Controller
from spotbatch.rollouts.registry import Registry

__all__ = ["tick_all"]

log = logging.getLogger(__name__)


def tick_all(bootstrap: str, models_topic: str, *, default_jobs_topic: str,
             client_options: Mapping | None = None) -> dict[str, str]:
    """{name: state after the tick} of the rollouts that were running."""
    try:
        state = Registry(bootstrap, models_topic, client_options=client_options).state()
    except Exception as exc:  # noqa: BLE001 - the service outlives a broker outage; the next pass retries
        log.warning("reading the registry %s failed: %s", models_topic, exc)
        return {}
    after: dict[str, str] = {}
    for name, rollout in sorted(state.rollouts.items()):
        if rollout.state != "running":
            continue
        jobs_topic = str(rollout.settings.get("jobs_topic") or default_jobs_topic)
        try:
            ticked = Controller(bootstrap, name, jobs_topic, models_topic, client_options=client_options).tick()
        except Exception as exc:  # noqa: BLE001 - one rollout's failure must not stall the others
            log.warning("rollout %s: tick failed: %s", name, exc)
            continue
        if (ticked.state, ticked.step) != (rollout.state, rollout.step):
            log.info("rollout %s v%d -> v%d: %s step %d/%d %s", name, ticked.champion, ticked.challenger,
                     ticked.state, ticked.step + 1, len(ticked.steps), ticked.reason)
        after[name] = ticked.state
    return after
