"""spotbatch.logevents: one JSON event per line, read back from a mixed log."""

from __future__ import annotations

import json

from spotbatch.logevents import event_line, parse_events


def test_round_trip_keeps_every_field_and_the_given_ts():
    line = event_line("scale_out", ts=12.5, **{"from": 1, "to": 3}, pids=[7, 8], reason=None)
    assert "\n" not in line
    assert parse_events(line) == [{"event": "scale_out", "ts": 12.5, "from": 1, "to": 3, "pids": [7, 8],
                                   "reason": None}]


def test_ts_defaults_to_now(monkeypatch):
    monkeypatch.setattr("spotbatch.logevents.time.time", lambda: 1700000000.12345)
    assert parse_events(event_line("x"))[0]["ts"] == 1700000000.123


def test_values_with_spaces_quotes_and_newlines_survive_on_one_line():
    nasty = 'a "quoted" reason\nwith a newline, = signs=1 and {braces} \\ too'
    line = event_line("exited", reason=nasty, path="/tmp/a b")
    assert len(line.splitlines()) == 1
    assert parse_events(line)[0]["reason"] == nasty


def test_non_json_lines_are_skipped_and_logging_prefixes_are_not_in_the_way():
    text = "\n".join([
        "2024-05-01 12:00:00,001 INFO spotbatch.scaler.local scale-local: topic=t group=g",
        "2024-05-01 12:00:00,002 INFO spotbatch.scaler.local " + event_line("scale_out", ts=1.0, lag=5),
        "Traceback (most recent call last): {not json",
        json.dumps({"no_event_key": 1}),  # a JSON object that is no event
        json.dumps([1, 2]),
        event_line("scale_to_zero", ts=2.0)[:-3],  # a write cut short
        "",
        event_line("scale_to_zero", ts=3.0),
    ])
    assert [(e["event"], e["ts"]) for e in parse_events(text)] == [("scale_out", 1.0), ("scale_to_zero", 3.0)]


def test_a_value_json_cannot_encode_is_logged_as_text():
    from pathlib import Path

    assert parse_events(event_line("x", where=Path("/a")))[0]["where"] == "/a"
