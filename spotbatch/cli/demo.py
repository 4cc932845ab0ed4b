"""``spotbatch demo``: the whole loop on this machine, with a live view (spotbatch.demo runs it)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spotbatch.cli.common import BootstrapOpt, err, fail, out

__all__ = ["register"]


def demo(
    bootstrap: Optional[str] = BootstrapOpt,
    model: str = typer.Option("minilm", help="Model for the demo jobs."),
    rows: int = typer.Option(2000, min=1, help="Rows in the generated corpus."),
    rows_per_job: int = typer.Option(25, min=1, help="Rows per job."),
    workers: int = typer.Option(2, min=1, help="Most worker processes the autoscaler runs at once."),
    min_workers: int = typer.Option(0, min=0, help="Fewest workers (0: start from zero and end at zero)."),
    lag_threshold: int = typer.Option(10, min=1, help="Jobs of lag per worker (KEDA lagThreshold)."),
    cooldown_s: float = typer.Option(3.0, min=0, help="Seconds without unconsumed jobs before scaling to zero."),
    partitions: int = typer.Option(4, min=1, help="Partitions of the demo jobs topic."),
    output: str = typer.Option("./spotbatch-demo-output", help="Output folder: made, or emptied first if it is empty or a previous demo's (else refused)."),
    force: bool = typer.Option(False, "--force", help="Empty --output even if it holds files a demo did not write."),
    timeout_s: float = typer.Option(300.0, help="Give up after this long."),
    interruptions: int = typer.Option(0, min=0, help="Spot notices to send to random workers during the run."),
    seed: int = typer.Option(7, help="Seed for which worker gets each notice."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    rollout: bool = typer.Option(False, "--rollout", help="Then roll out two versions of the model over a stream of "
                                 "jobs: a lossy int8 one (rolled back, its jobs repaired) and a good one (promoted)."),
) -> None:
    """Run the whole loop on this machine: broker, workers, jobs, Parquet outputs."""
    from spotbatch.demo import DemoOptions, OutputNotEmpty, prepare_output, run_demo, summary_json

    if min_workers > workers:
        fail(f"--min-workers {min_workers} is above --workers {workers}; lower --min-workers or raise --workers")
    opts = DemoOptions(bootstrap=bootstrap, model=model, rows=rows, rows_per_job=rows_per_job, workers=workers,
                       min_workers=min_workers, lag_threshold=lag_threshold, cooldown_s=cooldown_s,
                       partitions=partitions, output=output, timeout_s=timeout_s, interruptions=interruptions,
                       seed=seed, force=force, rollout=rollout)
    try:
        prepare_output(output, force=force)  # refuse before anything starts
    except OutputNotEmpty as exc:
        fail(str(exc))
    jobs_total = -(-rows // rows_per_job)
    progress = Progress(TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rows]} rows"),
                        TextColumn("{task.fields[rate]} rows/s"), TextColumn("failed {task.fields[failed]}"),
                        TextColumn("workers {task.fields[replicas]} {task.fields[spark]}"),
                        TimeElapsedColumn(), console=err, disable=as_json)
    try:
        with progress:
            task = progress.add_task("demo", total=jobs_total, rows=0, rate="-", failed=0, replicas=0, spark="")
            started: list[float | None] = [None]
            history = _ReplicaHistory(workers)

            def tick(jobs: int, done_rows: int, failed: int, replicas: int) -> None:
                import time

                t0 = started[0] = started[0] or time.monotonic()
                if jobs < jobs_total:  # after the last job only the replicas move (scale to zero)
                    progress.update(task, rate=f"{done_rows / max(1e-6, time.monotonic() - t0):.0f}")
                progress.update(task, completed=jobs, rows=done_rows, failed=failed, replicas=f"{replicas}/{workers}",
                                spark=history.add(replicas))

            summary = run_demo(opts, tick, log=(lambda _m: None) if as_json else (lambda m: err.print(m, highlight=False)))
    except (TimeoutError, RuntimeError) as exc:
        fail(str(exc), code=1)
    if as_json:
        print(summary_json(summary))
    else:
        _print_summary(summary)
    raise typer.Exit(0 if summary.failed == 0 and _rollouts_as_expected(summary.rollout) else 1)


def _rollouts_as_expected(rollout: dict | None) -> bool:
    """--rollout: the lossy version rolled back, the good one promoted."""
    if rollout is None:
        return True
    bad, good = rollout["rollouts"]
    return bad["state"] == "rolled_back" and good["state"] == "promoted"


class _ReplicaHistory:
    """Workers over time for the live view: one bar per second, the last 30 seconds."""

    _BARS = "▁▂▃▄▅▆▇█"

    def __init__(self, most: int) -> None:
        self._most = max(1, most)
        self._bars: list[str] = []
        self._second: int | None = None

    def add(self, replicas: int) -> str:
        import time

        second = int(time.monotonic())
        bar = "·" if replicas == 0 else self._BARS[min(7, round(replicas / self._most * 7))]
        if second == self._second:
            self._bars[-1] = bar
        else:
            self._second = second
            self._bars = (self._bars + [bar])[-30:]
        return "".join(self._bars)


def _print_summary(summary) -> None:
    table = Table(title="spotbatch demo", show_header=False)
    for key, value in vars(summary).items():
        if key == "scale_events":  # the list is in --json; here, one line per event is too much
            value = ", ".join(f"{e['event']} {e['from']}->{e['to']} @{e['t_s']:.0f}s" for e in value) or "none"
        if key == "rollout" and value is not None:
            value = "; ".join(f"v{r['to']} {r['state']}" + (f" ({r['repaired']['jobs']} jobs repaired)" if "repaired" in r
                                                            else "") for r in value["rollouts"])
        if key != "cost":
            table.add_row(key, str(value))
    out.print(table)
    if getattr(summary, "cost", None):  # the run's cost report (spotbatch scheduler report)
        from spotbatch.scheduler.report import render_table, report_from_json

        out.print(render_table(report_from_json(summary.cost)))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
