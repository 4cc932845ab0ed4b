"""Workers serving versions: routing, pins, refusals, shadow runs, Parquet metadata and
statuses, on the in-memory broker with a registry state the test controls."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from spotbatch.config import load_settings
from spotbatch.errors import JobError
from spotbatch.jobs import parse_job
from spotbatch.models.runner import BatchRunner
from spotbatch.models.tiny import TinyHandler
from spotbatch.rollouts.records import ModelVersion, RegistryState, Rollout, ShadowRecord, shadow_topic
from spotbatch.rollouts.watch import RegistryWatch
from spotbatch.testing.broker import MemoryBroker
from spotbatch.workers import Worker
from spotbatch.workers.shadow import row_agreement
from spotbatch.workers.sinks import ParquetSink
from spotbatch.workers.streams import dlq_topic, results_topic
from spotbatch.workers.versions import LoadedModel, Versions

pytestmark = pytest.mark.usefixtures("clean_env")

TOPIC = "jobs"


class Registry:
    """A registry the test edits; the watch re-reads it on refresh()."""

    def __init__(self) -> None:
        self.state = RegistryState()

    def version(self, n: int, *, ref: str = "tiny", digest: str | None = None) -> None:
        entry = ModelVersion(name="embedder", version=n, ref=ref, digest=digest or f"sha256:{n}")
        self.state.versions.setdefault("embedder", {})[n] = entry
        self.state.aliases.setdefault("embedder", {}).setdefault("champion", n)

    def rollout(self, to: int, fraction: float, *, shadow: float = 0.0, state: str = "running") -> None:
        champion = self.state.aliases["embedder"]["champion"]
        self.state.rollouts["embedder"] = Rollout("embedder", champion, to, (fraction, 1.0), state=state, shadow=shadow)

    def read(self) -> RegistryState:
        return RegistryState(dict(self.state.versions), {k: dict(v) for k, v in self.state.aliases.items()},
                             dict(self.state.rollouts))


class ScaledTiny(TinyHandler):
    """tiny with its outputs scaled: a version that disagrees by a known amount."""

    def __init__(self, flip: float) -> None:
        super().__init__()
        self.flip = flip

    def predict(self, values, params):
        out = super().predict(values, params)
        emb = out["embedding"].copy()
        emb[:, 0] *= self.flip  # flips the sign of one component: cosine drops
        return {"embedding": emb}


def _loader(refused: set[int] = frozenset(), flips: dict[int, float] | None = None):
    loads = Counter()

    def load(version: ModelVersion) -> LoadedModel:
        loads[version.version] += 1
        if version.version in refused:
            raise ValueError(f"digest mismatch: {version.ref} hashes to sha256:other, registered as {version.digest}")
        handler = ScaledTiny((flips or {}).get(version.version, 1.0))
        return LoadedModel(handler, BatchRunner(handler, device="cpu").run)

    return load, loads


def _versions(registry: Registry, **loader) -> tuple[Versions, Counter]:
    watch = RegistryWatch(registry.read, every_s=3600).start()
    load, loads = _loader(**loader)
    versions = Versions("embedder", load=load, watch=watch)
    versions.refresh()
    return versions, loads


def _refresh(versions: Versions) -> None:
    versions._watch._refresh(raise_errors=True)  # noqa: SLF001 - what the watch thread does every every_s
    versions.refresh()


def _job(i: int, model: str = "embedder", rows: int = 3) -> bytes:
    return json.dumps({"job_id": f"job-{i}", "model": model,
                       "inputs": {"rows": [{"id": f"{i}-{r}", "text": f"text {i} {r}"} for r in range(rows)]}}).encode()


# -- routing ------------------------------------------------------------------------


def test_jobs_follow_the_rollout_by_a_stable_slice_and_pins_hold():
    registry = Registry()
    registry.version(1)
    registry.version(2)
    versions, loads = _versions(registry)
    assert versions.route(parse_job(_job(1))).version.version == 1
    registry.rollout(to=2, fraction=0.3)
    _refresh(versions)
    assert loads == {1: 1, 2: 1}  # the challenger loads once the rollout names it
    routes = [versions.route(parse_job(_job(i))) for i in range(2000)]
    share = sum(r.route == "challenger" for r in routes) / len(routes)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 2000) ** 0.5  # binomial error
    assert [versions.route(parse_job(_job(i))).route for i in range(50)] == [r.route for r in routes[:50]]
    assert versions.route(parse_job(_job(7, model="embedder@1"))).version.version == 1
    assert versions.route(parse_job(_job(7, model="embedder@champion"))).route == "pinned"
    with pytest.raises(JobError, match="no version 9") as err:
        versions.route(parse_job(_job(7, model="embedder@9")))
    assert err.value.code == "invalid_job"
    with pytest.raises(JobError) as other:
        versions.route(parse_job(_job(7, model="tiny")))
    assert other.value.code == "model_not_served"


def test_a_refused_version_dead_letters_its_jobs_and_the_champion_goes_on():
    registry = Registry()
    registry.version(1)
    registry.version(2)
    registry.rollout(to=2, fraction=1.0)
    versions, _ = _versions(registry, refused={2})
    with pytest.raises(JobError, match="embedder@2: digest mismatch") as err:
        versions.route(parse_job(_job(1)))
    assert err.value.code == "model_version_refused"
    assert versions.route(parse_job(_job(1, model="embedder@1"))).version.version == 1


def test_a_finished_rollout_sends_every_job_to_the_champion():
    registry = Registry()
    registry.version(1)
    registry.version(2)
    registry.rollout(to=2, fraction=1.0, state="rolled_back")
    versions, _ = _versions(registry)
    assert {versions.route(parse_job(_job(i))).version.version for i in range(40)} == {1}


def test_row_agreement_is_cosine_for_embeddings_and_relative_for_scalars():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(row_agreement({"e": a}, {"e": b}), [1.0, -1.0, 1.0])
    np.testing.assert_allclose(row_agreement({"s": np.array([1.0, 4.0])}, {"s": np.array([1.0, 2.0])}), [1.0, 0.5])
    assert row_agreement({"e": a}, {"e": np.full_like(b, np.nan)}).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no float output column"):
        row_agreement({"label": np.array([1, 2])}, {"label": np.array([1, 2])})


# -- the worker loop ----------------------------------------------------------------


@pytest.fixture
def broker():
    b = MemoryBroker()
    b.create_topic(TOPIC, partitions=2)
    return b


def _worker(tmp_path, broker, versions, group: str = "g") -> Worker:
    settings = load_settings(topic=TOPIC, group=group, model="embedder", device="cpu", output=str(tmp_path / "out"),
                             max_wait_ms=5, metrics_port=0)
    return Worker(settings, versions.handler, None, ParquetSink(settings.output), burst=True, broker=broker,
                  versions=versions)


def _statuses(broker) -> dict[str, dict]:
    return {s["job_id"]: s for s in (json.loads(r.value) for r in broker.records(results_topic(TOPIC)))}


def test_outputs_and_statuses_name_the_version_that_wrote_them(tmp_path, broker):
    registry = Registry()
    registry.version(1)
    registry.version(2)
    registry.rollout(to=2, fraction=0.5)
    versions, _ = _versions(registry)
    for i in range(30):
        broker.publish(TOPIC, _job(i), key=f"job-{i}".encode(), partition=i % 2)
    broker.publish(TOPIC, _job(99, model="embedder@1"), partition=0)
    stats = _worker(tmp_path, broker, versions).run()
    assert stats.jobs_ok == 31
    statuses = _statuses(broker)
    for job_id, status in statuses.items():
        meta = pq.read_schema(next((tmp_path / "out").rglob(f"{job_id}.parquet"))).metadata
        assert meta[b"spotbatch.model"] == b"embedder"
        assert int(meta[b"spotbatch.model_version"]) == status["model_version"]
        assert meta[b"spotbatch.model_digest"].decode() == status["model_digest"] == f"sha256:{status['model_version']}"
        expected = versions.route(parse_job(_job(int(job_id[4:]))))
        if job_id != "job-99":
            assert (status["route"], status["model_version"]) == (expected.route, expected.version.version)
    assert statuses["job-99"]["route"] == "pinned" and statuses["job-99"]["model_version"] == 1
    assert {s["model_version"] for s in statuses.values()} == {1, 2}


def test_a_redelivered_job_is_redone_when_another_version_wrote_its_output(tmp_path, broker):
    registry = Registry()
    registry.version(1)
    registry.version(2)
    versions, _ = _versions(registry)
    broker.publish(TOPIC, _job(1), key=b"job-1", partition=0)
    _worker(tmp_path, broker, versions).run()
    path = next((tmp_path / "out").rglob("job-1.parquet"))
    assert pq.read_schema(path).metadata[b"spotbatch.model_version"] == b"1"
    registry.state.aliases["embedder"]["champion"] = 2  # promoted
    _refresh(versions)
    # Delivered again (a new group reads it from the start; the attempt ledger says it
    # was taken up, so its output is looked for): version 1 wrote it, 2 serves it now.
    _worker(tmp_path, broker, versions, group="g2").run()
    assert pq.read_schema(path).metadata[b"spotbatch.model_version"] == b"2"
    _worker(tmp_path, broker, versions, group="g3").run()  # and again: now its own version's, kept
    statuses = [json.loads(r.value) for r in broker.records(results_topic(TOPIC))]
    assert [(s["job_id"], s.get("already_done", False)) for s in statuses] == [
        ("job-1", False), ("job-1", False), ("job-1", True)]


def test_shadowed_jobs_report_agreement_and_write_only_the_champion(tmp_path, broker):
    registry = Registry()
    registry.version(1)
    registry.version(2)
    registry.rollout(to=2, fraction=0.0001, shadow=1.0)  # no challenger jobs: every champion job shadowed
    versions, _ = _versions(registry, flips={2: -1.0})
    for i in range(12):
        broker.publish(TOPIC, _job(i, rows=5), key=f"job-{i}".encode(), partition=i % 2)
    stats = _worker(tmp_path, broker, versions).run()
    assert stats.jobs_ok == 12
    champion_jobs = {j for j, s in _statuses(broker).items() if s["route"] == "champion"}
    shadows = [ShadowRecord.from_json(r.value) for r in broker.records(shadow_topic(TOPIC))]
    assert {s.job_id for s in shadows} == champion_jobs and len(champion_jobs) >= 11
    for record in shadows:
        assert (record.champion, record.challenger, record.rows) == (1, 2, 5)
        assert record.min <= record.low <= record.mean < 0.999  # one component flipped: cosine below 1
    for job_id in champion_jobs:  # only the champion's output was written
        meta = pq.read_schema(next((tmp_path / "out").rglob(f"{job_id}.parquet"))).metadata
        assert meta[b"spotbatch.model_version"] == b"1"
    assert broker.records(dlq_topic(TOPIC)) == []
