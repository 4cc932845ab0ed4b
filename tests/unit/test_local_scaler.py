"""The local autoscaler: the pure decision, the process pool, and the loop (with fakes)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
from kafka.errors import KafkaConnectionError

from spotbatch.logevents import parse_events
from spotbatch.scaler.backlog import Backlog
from spotbatch.scaler.decide import Observation, ScalePolicy, ScaleState, decide
from spotbatch.scaler.local import LocalAutoscaler
from spotbatch.scaler.procs import WorkerCrashLoop, WorkerPool

POLICY = ScalePolicy(min_replicas=0, max_replicas=4, lag_threshold=10, cooldown_s=3.0)


def obs(at_s, lag=0, *, unconsumed=None, running=0, partitions=4, active=None):
    unconsumed = lag if unconsumed is None else unconsumed
    return Observation(at_s, lag, unconsumed, partitions, running, unconsumed > 0 if active is None else active)


# ---- decide: one rule per row ---------------------------------------------------------


@pytest.mark.parametrize(
    "state, observation, policy, action, target, start, stop",
    [
        # nothing to do at zero: stay at zero
        (ScaleState(0), obs(0.0), POLICY, "hold", 0, 0, 0),
        # KEDA activates 0 -> 1 first; the HPA takes it on from the next poll
        (ScaleState(0), obs(0.0, 40), POLICY, "scale_out", 1, 1, 0),
        # HPA: ceil(40 / 10) = 4
        (ScaleState(1), obs(1.0, 40, running=1), POLICY, "scale_out", 4, 3, 0),
        # clamped at max replicas
        (ScaleState(1), obs(1.0, 40, running=1), ScalePolicy(max_replicas=2, cooldown_s=3), "scale_out", 2, 1, 0),
        # capped at the partition count (KEDA's lag cap, already in the metric lag)
        (ScaleState(1), obs(1.0, 20, unconsumed=90, running=1, partitions=2), POLICY, "scale_out", 2, 1, 0),
        # HPA tolerance: 31 / (10 x 3) is within 10% of 3 replicas: keep 3
        (ScaleState(3), obs(1.0, 31, running=3), POLICY, "hold", 3, 0, 0),
        # min replicas above zero: started with nothing to do
        (ScaleState(0), obs(0.0), ScalePolicy(min_replicas=2, max_replicas=4), "scale_out", 2, 2, 0),
        # a worker died while work is pending: replace it
        (ScaleState(2), obs(5.0, 20, running=1), POLICY, "replace", 2, 1, 0),
        # a worker left on its own with nothing pending: accept the smaller pool
        (ScaleState(2, idle_since_s=4.0), obs(5.0, running=1), POLICY, "hold", 1, 0, 0),
    ],
)
def test_decide_table(state, observation, policy, action, target, start, stop):
    new, decision = decide(state, observation, policy)
    assert (decision.action, decision.target, decision.start, decision.stop) == (action, target, start, stop)
    assert new.target == target


def _run(policy, observations, state=None):
    """Feed observations (running follows the decisions); returns [(at_s, decision)]."""
    state, running, out = state or ScaleState(0), 0, []
    for o in observations:
        o = Observation(o.at_s, o.lag, o.unconsumed, o.partitions, running, o.active)
        state, d = decide(state, o, policy)
        running += d.start - d.stop
        out.append((o.at_s, d))
    return out


def test_scale_in_waits_for_the_stabilisation_window():
    steps = _run(POLICY, [obs(0, 40), obs(1, 40), obs(2, 10), obs(3, 10), obs(4.5, 10)])
    targets = [d.target for _, d in steps]
    # out to 1, then 4; lag 10 wants 1 but 4 was wanted within the last 3 s
    assert targets == [1, 4, 4, 4, 1], steps
    assert steps[-1][1].action == "scale_in" and steps[-1][1].stop == 3


def test_zero_only_after_a_full_cooldown_without_unconsumed_records():
    steps = _run(POLICY, [obs(0, 20), obs(1, 20), obs(2), obs(3.0), obs(4.9), obs(5.0), obs(6.0)])
    targets = [(t, d.target) for t, d in steps]
    # idle from t=2: inside the cooldown the HPA keeps >= 1 (and the window keeps 2 until
    # t=4); zero at t=5, three seconds after the last unconsumed record.
    assert targets == [(0, 1), (1, 2), (2, 2), (3.0, 2), (4.9, 1), (5.0, 0), (6.0, 0)], steps
    assert steps[5][1].action == "scale_to_zero"


def test_a_new_record_inside_the_cooldown_restarts_it():
    steps = _run(POLICY, [obs(0, 5), obs(1), obs(3, 1), obs(4), obs(6.9), obs(7.0)])
    assert [d.target for _, d in steps] == [1, 1, 1, 1, 1, 0]


def test_never_scales_to_zero_while_records_are_unconsumed():
    # lag 0 but records unconsumed (e.g. KEDA inactive under an activation threshold)
    steps = _run(POLICY, [obs(0, 5), *(obs(t, 0, unconsumed=3, active=False) for t in range(1, 30))])
    assert all(d.target >= 1 for _, d in steps)


def test_min_replicas_floor_after_the_cooldown():
    policy = ScalePolicy(min_replicas=1, max_replicas=3, cooldown_s=2.0)
    steps = _run(policy, [obs(0, 30), obs(1, 30), obs(2), obs(10), obs(20)])
    assert [d.target for _, d in steps] == [1, 3, 3, 1, 1]


def test_random_walk_keeps_the_invariants():
    rng = random.Random(4)
    state, running = ScaleState(0), 0
    for i in range(2000):
        unconsumed = rng.choice([0, 0, 0, 1, 7, 35, 400])
        exited = rng.random() < 0.05 and running > 0  # a worker dies now and then
        running -= exited
        o = Observation(i * 0.7, min(unconsumed, 40), unconsumed, 4, running, unconsumed > 0)
        before = state
        state, d = decide(state, o, POLICY)
        running += d.start - d.stop
        assert running == d.target if d.action != "hold" else running == state.target or d.target == state.target
        assert 0 <= d.target <= POLICY.max_replicas
        if unconsumed:
            assert d.target >= 1 and d.action != "scale_to_zero"  # invariant 5
        if d.action == "scale_to_zero":
            assert before.idle_since_s is not None and o.at_s - before.idle_since_s >= POLICY.cooldown_s


@pytest.mark.parametrize("kwargs, words", [
    ({"min_replicas": 3, "max_replicas": 2}, "--min/--max"),
    ({"max_replicas": 0}, "--min/--max"),
    ({"lag_threshold": 0}, "--lag-threshold"),
    ({"cooldown_s": -1}, "--cooldown-s"),
])
def test_bad_policy_says_the_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ScalePolicy(**kwargs)


# ---- the pool, with fake processes and a fake clock ------------------------------------


class FakeProc:
    def __init__(self, pid: int, *, obey_sigterm: bool = True) -> None:
        self.pid, self.returncode, self.signals, self.obey = pid, None, [], obey_sigterm

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append(signal.SIGKILL)
        self.returncode = -9

    def exit(self, rc: int = 0):
        self.returncode = rc


class FakeLauncher:
    def __init__(self, obey_sigterm: bool = True) -> None:
        self.procs: dict[int, FakeProc] = {}
        self.released: list[int] = []
        self.obey = obey_sigterm

    def start(self, index):
        self.procs[index] = FakeProc(1000 + index, obey_sigterm=self.obey)
        return self.procs[index]

    def release(self, index):
        self.released.append(index)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pool_stops_the_newest_and_kills_past_the_drain_deadline():
    launcher, clock = FakeLauncher(), Clock()
    pool = WorkerPool(launcher, drain_s=10, kill_grace_s=2, clock=clock)
    assert [s.index for s in pool.start(3)] == [0, 1, 2]
    victims = pool.stop_newest(2)
    assert [s.index for s in victims] == [2, 1]
    assert launcher.procs[2].signals == [signal.SIGTERM] and launcher.procs[0].signals == []
    assert [s.index for s in pool.running] == [0] and len(pool.stopping) == 2

    launcher.procs[2].exit(0)  # drained in time
    clock.now += 11.9
    assert [s.index for s in pool.reap()] == [2] and launcher.released == [2]
    assert signal.SIGKILL not in launcher.procs[1].signals
    clock.now += 0.1  # 12 s = drain 10 + grace 2: index 1 is still there
    gone = pool.reap()
    assert launcher.procs[1].signals == [signal.SIGTERM, signal.SIGKILL]
    assert [(s.index, s.killed, s.returncode) for s in gone] == [(1, True, -9)]


def test_pool_close_waits_for_real_processes_and_escalates_to_sigkill():
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    polite = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
              "print('up', flush=True); time.sleep(60)")  # "drains" and exits 0 on the stop signal

    class Real:
        def __init__(self):
            self.released = []

        def start(self, index):
            return subprocess.Popen([sys.executable, "-c", stubborn if index == 0 else polite],
                                    stdout=subprocess.PIPE, text=True)

        def release(self, index):
            self.released.append(index)

    launcher = Real()
    pool = WorkerPool(launcher, drain_s=0.3, kill_grace_s=0.2)
    slots = pool.start(2)
    for s in slots:  # the handler is in place before we signal
        assert s.proc.stdout.readline().strip() == "up"
    gone = {s.index: s for s in pool.close(poll_s=0.02)}
    assert gone[0].killed and gone[0].returncode == -signal.SIGKILL
    assert not gone[1].killed and gone[1].returncode == 0
    assert sorted(launcher.released) == [0, 1] and not pool.running and not pool.stopping


# ---- the loop --------------------------------------------------------------------------


class Script:
    """Observer that replays backlogs; the last one repeats."""

    def __init__(self, *backlogs):
        self.backlogs = list(backlogs)

    def __call__(self):
        item = self.backlogs.pop(0) if len(self.backlogs) > 1 else self.backlogs[0]
        if isinstance(item, Exception):
            raise item
        return item


def backlog(n: int, partitions: int = 4) -> Backlog:
    per = {p: n // partitions + (p < n % partitions) for p in range(partitions)}
    return Backlog(lag=min(n, partitions * 10), unconsumed=per, partitions=partitions, active=n > 0)


def _scaler(script, launcher=None, clock=None, **kw):
    launcher, clock = launcher or FakeLauncher(), clock or Clock()
    pool = WorkerPool(launcher, drain_s=5, clock=clock)
    events = []
    scaler = LocalAutoscaler(observe=script, pool=pool, policy=POLICY, clock=clock, wall=lambda: 0.0,
                             on_event=events.append, **kw)
    return scaler, launcher, clock, events


def test_loop_scales_out_in_and_to_zero_and_records_events():
    scaler, launcher, clock, events = _scaler(Script(backlog(100), backlog(100), backlog(15), backlog(0)))
    for _ in range(12):
        scaler.step()
        for proc in launcher.procs.values():  # workers drain promptly after the stop signal
            if proc.signals and proc.returncode is None:
                proc.exit(0)
        clock.now += 0.5
    assert scaler.done()
    kinds = [e.event for e in events if e.event in ("scale_out", "scale_in", "scale_to_zero")]
    # 0 -> 1 -> 4; lag 15 wants 2, taken once the window passes; idle: 1, then 0
    assert kinds == ["scale_out", "scale_out", "scale_in", "scale_in", "scale_to_zero"], [e.line() for e in events]
    assert [e.replicas_to for e in events if e.event in kinds] == [1, 4, 2, 1, 0]
    assert scaler.max_replicas == 4 and scaler.replicas[-1][1] == 0
    # every stop signal went out with nothing unconsumed or a worker left to consume it
    for e in events:
        if e.event in ("scale_in", "scale_to_zero"):
            assert e.unconsumed == 0 or e.replicas_to > 0
    zero = next(e for e in events if e.event == "scale_to_zero")
    assert zero.unconsumed == 0 and zero.unconsumed_by_partition == {0: 0, 1: 0, 2: 0, 3: 0}
    (logged,) = parse_events(zero.line())
    assert (logged["event"], logged["from"], logged["to"]) == ("scale_to_zero", 1, 0)
    report = scaler.report()
    assert report.max_replicas == 4 and report.workers_started == 4
    assert [e["event"] for e in report.scale_events].count("exited") == 4


def test_loop_replaces_a_worker_that_exits_while_work_remains():
    scaler, launcher, clock, events = _scaler(Script(backlog(30)))
    scaler.step(), scaler.step()
    assert len(scaler.pool.running) == 3
    launcher.procs[1].exit(0)  # e.g. drained after a spot notice
    clock.now += 1
    scaler.step()
    assert [e.event for e in events[-2:]] == ["exited", "replace"]
    assert len(scaler.pool.running) == 3 and sorted(launcher.procs) == [0, 1, 2, 3]


def test_loop_gives_up_on_a_crash_loop():
    scaler, launcher, clock, events = _scaler(Script(backlog(30)), max_early_exits=3)
    with pytest.raises(WorkerCrashLoop, match="3 workers in a row"):
        for _ in range(10):
            scaler.step()
            for proc in launcher.procs.values():
                if proc.returncode is None:
                    proc.exit(2)  # e.g. a bad --model
            clock.now += 1


def test_loop_holds_on_a_transient_broker_error_and_raises_others():
    scaler, launcher, _, _ = _scaler(Script(backlog(30), KafkaConnectionError("down"), backlog(30)))
    scaler.step()
    assert scaler.step().reason == "lag unavailable" and scaler.state.target == 1
    assert scaler.step().target == 3
    broken, _, _, _ = _scaler(Script(ValueError("topic gone")))
    with pytest.raises(ValueError):
        broken.step()


def test_run_once_exits_after_the_cooldown_and_stops_min_replicas():
    launcher, clock = FakeLauncher(), Clock()
    pool = WorkerPool(launcher, drain_s=5, clock=clock)
    policy = ScalePolicy(min_replicas=1, max_replicas=2, cooldown_s=1.0)

    class Stepping:
        def __init__(self):
            self.script = Script(backlog(20), backlog(20), backlog(0))

        def __call__(self):
            clock.now += 0.4  # time passes between polls
            for proc in launcher.procs.values():
                if proc.signals and proc.returncode is None:
                    proc.exit(0)
            return self.script()

    scaler = LocalAutoscaler(observe=Stepping(), pool=pool, policy=policy, poll_s=0.0, clock=clock,
                             on_event=lambda e: None)
    # pool.close() waits in real time for processes: make them exit when signalled
    for_close = FakeProc.send_signal

    def obey(self, sig):
        for_close(self, sig)
        self.returncode = 0

    FakeProc.send_signal = obey
    try:
        report = scaler.run(once=True)
    finally:
        FakeProc.send_signal = for_close
    assert report.max_replicas == 2 and report.replicas[-1][1] == 0
    assert [e["event"] for e in report.scale_events].count("shutdown") == 1


# ---- the command's bad input: exit 2, one line that says the fix ------------------------


@pytest.mark.parametrize("args, words", [
    (["scale-local", "--min", "3", "--max", "2"], "--min/--max"),
    (["scale-local", "--max", "0"], "--scale-max-replicas"),
    (["scale-local", "--cooldown-s", "-1"], "--scale-cooldown-s"),
    (["scale-local", "--config", "/nonexistent/scale.yaml"], "--config"),
    (["demo", "--min-workers", "3", "--workers", "2"], "--min-workers"),
])
def test_bad_scaling_flags_exit_2_with_one_line(args, words, monkeypatch):
    from typer.testing import CliRunner

    from spotbatch.cli import app

    for key in [k for k in os.environ if k.startswith("SPOTBATCH_")]:
        monkeypatch.delenv(key)
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert words in lines[0]


# ---- what scale-local hands its workers: settings as environment, not rebuilt flags -------


def test_scale_local_hands_its_worker_settings_as_environment(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import spotbatch.scaler.local as local
    from spotbatch.cli import app
    from spotbatch.config import load_settings
    from spotbatch.scaler.local import AutoscalerReport

    for key in [k for k in os.environ if k.startswith("SPOTBATCH_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "s.yaml"
    config.write_text("output: ./from-yaml\nmax_wait_ms: 7\n")
    monkeypatch.setenv("SPOTBATCH_MODEL", "minilm")  # the flag below wins, for the workers too
    seen = {}

    def run(settings, *, worker_env, log_dir=None, once=False):
        seen.update(worker_env)
        return AutoscalerReport(seconds=0.0, max_replicas=0, workers_started=0)

    monkeypatch.setattr(local, "run_scale_local", run)
    result = CliRunner().invoke(app, ["scale-local", "--bootstrap", "h:1", "--topic", "t", "--model", "tiny",
                                      "--drain-s", "5", "--config", str(config), "--once"])
    assert result.exit_code == 0, result.output
    assert seen == {"SPOTBATCH_KAFKA_BOOTSTRAP": "h:1", "SPOTBATCH_TOPIC": "t", "SPOTBATCH_GROUP": "spotbatch-workers",
                    "SPOTBATCH_MODEL": "tiny", "SPOTBATCH_DRAIN_S": "5.0", "SPOTBATCH_CONFIG": str(config)}
    for key, value in seen.items():  # a worker started with it (and no flags) reads what scale-local resolved
        monkeypatch.setenv(key, value)
    worker = load_settings(None)
    assert (worker.kafka_bootstrap, worker.topic, worker.model, worker.drain_s) == ("h:1", "t", "tiny", 5.0)
    assert (worker.output, worker.max_wait_ms) == ("./from-yaml", 7)  # the YAML file reaches it as SPOTBATCH_CONFIG


def test_worker_env_writes_lists_and_secrets_as_a_worker_reads_them():
    from spotbatch.config import Settings
    from spotbatch.scaler.local import worker_env

    settings = Settings(input_prefixes=["/data/a/", "s3://bucket/in/"], kafka_security_protocol="SASL_SSL",
                        kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u", kafka_sasl_password="p")
    assert worker_env(settings, ["input_prefixes", "kafka_sasl_password"]) == {
        "SPOTBATCH_INPUT_PREFIXES": "/data/a/,s3://bucket/in/", "SPOTBATCH_KAFKA_SASL_PASSWORD": "p"}
