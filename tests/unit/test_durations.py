"""The one duration parser (spotbatch.durations) and the three places that read durations."""

from __future__ import annotations

import pytest

from spotbatch.checkpointing.interval import CheckpointInterval
from spotbatch.durations import DurationError, parse_duration_s
from spotbatch.scheduler.ledger import LedgerError, parse_when


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30M", 1800), (" 2h ", 7200), ("1.5d", 129_600),
                                           ("45", 45), ("250ms", 0.25), ("0", 0)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text, words", [("soon", "is not like 90s"), ("m", "is not like 90s"),
                                         ("-5m", "must be a finite number >= 0"), ("infh", "finite"), ("1w", "is not like")])
def test_bad_durations_name_a_form_that_works(text, words):
    with pytest.raises(DurationError, match=words) as info:
        parse_duration_s(text)
    assert repr(text) in str(info.value) and isinstance(info.value, ValueError)


def test_units_and_bare_numbers_are_the_callers_choice():
    assert parse_duration_s("2w", units=("d", "w"), bare=False) == 2 * 604_800
    for text in ("30", "30m"):
        with pytest.raises(DurationError):
            parse_duration_s(text, units=("s",), bare=False)


def test_the_three_readers_share_it():
    assert parse_when("-2w", now=2e6) == 2e6 - 2 * 604_800  # the cost report's --since
    assert parse_when("-90m", now=1e4) == 1e4 - 5400
    with pytest.raises(LedgerError, match="ISO 8601 or relative"):
        parse_when("-90ms", now=1e4)  # the report takes no milliseconds
    assert CheckpointInterval("1.5s").rows(10.0) == 15  # the checkpoint interval's seconds form
