"""The in-flight ledger: explicit states, refused moves, what a SIGKILL would lose."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from spotbatch.workers.inflight import InFlight, State
from tests.unit.test_batcher import make_job


def _inferred(unit, rows: int) -> None:
    unit.add_part(0, {"y": np.zeros(rows, dtype=np.float32)})


def test_a_unit_moves_through_its_states_and_leaves_once_written():
    ledger, unit = InFlight(), make_job("a", 4)
    ledger.enter(unit)
    for state in (State.QUEUED, State.INFERRING, State.INFERRING):
        ledger.move(unit, state)
        assert ledger.state_of(unit) is state
    write = Future()
    ledger.writing(unit, write)
    assert ledger.writes_pending and ledger.written() == []
    write.set_result(True)
    assert ledger.written() == [(unit, write)]
    assert unit not in ledger and not ledger.writes_pending and len(ledger) == 0


@pytest.mark.parametrize("start, to", [(State.ADMITTED, State.WRITING), (State.QUEUED, State.QUEUED),
                                       (State.QUEUED, State.WRITING), (State.PARKED, State.INFERRING)])
def test_a_move_the_table_does_not_allow_raises(start, to):
    ledger, unit = InFlight(), make_job("b", 2)
    ledger.enter(unit)
    path = {State.ADMITTED: [], State.QUEUED: [State.QUEUED], State.PARKED: [State.QUEUED, State.PARKED]}[start]
    for state in path:
        ledger.move(unit, state)
    with pytest.raises(RuntimeError, match=f"from {start.value} to {to.value}"):
        ledger.move(unit, to)


def test_a_unit_cannot_enter_twice_or_mid_way():
    ledger, unit = InFlight(), make_job("c", 1)
    ledger.enter(unit, State.QUEUED)
    with pytest.raises(RuntimeError, match="twice"):
        ledger.enter(unit)
    with pytest.raises(RuntimeError, match="enters admitted or queued"):
        ledger.enter(make_job("d", 1), State.WRITING)


def test_rows_at_risk_count_inferred_rows_of_every_state_until_they_leave():
    ledger = InFlight()
    done, parked, queued = make_job("e", 5), make_job("f", 3), make_job("g", 7)
    for unit in (done, parked, queued):
        ledger.enter(unit, State.QUEUED)
    _inferred(done, 5)
    _inferred(parked, 2)
    ledger.park(lambda unit: unit is parked)
    assert ledger.state_of(parked) is State.PARKED and ledger.state_of(queued) is State.QUEUED
    assert ledger.rows_at_risk == 7
    ledger.move(done, State.INFERRING)
    ledger.writing(done, Future())
    assert ledger.rows_at_risk == 7  # a write on its way is not durable yet
    ledger.leave_all([done, parked])
    assert ledger.rows_at_risk == 0 and list(ledger) == [queued]
