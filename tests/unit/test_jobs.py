"""parse_job: valid v1 jobs parse; every bad message raises a JobError naming the field."""

from __future__ import annotations

import json

import pytest

from spotbatch.errors import JobError
from spotbatch.jobs import MAX_JOB_BYTES, InlineInputs, Job, UriInputs, job_key, parse_job


def _inline(**over):
    job = {"version": 1, "job_id": "docs-000001", "model": "tiny",
           "inputs": {"rows": [{"id": "a1", "text": "hello"}, {"id": "a2", "text": "world"}]}}
    job.update(over)
    return job


def _raw(data) -> bytes:
    return json.dumps(data).encode()


def _error(raw) -> JobError:
    with pytest.raises(JobError) as info:
        parse_job(raw)
    return info.value


# -- valid jobs -------------------------------------------------------------------------


def test_inline_job_parses():
    job = parse_job(_raw(_inline(output="s3://bucket/runs/7/", params={"normalize": True, "k": 3})))
    assert isinstance(job, Job)
    assert job.version == 1
    assert job.job_id == "docs-000001"
    assert job.model == "tiny"
    assert isinstance(job.inputs, InlineInputs)
    assert [r["id"] for r in job.inputs.rows] == ["a1", "a2"]
    # The model's input column travels as an extra key of each row.
    assert [r["text"] for r in job.inputs.rows] == ["hello", "world"]
    assert job.output == "s3://bucket/runs/7/"
    assert job.params == {"normalize": True, "k": 3}


def test_version_defaults_to_1_and_optional_fields_default():
    data = _inline()
    del data["version"]
    job = parse_job(_raw(data))
    assert job.version == 1
    assert job.output is None
    assert job.params == {}


def test_uri_job_parses():
    job = parse_job(_raw(_inline(inputs={"uri": "s3://b/in/part-0.parquet", "id_column": "key",
                                         "input_column": "body"})))
    assert isinstance(job.inputs, UriInputs)
    assert job.inputs.uri == "s3://b/in/part-0.parquet"
    assert job.inputs.id_column == "key"
    assert job.inputs.input_column == "body"


def test_uri_job_column_defaults():
    job = parse_job(_raw(_inline(inputs={"uri": "/data/rows.jsonl"})))
    assert isinstance(job.inputs, UriInputs)
    assert job.inputs.id_column == "id"
    assert job.inputs.input_column is None


def test_job_id_of_128_chars_is_allowed():
    assert parse_job(_raw(_inline(job_id="a" * 128))).job_id == "a" * 128


@pytest.mark.parametrize("data", [
    _inline(params={"a": 1, "b": 2.5, "c": "s", "d": False}, output="/out/x"),
    _inline(inputs={"uri": "file:///data/in.parquet", "input_column": "text"}),
])
def test_round_trip_to_bytes(data):
    job = parse_job(_raw(data))
    again = parse_job(job.to_bytes())
    assert again == job
    assert again.to_bytes() == job.to_bytes()


def test_to_bytes_omits_none_fields():
    job = parse_job(_raw(_inline()))
    assert "output" not in json.loads(job.to_bytes())


def test_job_key_is_the_job_id():
    assert job_key("docs-000001") == b"docs-000001"


# -- errors ---------------------------------------------------------------------------


def test_malformed_json():
    err = _error(b'{"job_id": "a", ')
    assert err.code == "malformed_json"
    assert "JSON" in err.reason


def test_invalid_utf8_is_malformed_json():
    assert _error(b"\xff\xfe{}").code == "malformed_json"


@pytest.mark.parametrize("raw,kind", [(b"[1, 2]", "list"), (b'"job"', "str"), (b"42", "int"), (b"null", "NoneType")])
def test_non_object_json(raw, kind):
    err = _error(raw)
    assert err.code == "malformed_json"
    assert "object" in err.reason and kind in err.reason


def test_tombstone():
    err = _error(None)
    assert err.code == "malformed_json"
    assert "tombstone" in err.reason


def test_oversized_message():
    raw = b" " * (MAX_JOB_BYTES + 1)
    err = _error(raw)
    assert err.code == "message_too_large"
    assert str(MAX_JOB_BYTES + 1) in err.reason and str(MAX_JOB_BYTES) in err.reason


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_version(version):
    err = _error(_raw(_inline(version=version)))
    assert err.code == "unknown_version"
    assert repr(version) in err.reason


@pytest.mark.parametrize("job_id", ["a/b", "..", "../etc", "has space", "a" * 129, "", ".hidden", "-x", "a\\b"])
def test_bad_job_id(job_id):
    err = _error(_raw(_inline(job_id=job_id)))
    assert err.code == "invalid_job"
    assert err.reason.startswith("job_id:")


def test_empty_rows():
    err = _error(_raw(_inline(inputs={"rows": []})))
    assert err.code == "invalid_job"
    assert err.reason.startswith("inputs.rows:")


def test_row_missing_id_names_the_row():
    err = _error(_raw(_inline(inputs={"rows": [{"id": "a", "text": "x"}, {"text": "y"}]})))
    assert err.code == "invalid_job"
    assert err.reason.startswith("inputs.rows.1.id:")


def test_unknown_top_level_key():
    err = _error(_raw(_inline(priority=5)))
    assert err.code == "invalid_job"
    assert err.reason.startswith("priority:")


@pytest.mark.parametrize("inputs", [
    {"rows": [{"id": "a", "text": "x"}], "bogus": 1},
    {"uri": "s3://b/x.parquet", "bogus": 1},
])
def test_unknown_key_in_inputs(inputs):
    err = _error(_raw(_inline(inputs=inputs)))
    assert err.code == "invalid_job"
    assert err.reason.startswith("inputs.bogus:")


def test_inputs_without_rows_or_uri():
    err = _error(_raw(_inline(inputs={})))
    assert err.code == "invalid_job"
    assert err.reason.startswith("inputs.rows:")


@pytest.mark.parametrize("params,where", [
    ("fast", "params:"),
    ([1, 2], "params:"),
    ({"k": [1]}, "params.k"),
    ({"k": None}, "params.k"),
    ({"k": {"nested": 1}}, "params.k"),
])
def test_bad_params_type(params, where):
    err = _error(_raw(_inline(params=params)))
    assert err.code == "invalid_job"
    assert err.reason.startswith(where)


@pytest.mark.parametrize("field", ["job_id", "model", "inputs"])
def test_missing_required_field(field):
    data = _inline()
    del data[field]
    err = _error(_raw(data))
    assert err.code == "invalid_job"
    assert err.reason.startswith(f"{field}:")


def test_error_str_carries_code_and_reason():
    err = _error(_raw(_inline(job_id="a/b")))
    assert str(err) == f"invalid_job: {err.reason}"


@pytest.mark.parametrize(("raw", "code", "says"), [
    (b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "invalid_job", "nested"),  # json: RecursionError
    (b'{"job_id": "x", "params": {"n": ' + b"7" * 5000 + b"}}", "invalid_job", "digits"),  # json: ValueError
    (b'{"job_id": "' + b"x" * (2 * 1024 * 1024) + b'"}', "invalid_job", "string"),
    (b'{"job_id": "x", "inputs": ' + b"[" * 40, "invalid_job", "nested"),  # unterminated, still bounded
    (b'{"a": 1e999999, "b": "\xff"}', "malformed_json", "JSON"),
])
def test_hostile_shapes_are_job_errors_not_crashes(raw, code, says):
    err = _error(raw)
    assert err.code == code and says in err.reason


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = "[" * 100 + '\\"{' * 50
    job = parse_job(json.dumps({"job_id": "x", "model": "m", "inputs": {"rows": [{"id": "1", "text": text}]}}).encode())
    assert job.inputs.rows[0]["text"] == text


def test_a_legitimate_100k_row_job_fits_every_bound():
    rows = [{"id": f"doc-{i:06d}", "text": f"sentence {i}"} for i in range(100_000)]
    raw = json.dumps({"job_id": "big", "model": "tiny", "inputs": {"rows": rows}}).encode()
    assert len(raw) < MAX_JOB_BYTES
    assert len(parse_job(raw).inputs.rows) == 100_000


@pytest.mark.parametrize("field", ["output", "uri"])
def test_control_characters_in_locations_are_invalid(field):
    body = {"job_id": "x", "model": "m", "inputs": {"rows": [{"id": "1", "text": "t"}]}}
    if field == "output":
        body["output"] = "run\x00/"
    else:
        body["inputs"] = {"uri": "/in/a\x00.jsonl"}
    assert _error(json.dumps(body).encode()).code == "invalid_job"
