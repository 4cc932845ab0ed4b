"""Which model version serves a job, and the loaded model of each version.

A worker serves either one built-in model (``--model minilm``: every job it takes runs
that model, as before the registry) or a registry name (``--model embedder``): the
champion, and while a rollout runs the challenger too, both loaded on the device. A job
naming ``embedder`` follows the rollout: the challenger takes it when its job id hashes
into the step's fraction (routing.py), so a redelivered job takes the same version on
any worker. ``embedder@2`` and ``embedder@champion`` pin. A version whose files do not
hash to its registered digest, or that cannot load (the device is full), is refused:
its jobs dead-letter as ``model_version_refused`` (redrivable), which a rollout's
failed-job gate sees at once, and the champion goes on serving.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from spotbatch.errors import JobError
from spotbatch.jobs import Job
from spotbatch.retry import model_retry
from spotbatch.rollouts.records import ModelVersion, RegistryState, parse_model_ref
from spotbatch.rollouts.routing import bucket_of, routes_to_challenger
from spotbatch.rollouts.watch import RegistryWatch

__all__ = ["Served", "Versions", "LoadedModel"]

log = logging.getLogger("spotbatch.worker")

# Parquet schema metadata keys naming the version that wrote an output.
META_MODEL, META_VERSION, META_DIGEST = "spotbatch.model", "spotbatch.model_version", "spotbatch.model_digest"


@dataclass(frozen=True)
class LoadedModel:
    """A version on the device: its handler (row and params checks) and its runner."""

    handler: Any
    run: Callable[[Any, dict[str, Any]], Any]  # BatchRunner.run
    stage: Callable[[Any], Any] | None = None  # BatchRunner.stage, for text models


@dataclass(frozen=True)
class Served:
    """What serves one job: the model name it used, the version (None: a built-in), how
    it was chosen, and the challenger that also shadows it (champion jobs only)."""

    model: str
    version: ModelVersion | None
    route: str  # "builtin", "champion", "challenger", "pinned" or "shadow"
    shadow: ModelVersion | None = None

    @property
    def key(self) -> str:
        """Jobs with different keys never share a batch."""
        return self.model if self.version is None else f"{self.model}@{self.version.version}"

    def status_fields(self) -> dict[str, Any]:
        if self.version is None:
            return {"model": self.model}
        return {"model": self.model, "model_version": self.version.version, "model_digest": self.version.digest,
                "route": self.route}

    def metadata(self) -> dict[str, str]:
        fields = {META_MODEL: self.model}
        if self.version is not None:
            fields |= {META_VERSION: str(self.version.version), META_DIGEST: self.version.digest}
        return fields

    def wrote(self, metadata: dict[str, str] | None) -> bool:
        """Was an existing output (its Parquet metadata) written by what serves the job
        now? A built-in worker takes any output as its own (outputs before versions)."""
        if metadata is None:
            return False
        return self.version is None or metadata.get(META_VERSION) == str(self.version.version)


class Versions:
    """Routes jobs and holds the loaded versions; owner thread, except ``model_for``."""

    def __init__(self, name: str, *, load: Callable[[ModelVersion], LoadedModel] | None = None,
                 watch: RegistryWatch | None = None, builtin: LoadedModel | None = None,
                 aliases: tuple[str, ...] = ()) -> None:
        if (watch is None) == (builtin is None):
            raise ValueError("serve either a registry name (watch, load) or a built-in model (builtin)")
        self.name = name
        self._load, self._watch, self._builtin = load, watch, builtin
        self._names = {name, *aliases}
        self._loaded: dict[int, LoadedModel] = {}
        self._refused: dict[int, str] = {}  # version -> why
        self._retrying: dict[int, Callable] = {}  # id(LoadedModel) -> its run under model_retry
        self._generation = -1

    @classmethod
    def single(cls, name: str, model: LoadedModel, aliases: tuple[str, ...] = ()) -> "Versions":
        return cls(name, builtin=model, aliases=aliases)

    @property
    def registry(self) -> bool:
        return self._watch is not None

    def names(self) -> set[str]:
        return set(self._names)

    @property
    def handler(self) -> Any:
        """The champion's handler (a built-in worker's only one)."""
        return self._champion_model().handler

    def refresh(self) -> None:
        """Load the champion and the challenger of a running rollout once the registry
        names them (cheap when nothing changed: called every loop turn)."""
        if self._watch is None or self._watch.generation == self._generation:
            return
        self._generation = self._watch.generation
        state = self._state()
        wanted = [self._champion_of(state)]
        rollout = state.rollouts.get(self.name)
        if rollout is not None and rollout.state == "running":
            wanted.append(state.versions.get(self.name, {}).get(rollout.challenger))
        for version in wanted:
            if version is not None:
                self._ensure(version)

    def route(self, job: Job) -> Served:
        """The version that serves ``job``; JobError when the job names another model, a
        missing version or alias, or a refused one."""
        name, selector = parse_model_ref(job.model)
        if self._watch is None:
            if job.model not in self._names:
                raise _not_ours(job.model, self.name)
            return Served(self.name, None, "builtin")
        state = self._state()
        if name != self.name:
            raise _not_ours(job.model, self.name, registered=name in state.versions)
        if selector is not None:
            return Served(name, self._checked(self._resolve(state, name, selector)), "pinned")
        champion = self._checked(self._resolve(state, name, None))
        rollout = state.rollouts.get(name)
        if rollout is None or rollout.state != "running" or rollout.challenger == champion.version:
            return Served(name, champion, "champion")
        challenger = state.versions.get(name, {}).get(rollout.challenger)
        if challenger is not None and routes_to_challenger(job.job_id, rollout.fraction):
            return Served(name, self._checked(challenger), "challenger")
        shadow = challenger if challenger is not None and _shadowed(job.job_id, rollout.shadow_fraction) else None
        if shadow is not None and shadow.version in self._refused:
            shadow = None  # a shadow is best effort: the champion's job goes on alone
        return Served(name, champion, "champion", shadow=shadow)

    def model_for(self, served: Served | None) -> LoadedModel:
        """The loaded model for ``served`` (None: the champion). Safe on the inference
        thread: ``route`` loads a version on the owner thread before its jobs batch."""
        if served is None or served.version is None:
            return self._champion_model()
        return self._loaded[served.version.version]

    def run_for(self, served: Served | None) -> Callable[[Any, dict[str, Any]], Any]:
        """The version's run under the model retry policy (built once per loaded model)."""
        model = self.model_for(served)
        run = self._retrying.get(id(model))
        if run is None:
            run = self._retrying[id(model)] = model_retry(model.run)
        return run

    def shadow_of(self, served: Served) -> Served | None:
        """The challenger's run of a shadowed champion job: computed, compared, not written."""
        if served.shadow is None:
            return None
        return Served(served.model, self._checked(served.shadow), "shadow")

    # ---- loading ---------------------------------------------------------------

    def _champion_model(self) -> LoadedModel:
        if self._builtin is not None:
            return self._builtin
        return self._loaded[self._checked(self._resolve(self._state(), self.name, None)).version]

    def _checked(self, version: ModelVersion) -> ModelVersion:
        self._ensure(version)
        if version.version in self._refused:
            raise JobError("model_version_refused", f"{version.name}@{version.version}: "
                           f"{self._refused[version.version]}")
        return version

    def _ensure(self, version: ModelVersion) -> None:
        if version.version in self._loaded or version.version in self._refused or self._load is None:
            return
        try:
            self._loaded[version.version] = self._load(version)
            log.info("model %s@%d loaded (ref %s, %s)", version.name, version.version, version.ref, version.precision)
        except Exception as exc:  # noqa: BLE001 - a bad version must not stop the champion
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._refused[version.version] = why
            log.error("model %s@%d refused: %s", version.name, version.version, why)

    def _state(self) -> RegistryState:
        assert self._watch is not None  # registry mode only (callers check)
        return self._watch.state

    def _champion_of(self, state: RegistryState) -> ModelVersion | None:
        try:
            return state.resolve(self.name, None)
        except ValueError:
            return None

    @staticmethod
    def _resolve(state: RegistryState, name: str, selector: str | None) -> ModelVersion:
        try:
            return state.resolve(name, selector)
        except ValueError as exc:
            raise JobError("invalid_job", str(exc)) from None


def _shadowed(job_id: str, fraction: float) -> bool:
    # Its own hash space: the shadow slice is independent of the challenger's slice.
    return fraction > 0 and bucket_of("shadow/" + job_id) < fraction


def _not_ours(model: str, served: str, *, registered: bool = False) -> JobError:
    """A model some fleet could serve is ``model_not_served`` (redrivable); a name no
    handler takes is ``unknown_model`` (a typo: fix the job). Decided from the name
    alone: a user model's path is not looked at, so a job learns nothing of our disk."""
    from spotbatch.models import USER_PREFIXES, available

    prefix, sep, path = model.partition(":")
    if registered or model in available() or (sep and prefix in USER_PREFIXES and path):
        return JobError("model_not_served", f"model {model!r}: this worker serves {served!r}; run a fleet for it "
                        "(its own group; --skip-model here) and redrive: spotbatch dlq redrive --code model_not_served")
    choices = ", ".join(available() + [f"{p}:PATH" for p in USER_PREFIXES])
    return JobError("unknown_model", f"model {model!r} names no model handler (choose one of: {choices}); "
                    f"this worker serves {served!r}")
