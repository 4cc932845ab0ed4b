"""Intake: a parsed job -> a PendingJob for the real ``tiny`` handler, or a JobError."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

from spotbatch.checkpointing import CheckpointInterval
from spotbatch.checkpointing.local import LocalCheckpointStore
from spotbatch.errors import JobError
from spotbatch.input_access import InputPolicy
from spotbatch.jobs import parse_job
from spotbatch.models.tiny import TinyHandler
from spotbatch.models.runner import BatchRunner
from spotbatch.workers.intake import Intake
from spotbatch.workers.versions import LoadedModel, Versions
from spotbatch.workers.parts import PartFeed, PartPlanner
from spotbatch.workers.sinks import ParquetSink

Record = namedtuple("Record", "topic partition offset key value headers")


@pytest.fixture
def root(tmp_path):
    return str(tmp_path / "out")


@pytest.fixture
def intake(root, tmp_path):
    sink = ParquetSink(root)
    planner = PartPlanner(LocalCheckpointStore(tmp_path / "ckpt"), sink, CheckpointInterval("2rows"),
                          owner="test", max_attempts=3, rows_per_s=lambda: None)
    handler = TinyHandler()
    model = LoadedModel(handler, BatchRunner(handler, device="cpu").run)
    return Intake(Versions.single("tiny", model), sink, planner, inputs=InputPolicy([str(tmp_path)]))


def _read_all(feed: PartFeed) -> list:
    """Every part of a URI job, read as the worker reads them: one at a time, in order."""
    parts = []
    while feed.parts_left:
        parts.append(feed.read_next())
    return parts


def _rows_of(intake, job, record) -> tuple[list, list]:
    parts = _read_all(intake.build(job, record, epoch=1))
    return [i for p in parts for i in p.ids], [v for p in parts for v in p.values]


def _job(**over):
    data = {"job_id": "job-1", "model": "tiny",
            "inputs": {"rows": [{"id": "r1", "text": "hello"}, {"id": "r2", "text": "world"}]}}
    data.update(over)
    raw = json.dumps(data).encode()
    return parse_job(raw), Record("jobs", 2, 41, b"job-1", raw, [])


def _error(intake, job, record) -> JobError:
    with pytest.raises(JobError) as info:
        intake.build(job, record, epoch=0)
    return info.value


def test_inline_job_builds(intake, root):
    job, record = _job(params={})
    (pending,) = intake.build(job, record, epoch=3)
    assert pending.ids == ["r1", "r2"]
    assert pending.values == ["hello", "world"]
    assert pending.output_uri == f"{root}/job-1.parquet"
    assert pending.params == {}
    assert pending.epoch == 3
    assert pending.record is record and pending.job is job
    assert (pending.tp.topic, pending.tp.partition) == ("jobs", 2)
    assert not Intake.needs_io(job)


def test_output_under_the_prefix_is_accepted(intake, root):
    job, record = _job(output=f"{root}/team-a")
    assert intake.build(job, record, epoch=0)[0].output_uri == f"{root}/team-a/job-1.parquet"


def test_a_model_another_fleet_could_serve_is_not_served_here(intake):
    for model in ("minilm", "torchscript:/models/m.pt"):
        job, record = _job(model=model)
        err = _error(intake, job, record)
        assert err.code == "model_not_served", model
        assert repr(model) in err.reason and "'tiny'" in err.reason and "dlq redrive" in err.reason


def test_a_name_no_handler_takes_is_unknown(intake):
    for model in ("bert", "torchscript:", "onnx:/m.onnx"):
        job, record = _job(model=model)
        err = _error(intake, job, record)
        assert err.code == "unknown_model", model
        assert "minilm" in err.reason and "'tiny'" in err.reason


@pytest.mark.parametrize("output", ["/elsewhere", "{root}-sibling", "{root}/../escape", "s3://bucket/out"])
def test_output_outside_prefix(intake, root, output):
    job, record = _job(output=output.format(root=root))
    err = _error(intake, job, record)
    assert err.code == "output_outside_prefix"


def test_unknown_param_is_invalid_job(intake):
    job, record = _job(params={"normalize": True})
    err = _error(intake, job, record)
    assert err.code == "invalid_job"
    assert err.reason.startswith("params:") and "'normalize'" in err.reason


def test_missing_input_column_in_inline_rows(intake):
    job, record = _job(inputs={"rows": [{"id": "r1", "text": "ok"}, {"id": "r2", "body": "wrong key"}]})
    err = _error(intake, job, record)
    assert err.code == "invalid_job"
    assert err.reason.startswith("inputs.rows.1:")
    assert "'text'" in err.reason


@pytest.mark.parametrize("value", ["", 123, None, ["a"], "x" * 10_001])
def test_rejected_row_names_the_row_id(intake, value):
    job, record = _job(inputs={"rows": [{"id": "fine", "text": "ok"}, {"id": "row-77", "text": value}]})
    err = _error(intake, job, record)
    assert err.code == "row_rejected"
    assert "'row-77'" in err.reason
    assert "'fine'" not in err.reason


def test_jsonl_uri_job_reads_ids_and_values(intake, root, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "text": "first", "other": 0},
        {"id": "b", "text": "second"},
        {"id": 3, "text": "third"},
    ]) + "\n")
    job, record = _job(inputs={"uri": str(path)})
    assert Intake.needs_io(job)
    first, second = _read_all(intake.build(job, record, epoch=1))  # parts of 2 rows
    assert (first.ids, first.values, first.part) == (["1", "b"], ["first", "second"], 0)
    assert (second.ids, second.values, second.part) == (["3"], ["third"], 1)
    assert first.output_uri == f"{root}/job-1/part-00000.parquet"
    assert first.epoch == second.epoch == 1


def test_jsonl_uri_job_with_named_columns(intake, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"key": "k1", "body": "hi", "text": "not this"}) + "\n")
    job, record = _job(inputs={"uri": f"file://{path}", "id_column": "key", "input_column": "body"})
    assert _rows_of(intake, job, record) == (["k1"], ["hi"])


def test_uri_job_rows_are_checked_too(intake, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "ok", "text": "a"}) + "\n" + json.dumps({"id": "bad", "text": 5}) + "\n")
    job, record = _job(inputs={"uri": str(path)})
    with pytest.raises(JobError) as info:
        _rows_of(intake, job, record)  # checked part by part, as each is read
    assert info.value.code == "row_rejected" and "'bad'" in info.value.reason


def test_missing_input_file(intake, tmp_path):
    job, record = _job(inputs={"uri": str(tmp_path / "nope.jsonl")})
    assert _error(intake, job, record).code == "input_missing"


def test_empty_input_file(intake, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    job, record = _job(inputs={"uri": str(path)})
    err = _error(intake, job, record)
    assert err.code == "input_invalid"
    assert "no rows" in err.reason


def test_check_runs_before_any_io(intake, tmp_path):
    # A wrong model is reported without touching the (missing) input file.
    job, record = _job(model="other", inputs={"uri": str(tmp_path / "nope.jsonl")})
    assert _error(intake, job, record).code == "unknown_model"
