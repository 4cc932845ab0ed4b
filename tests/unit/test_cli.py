"""The CLI's error paths: exit codes and one-line errors, no broker needed."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

import spotbatch.cli.publish as cli  # publish's KafkaProducer is patched
from spotbatch.cli import app


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py


@pytest.fixture
def runner():
    return CliRunner()


class FakeFuture:
    def get(self, timeout=None):
        return None


class FakeProducer:
    """Stands in for KafkaProducer so publish's file handling runs without a broker."""

    instances: list["FakeProducer"] = []

    def __init__(self, **config) -> None:
        self.config = config
        self.sent: list[tuple] = []
        self.closed = False
        FakeProducer.instances.append(self)

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        return FakeFuture()

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        self.closed = True


@pytest.fixture
def fake_producer(monkeypatch):
    FakeProducer.instances = []
    monkeypatch.setattr(cli, "KafkaProducer", FakeProducer)
    return FakeProducer


def _flat(text: str) -> str:
    return " ".join(text.split())


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("verb", [["worker"], ["publish", "rows.jsonl"]])
def test_bad_config_path_exits_2_with_a_one_line_error(runner, tmp_path, verb):
    # A long path, as real ones often are: the error must stay on one line (logs, grep).
    missing = tmp_path / ("deeply-nested-config-folder-" * 4) / "missing.yaml"
    result = runner.invoke(app, [*verb, "--config", str(missing)])
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    assert str(missing) in lines[0]
    assert "--config" in lines[0]


def test_publish_missing_file_exits_nonzero_naming_it(runner, tmp_path, fake_producer):
    missing = tmp_path / "missing.jsonl"
    result = runner.invoke(app, ["publish", str(missing), "--model", "tiny", "--bootstrap", "fake:9092"])
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a traceback
    assert "error:" in result.stderr
    assert str(missing) in _flat(result.stderr)
    assert all(p.sent == [] for p in fake_producer.instances)  # nothing published
    assert all(p.closed for p in fake_producer.instances)


def test_publish_raw_missing_file_exits_nonzero(runner, tmp_path, fake_producer):
    missing = tmp_path / "jobs.jsonl"
    result = runner.invoke(app, ["publish", str(missing), "--raw", "--bootstrap", "fake:9092"])
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit)
    assert "error:" in result.stderr
    assert "jobs.jsonl" in _flat(result.stderr)


def test_publish_sends_jobs_with_the_fake_producer(runner, tmp_path, fake_producer):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(5)))
    result = runner.invoke(app, ["publish", str(path), "--model", "tiny", "--rows-per-job", "2", "--topic", "tt",
                                 "--bootstrap", "fake:9092", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"topic": "tt", "jobs": 3, "rows": 5, "failed": 0}
    producer = fake_producer.instances[0]
    assert producer.config["bootstrap_servers"] == "fake:9092"
    assert [(t, k) for t, k, _ in producer.sent] == [("tt", b"rows-000000"), ("tt", b"rows-000001"),
                                                     ("tt", b"rows-000002")]


def test_publish_unreachable_bootstrap_fails_fast(runner, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n")
    start = time.monotonic()
    result = runner.invoke(app, ["publish", str(path), "--model", "tiny", "--bootstrap", "127.0.0.1:1"])
    elapsed = time.monotonic() - start
    assert result.exit_code not in (0, None)
    assert isinstance(result.exception, SystemExit)
    assert "127.0.0.1:1" in _flat(result.stderr)
    assert elapsed < 20, f"publish took {elapsed:.1f} s to give up on an unreachable broker"


def test_worker_rejects_zero_batch_rows(runner):
    result = runner.invoke(app, ["worker", "--max-batch-rows", "0"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    msg = _flat(result.stderr)
    assert msg.startswith("error:")
    assert "max_batch_rows" in msg and "--max-batch-rows" in msg


def test_worker_rejects_bad_env_value(runner, monkeypatch):
    monkeypatch.setenv("SPOTBATCH_MAX_WAIT_MS", "-5")
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "SPOTBATCH_MAX_WAIT_MS" in _flat(result.stderr)
