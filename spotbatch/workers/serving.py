"""What a worker serves, built from its settings: one model, or a registry name's versions.

``--model minilm`` (a built-in, or ``st:``/``torchscript:``/``export:`` PATH) loads that
model, as always. Any other name is looked up in the model registry (the models topic):
the worker tails it and serves the name's champion, plus the challenger of a running
rollout (see versions.py). Loading a version checks its files against the registered
SHA-256 digest first and builds its precision variant (``int8``, ``int8-token``,
``bf16``: spotbatch.models.quantize).
"""

from __future__ import annotations

import logging
from typing import Any

from spotbatch.config import Settings
from spotbatch.errors import JobError
from spotbatch.kafka_security import client_options
from spotbatch.models import get_handler
from spotbatch.models.quantize import quantized
from spotbatch.models.runner import BatchRunner
from spotbatch.rollouts.digest import digest_of_ref
from spotbatch.rollouts.records import ModelVersion
from spotbatch.rollouts.registry import Registry
from spotbatch.rollouts.watch import RegistryWatch
from spotbatch.workers.startup import EXIT_LOCATION, StartupError
from spotbatch.workers.versions import LoadedModel, Versions

__all__ = ["serve", "load_version"]

log = logging.getLogger("spotbatch.worker")


def serve(settings: Settings, *, watch_every_s: float = 2.0) -> Versions:
    """Load what ``settings.model`` names; StartupError (one line, exit 2) if nothing can serve."""
    handler = _builtin(settings.model)
    if handler is not None:
        return Versions.single(handler.name, load(handler, settings), aliases=(settings.model,))
    registry = Registry(settings.kafka_bootstrap, settings.models_topic, client_options=client_options(settings))
    watch = RegistryWatch(registry.state, every_s=watch_every_s).start()
    if settings.model not in watch.state.versions:
        watch.stop()
        try:
            get_handler(settings.model)
        except JobError as exc:  # the built-in choices, then the registry's way
            raise StartupError(f"{exc}; or a name in the model registry ({settings.models_topic}): spotbatch models "
                               f"register {settings.model} --version 1 --ref REF", EXIT_LOCATION) from None
    versions = Versions(settings.model, load=lambda version: load_version(version, settings), watch=watch)
    versions.refresh()
    try:  # the champion must load: a worker that cannot serve it must not join the group
        versions.model_for(None)
    except (JobError, KeyError) as exc:
        watch.stop()
        raise StartupError(f"cannot serve {settings.model!r}: {exc}", EXIT_LOCATION) from None
    return versions


def load(handler: Any, settings: Settings) -> LoadedModel:
    runner = BatchRunner(handler, device=settings.device, precision=settings.precision)
    runner.load()
    log.info("model %s loaded on %s", handler.name, runner.device)
    return LoadedModel(handler, runner.run, runner.stage if runner.can_stage else None)


def load_version(version: ModelVersion, settings: Settings) -> LoadedModel:
    """Refuses (ValueError) a version whose files are not the ones registered."""
    found = digest_of_ref(version.ref)
    if found != version.digest:
        raise ValueError(f"digest mismatch: {version.ref} hashes to {found}, registered as {version.digest}; "
                         f"restore the registered files or register them as a new version")
    handler = get_handler(version.ref)
    if version.precision != "fp32":
        handler = quantized(handler, version.precision)
    return load(handler, settings)


def _builtin(name: str) -> Any:
    try:
        return get_handler(name)
    except JobError as exc:
        if exc.code == "unknown_model" and ":" not in name:
            return None  # a registry name, or a typo: serve() tells
        raise
