"""`spotbatch rollout` argument errors: one line naming the fix, non-zero, before any broker is asked."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spotbatch.cli import app
from spotbatch.cli.rollout import parse_steps

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/conftest.py

# Nothing listens here: a test that reached the broker would fail on it, not pass by luck.
NO_BROKER = ["--bootstrap", "127.0.0.1:1"]


def test_steps_are_percentages_that_become_fractions():
    assert parse_steps("10,50,100") == (0.1, 0.5, 1.0)
    assert parse_steps("100") == (1.0,)


@pytest.mark.parametrize("args, words", [
    (["--steps", "50,10,100"], "steps must ascend"),
    (["--steps", "10,50"], "the last step must be 100"),
    (["--steps", "0,100"], "each step must be in (0, 100]"),
    (["--steps", "10,150"], "each step must be in (0, 100]"),
    (["--steps", "ten,100"], "e.g. --steps 10,50,100"),
    (["--shadow", "1.5"], "bad --shadow 1.5"),
    (["--min-agreement", "2"], "bad --min-agreement 2"),
    (["--max-error-rate-increase", "-0.1"], "bad --max-error-rate-increase"),
    (["--max-latency-ratio", "0"], "bad --max-latency-ratio"),
    (["--bake-jobs", "0"], "bad --bake-jobs 0"),
    (["--bake", "soon"], "bad --bake"),
])
def test_bad_start_arguments_exit_2_with_one_line(args, words):
    result = CliRunner().invoke(app, ["rollout", "start", "embedder", "--to", "2", *args, *NO_BROKER])
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_an_unreachable_broker_is_one_line_with_the_fix():
    result = CliRunner().invoke(app, ["rollout", "status", "embedder", *NO_BROKER])
    assert result.exit_code == 1, result.output
    assert "--bootstrap HOST:PORT" in result.output and len(result.output.strip().splitlines()) == 1


def test_repair_needs_a_version():
    result = CliRunner().invoke(app, ["rollout", "repair", "embedder", *NO_BROKER])
    assert result.exit_code == 2 and "--version" in result.output
