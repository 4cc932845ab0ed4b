"""``spotbatch rollout start|resume|status|abort|repair|controller``: gated model rollouts.

A thin shell over :mod:`spotbatch.rollouts.controller`. Arguments are checked before any
broker is contacted, so a typo costs nothing. Exit codes of ``start``/``resume``: 0
promoted, 1 rolled back or aborted, 130 stopped watching (Ctrl-C/SIGTERM: the rollout
itself keeps running, recorded in the models topic, for ``resume`` or the controller
service to drive).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from spotbatch.cli.common import (BootstrapOpt, ConfigOpt, JsonOpt, err, fail, grouped, load_or_exit, option_group,
                                  out, setup_logging)

__all__ = ["register", "parse_steps"]

log = logging.getLogger("spotbatch.rollout")

rollout_app = typer.Typer(no_args_is_help=True, help="Gated rollouts of a model version: steps, shadow, gates, repair.")

_WHERE = {
    "topic": (Optional[str], typer.Option(None, "--topic", help="Jobs topic the workers consume [env SPOTBATCH_TOPIC].")),
    "models_topic": (Optional[str], typer.Option(None, "--models-topic", help="Registry topic [env SPOTBATCH_MODELS_TOPIC; default spotbatch.models].")),
    "bootstrap": (Optional[str], BootstrapOpt),
    "config": (Optional[Path], ConfigOpt),
}
_EXIT = {"promoted": 0, "rolled_back": 1, "aborted": 1, "running": 130}


def parse_steps(text: str) -> tuple[float, ...]:
    """``"10,50,100"`` (percent) -> (0.1, 0.5, 1.0); ValueError naming the fix."""
    fix = "give ascending percentages of jobs ending at 100, e.g. --steps 10,50,100"
    try:
        percents = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"bad --steps {text!r}: {fix}") from None
    if any(not 0 < p <= 100 for p in percents):
        raise ValueError(f"bad --steps {text!r}: each step must be in (0, 100]; {fix}")
    if any(b <= a for a, b in zip(percents, percents[1:])):
        raise ValueError(f"bad --steps {text!r}: steps must ascend; {fix}")
    if percents[-1] != 100:
        raise ValueError(f"bad --steps {text!r}: the last step must be 100 (every job); {fix}")
    return tuple(p / 100 for p in percents)


def _seconds(flag: str, text: Optional[str]) -> Optional[float]:
    from spotbatch.durations import DurationError, parse_duration_s

    if text is None:
        return None
    try:
        return parse_duration_s(text)
    except DurationError as exc:
        fail(f"bad {flag}: {exc}")


def _settings(where: dict[str, Any]):
    return load_or_exit(where["config"], kafka_bootstrap=where["bootstrap"], topic=where["topic"],
                        models_topic=where["models_topic"])


def _controller(name: str, where: dict[str, Any]):
    from spotbatch.kafka_security import client_options
    from spotbatch.rollouts.controller import Controller

    settings = _settings(where)
    return Controller(settings.kafka_bootstrap, name, settings.topic, settings.models_topic,
                      client_options=client_options(settings)), settings


def _guard(action: Callable[[], Any], bootstrap: str = "") -> Any:
    """Refusals exit 2 with their one line; an unreachable broker exits 1 with the fix."""
    from kafka.errors import KafkaError

    try:
        return action()
    except ValueError as exc:  # RegistryError is one
        fail(str(exc))
    except KafkaError as exc:
        fail(f"cannot talk to Kafka at {bootstrap} ({exc}); check the broker or pass --bootstrap HOST:PORT", code=1)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _LiveView:
    """One line per change of state, step or gate status; a spinner for the waiting between."""

    def __init__(self, spinner: Any) -> None:
        self._spinner = spinner
        self._last: dict[str, Any] = {}

    def __call__(self, rollout: Any, jobs_in_step: int) -> None:
        where = f"step {rollout.step + 1}/{len(rollout.steps)} ({rollout.steps[rollout.step]:.0%})"
        if (rollout.state, rollout.step) != self._last.get("at"):
            out.print(f"{rollout.name} v{rollout.champion} -> v{rollout.challenger}: {rollout.state} {where}"
                      + (f": {rollout.reason}" if rollout.reason else ""), highlight=False, markup=False)
        for gate in rollout.gates:
            if self._last.get(gate["name"]) != gate["status"]:
                out.print(f"  gate {gate['name']}: {gate['status']} ({gate['why']})", highlight=False, markup=False)
            self._last[gate["name"]] = gate["status"]
        self._last["at"] = (rollout.state, rollout.step)
        if self._spinner is not None:
            bake = rollout.settings.get("bake_jobs")
            self._spinner.update(f"{where}: challenger {jobs_in_step}/{bake} jobs")


def _drive(controller: Any, *, every_s: float, as_json: bool, repair: bool, bootstrap: str) -> None:
    """Tick until final or a signal; print the summary; exit with the state's code."""
    spinner = err.status("waiting for jobs") if not as_json and err.is_terminal else None
    view = None if as_json else _LiveView(spinner)
    on_tick = None if view is None else (lambda r: view(r, controller.jobs_in_step))
    with _stop_on_signals() as stop:
        if spinner is not None:
            spinner.start()
        try:
            final = _guard(lambda: controller.run(every_s=every_s, on_tick=on_tick, stop=stop), bootstrap)
        finally:
            if spinner is not None:
                spinner.stop()
    extra: dict[str, Any] = {}
    if repair and final.state in ("rolled_back", "aborted"):
        extra["repaired"] = _guard(lambda: controller.repair(final.challenger), bootstrap)
    _report(final, extra, as_json)
    raise typer.Exit(_EXIT[final.state])


def _report(rollout: Any, extra: dict[str, Any], as_json: bool) -> None:
    from spotbatch.rollouts.controller import summary

    if as_json:
        out.print_json(json.dumps(summary(rollout, **extra)))
        return
    if rollout.state == "running":
        err.print(f"stopped watching; the rollout stays running at step {rollout.step + 1}/{len(rollout.steps)}: "
                  f"continue with `spotbatch rollout resume {rollout.name}`, or stop it with "
                  f"`spotbatch rollout abort {rollout.name}`", highlight=False, markup=False)
    if "repaired" in extra:
        r = extra["repaired"]
        out.print(f"repair: re-published {r['jobs']} jobs ({r['rows']} rows); {r['missing']} gone from the log",
                  highlight=False, markup=False)


@rollout_app.command("start")
@option_group(_WHERE, into="where")
def start(
    name: str = typer.Argument(..., help="Model name in the registry."),
    to: int = typer.Option(..., "--to", help="The challenger: the version to roll out."),
    steps: str = typer.Option("10,50,100", "--steps", metavar="PCT,PCT,...", help="Percent of jobs the challenger takes at each step, ascending, ending at 100."),
    bake_jobs: int = typer.Option(20, "--bake-jobs", help="Challenger jobs a step must finish before it may advance."),
    bake: Optional[str] = typer.Option(None, "--bake", metavar="DURATION", help="Or this long (e.g. 60s, 10m) with at least one job."),
    shadow: float = typer.Option(0.1, "--shadow", help="Fraction of the champion's jobs the challenger also runs, unwritten, to compare outputs (0: no agreement gates)."),
    min_agreement: float = typer.Option(0.98, "--min-agreement", help="Gate: mean agreement with the champion on shadowed rows."),
    min_low_agreement: Optional[float] = typer.Option(None, "--min-low-agreement", help="Gate: its 5th percentile [default: min-agreement - 0.05]."),
    max_error_rate_increase: float = typer.Option(0.01, "--max-error-rate-increase", help="Gate: failed-job share above the champion's."),
    max_latency_ratio: float = typer.Option(1.5, "--max-latency-ratio", help="Gate: seconds per row over the champion's."),
    max_nan_rate: Optional[float] = typer.Option(None, "--max-nan-rate", help="Gate: NaN rows per row (workers' nan_rows) [default: no gate]."),
    repair: bool = typer.Option(False, "--repair", help="If rolled back or aborted, re-publish the jobs the challenger wrote."),
    every: str = typer.Option("2s", "--every", metavar="DURATION", help="How often to read the workers' records."),
    as_json: bool = JsonOpt,
    where: Optional[dict] = None,
) -> None:
    """Start a rollout and drive it here, step by step, until promoted or rolled back."""
    from spotbatch.rollouts.gates import Thresholds

    try:
        fractions = parse_steps(steps)
        thresholds = Thresholds(min_agreement=min_agreement, min_low_agreement=min_low_agreement,
                                max_error_rate_increase=max_error_rate_increase,
                                max_latency_ratio=max_latency_ratio, max_nan_rate=max_nan_rate)
    except ValueError as exc:
        fail(str(exc))
    if not 0.0 <= shadow <= 1.0:
        fail(f"bad --shadow {shadow}: give a fraction of the champion's jobs in [0, 1], e.g. 0.2")
    if bake_jobs < 1:
        fail(f"bad --bake-jobs {bake_jobs}: a step bakes on at least 1 challenger job, e.g. 20")
    bake_s, every_s = _seconds("--bake", bake), _seconds("--every", every) or 1.0
    controller, settings = _controller(name, grouped(where))
    _guard(lambda: controller.start(to, steps=fractions, bake_jobs=bake_jobs, bake_s=bake_s, shadow=shadow,
                                    gates=thresholds), settings.kafka_bootstrap)
    _drive(controller, every_s=every_s, as_json=as_json, repair=repair, bootstrap=settings.kafka_bootstrap)


@rollout_app.command("resume")
@option_group(_WHERE, into="where")
def resume(name: str = typer.Argument(..., help="Model name."),
           repair: bool = typer.Option(False, "--repair", help="If rolled back or aborted, re-publish the jobs the challenger wrote."),
           every: str = typer.Option("2s", "--every", metavar="DURATION", help="How often to read the workers' records."),
           as_json: bool = JsonOpt, where: Optional[dict] = None) -> None:
    """Drive a running rollout here again (after Ctrl-C, or instead of the controller service)."""
    every_s = _seconds("--every", every) or 1.0
    controller, settings = _controller(name, grouped(where))
    _guard(controller.running, settings.kafka_bootstrap)
    _drive(controller, every_s=every_s, as_json=as_json, repair=repair, bootstrap=settings.kafka_bootstrap)


@rollout_app.command("status")
@option_group(_WHERE, into="where")
def status(name: str = typer.Argument(..., help="Model name."), as_json: bool = JsonOpt,
           where: Optional[dict] = None) -> None:
    """The rollout's state, step and gates (evaluated now while it runs)."""
    from rich.table import Table

    controller, settings = _controller(name, grouped(where))
    info = _guard(lambda: controller.status(live=True), settings.kafka_bootstrap)
    if as_json:
        out.print_json(json.dumps(info))
        return
    steps = ", ".join(f"{s:.0%}" for s in info["steps"])
    out.print(f"{name} v{info['champion']} -> v{info['challenger']}: {info['state']} step {info['step'] + 1}/"
              f"{len(info['steps'])} of [{steps}], challenger takes {info['fraction']:.0%}"
              + (f"; {info['reason']}" if info["reason"] else ""), highlight=False, markup=False)
    table = Table("gate", "status", "value", "threshold", "why")
    for gate in info["gates"]:
        table.add_row(gate["name"], gate["status"], "" if gate["value"] is None else f"{gate['value']:.4f}",
                      str(gate["threshold"]), gate["why"])
    out.print(table)


@rollout_app.command("abort")
@option_group(_WHERE, into="where")
def abort(name: str = typer.Argument(..., help="Model name."), where: Optional[dict] = None) -> None:
    """Stop a running rollout: every job goes to the champion again."""
    controller, settings = _controller(name, grouped(where))
    rollout = _guard(controller.abort, settings.kafka_bootstrap)
    out.print(f"{name}: {rollout.state} at step {rollout.step + 1}/{len(rollout.steps)}; v{rollout.champion} "
              f"serves every job (re-run v{rollout.challenger}'s jobs: spotbatch rollout repair {name} "
              f"--version {rollout.challenger})", highlight=False, markup=False)


@rollout_app.command("repair")
@option_group(_WHERE, into="where")
def repair_cmd(name: str = typer.Argument(..., help="Model name."),
               version: int = typer.Option(..., "--version", help="The bad version whose jobs to re-run."),
               as_json: bool = JsonOpt, where: Optional[dict] = None) -> None:
    """Re-publish (original bytes and key) every job this version wrote last, once each."""
    controller, settings = _controller(name, grouped(where))
    if _guard(lambda: name not in controller.registry.state().versions, settings.kafka_bootstrap):
        fail(f"model {name!r} is not in the registry; check the name (spotbatch models list)")
    counts = _guard(lambda: controller.repair(version), settings.kafka_bootstrap)
    if as_json:
        out.print_json(json.dumps({"name": name, "version": version, **counts}))
    else:
        out.print(f"re-published {counts['jobs']} jobs ({counts['rows']} rows) of {name}@{version} to "
                  f"{settings.topic}; {counts['missing']} gone from the log", highlight=False, markup=False)


@rollout_app.command("controller")
@option_group(_WHERE, into="where")
def controller_service(every: str = typer.Option("5s", "--every", metavar="DURATION", help="How often to tick every running rollout."),
                       once: bool = typer.Option(False, "--once", help="One pass over the running rollouts, then exit."),
                       where: Optional[dict] = None) -> None:
    """Run as a service: tick every running rollout of the registry; exit cleanly on SIGTERM."""
    from spotbatch.kafka_security import client_options
    from spotbatch.rollouts.service import tick_all

    every_s = _seconds("--every", every) or 1.0
    settings = _settings(grouped(where))
    setup_logging()
    log.info("rollout controller on %s (models %s), every %gs", settings.kafka_bootstrap, settings.models_topic, every_s)
    with _stop_on_signals() as stop:
        while True:
            tick_all(settings.kafka_bootstrap, settings.models_topic, default_jobs_topic=settings.topic,
                     client_options=client_options(settings))
            if once or stop.wait(every_s):
                break
    log.info("rollout controller stopped")


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")
