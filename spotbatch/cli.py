"""The ``spotbatch`` command. Each verb is a thin shell over a module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from kafka import KafkaProducer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spotbatch.cli_common import BootstrapOpt, ConfigOpt, err, out, polish_help
from spotbatch.cli_common import fail as _fail
from spotbatch.cli_common import load_or_exit as _settings
from spotbatch.cli_common import setup_logging as _logging
from spotbatch.errors import JobError
from spotbatch.kafka_security import client_options

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch inference on spot GPUs, fed by Kafka.")
@app.command()
def worker(
    bootstrap: Optional[str] = BootstrapOpt,
    topic: Optional[str] = typer.Option(None, help="Jobs topic [env SPOTBATCH_TOPIC]."),
    group: Optional[str] = typer.Option(None, help="Consumer group [env SPOTBATCH_GROUP]."),
    model: Optional[str] = typer.Option(None, help="Model: tiny, minilm, torchscript:PATH, export:PATH, st:PATH [env SPOTBATCH_MODEL]."),
    output: Optional[str] = typer.Option(None, help="Output prefix: a folder or s3://bucket/prefix [env SPOTBATCH_OUTPUT]."),
    input_prefix: Optional[list[str]] = typer.Option(
        None, "--input-prefix", help="URI jobs may read only under this folder or s3://bucket/prefix/ "
        "(repeatable; env SPOTBATCH_INPUT_PREFIXES, comma-separated); none: URI jobs are refused."),
    max_batch_rows: Optional[int] = typer.Option(None, help="Close a batch at this many rows [env SPOTBATCH_MAX_BATCH_ROWS]."),
    max_wait_ms: Optional[int] = typer.Option(None, help="...or when its oldest row waited this long [env SPOTBATCH_MAX_WAIT_MS]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N [env SPOTBATCH_DEVICE]."),
    precision: Optional[str] = typer.Option(None, help="auto, fp32, bf16, fp16 [env SPOTBATCH_PRECISION]."),
    torch_threads: Optional[int] = typer.Option(None, help="torch.set_num_threads for CPU inference [env SPOTBATCH_TORCH_THREADS]."),
    session_timeout_ms: Optional[int] = typer.Option(None, help="Kafka group session timeout [env SPOTBATCH_SESSION_TIMEOUT_MS]."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve /metrics and /healthz here (0 = off) [env SPOTBATCH_METRICS_PORT]."),
    drain_s: Optional[float] = typer.Option(None, help="Seconds to drain after a notice/SIGTERM before leaving the group [env SPOTBATCH_DRAIN_S]."),
    notice_source: Optional[str] = typer.Option(None, help="Spot notices: auto, aws, gcp, azure, signal, none [env SPOTBATCH_NOTICE_SOURCE]."),
    rebalance_hold_s: Optional[float] = typer.Option(None, help="After a rebalance recommendation, start no large job for this long [env SPOTBATCH_REBALANCE_HOLD_S]."),
    checkpoint_interval: Optional[str] = typer.Option(None, help="Part size of URI jobs: '5000rows', '60s' or 'auto' [env SPOTBATCH_CHECKPOINT_INTERVAL]."),
    checkpoint_uri: Optional[str] = typer.Option(None, help="Checkpoint store (default: <output>/_checkpoints) [env SPOTBATCH_CHECKPOINT_URI]."),
    max_attempts: Optional[int] = typer.Option(None, help="Attempts finishing no part before a job goes to the DLQ [env SPOTBATCH_MAX_ATTEMPTS]."),
    burst: bool = typer.Option(False, "--burst", help="Exit 0 once caught up with the log end."),
    broker_wait_s: Optional[float] = typer.Option(None, help="Exit 1 once Kafka is unreachable this many seconds, "
                                                  "at start or mid-run (env SPOTBATCH_BROKER_WAIT_S; default 60)."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Consume jobs, batch rows across jobs, infer, write Parquet, commit."""
    settings = _settings(config, kafka_bootstrap=bootstrap, topic=topic, group=group, model=model, output=output,
                         input_prefixes=input_prefix or None, max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, device=device, precision=precision,
                         torch_threads=torch_threads, session_timeout_ms=session_timeout_ms,
                         metrics_port=metrics_port, drain_s=drain_s, notice_source=notice_source,
                         rebalance_hold_s=rebalance_hold_s,
                         checkpoint_interval=checkpoint_interval, checkpoint_uri=checkpoint_uri,
                         max_attempts=max_attempts, broker_wait_s=broker_wait_s)
    _logging()
    from spotbatch.workers import StartupError, run_worker  # torch import stays off the other verbs' path

    try:
        run_worker(settings, burst=burst)
    except StartupError as exc:  # output not writable (2), Kafka not reachable (1): one line, no traceback
        _fail(str(exc), code=exc.code)
    except (JobError, ValueError) as exc:  # bad --model / --device / --output: the operator's to fix
        _fail(str(exc))


@app.command()
def publish(
    file: str = typer.Argument(..., help="JSONL or Parquet rows (local path or s3://), or job JSON lines with --raw."),
    topic: Optional[str] = typer.Option(None, help="Jobs topic [env SPOTBATCH_TOPIC]."),
    bootstrap: Optional[str] = BootstrapOpt,
    model: Optional[str] = typer.Option(None, help="Model the jobs ask for [env SPOTBATCH_MODEL]."),
    rows_per_job: int = typer.Option(100, min=1, help="Rows per job."),
    input_column: Optional[str] = typer.Option(None, help="Row key holding the model input (default: the model's)."),
    job_prefix: Optional[str] = typer.Option(None, help="Job ids are PREFIX-000000...; default: the file name."),
    output: Optional[str] = typer.Option(None, help="Output prefix for these jobs (must lie under the workers')."),
    raw: bool = typer.Option(False, "--raw", help="FILE holds one job JSON per line; send them as they are."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Publish rows as jobs (or raw job JSON lines) to the jobs topic."""
    from spotbatch import publish as pub

    settings = _settings(config, kafka_bootstrap=bootstrap, topic=topic, model=model)
    if "://" not in file and not Path(file).is_file():
        _fail(f"input file {file} does not exist; pass a JSONL or Parquet file (or s3://...)")
    if raw:  # the whole file is checked before anything connects or is sent
        try:
            pub.check_raw(_lines(file))
        except (pub.PublishError, FileNotFoundError) as exc:
            _fail(f"{exc}: fix the file and publish it again")
    try:
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, bootstrap_timeout_ms=5_000,
                                 **client_options(settings))
    except Exception as exc:  # noqa: BLE001 - any connect failure gets the same fix
        _fail(f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc}); pass --bootstrap HOST:PORT")
    progress = Progress(TextColumn("publishing"), BarColumn(), TextColumn("{task.completed} jobs"),
                        TextColumn("{task.fields[rows]} rows"), TimeElapsedColumn(), console=err, disable=as_json)
    try:
        with progress:
            task = progress.add_task("publish", total=None, rows=0)
            tick = lambda jobs, rows: progress.update(task, completed=jobs, rows=rows)  # noqa: E731
            if raw:
                report = pub.publish_raw(producer, settings.topic, _lines(file), tick)
            else:
                jobs = pub.rows_to_jobs(_rows(file), model=settings.model, input_column=input_column or _input_column(settings.model),
                                        rows_per_job=rows_per_job, prefix=job_prefix or pub.job_prefix_for(file), output=output)
                report = pub.publish_jobs(producer, settings.topic, jobs, tick)
    except (pub.PublishError, JobError, FileNotFoundError) as exc:
        _fail(f"{exc}: fix the file and publish it again" if raw else
              f"{exc} (jobs sent before this error keep their ids; fix the input and publish again)")
    finally:
        producer.close()
    summary = {"topic": settings.topic, "jobs": report.jobs, "rows": report.rows, "failed": report.failed}
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(f"published {report.jobs} jobs ({report.rows} rows) to {settings.topic}; failed sends: {report.failed}")
    for line in report.errors[:10]:
        err.print(f"[red]send failed:[/red] {line}")
    raise typer.Exit(0 if report.ok else 1)


def _rows(file: str):
    from spotbatch.inputs import iter_rows

    return iter_rows(file)


def _lines(file: str):
    from spotbatch.storage import store_for

    return store_for(file).read_bytes(file).splitlines()


def _input_column(model: str) -> str:
    from spotbatch.models import get_handler

    return get_handler(model).input_column


@app.command()
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
) -> None:
    """Run the whole loop on this machine: broker, workers, jobs, Parquet outputs."""
    from spotbatch.demo import DemoOptions, OutputNotEmpty, prepare_output, run_demo, summary_json

    if min_workers > workers:
        _fail(f"--min-workers {min_workers} is above --workers {workers}; lower --min-workers or raise --workers")
    opts = DemoOptions(bootstrap=bootstrap, model=model, rows=rows, rows_per_job=rows_per_job, workers=workers,
                       min_workers=min_workers, lag_threshold=lag_threshold, cooldown_s=cooldown_s,
                       partitions=partitions, output=output, timeout_s=timeout_s, interruptions=interruptions,
                       seed=seed, force=force)
    try:
        prepare_output(output, force=force)  # refuse before anything starts
    except OutputNotEmpty as exc:
        _fail(str(exc))
    jobs_total = -(-rows // rows_per_job)
    progress = Progress(TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rows]} rows"),
                        TextColumn("{task.fields[rate]} rows/s"), TextColumn("failed {task.fields[failed]}"),
                        TextColumn("workers {task.fields[replicas]} {task.fields[spark]}"),
                        TimeElapsedColumn(), console=err, disable=as_json)
    try:
        with progress:
            task = progress.add_task("demo", total=jobs_total, rows=0, rate="-", failed=0, replicas=0, spark="")
            started, history = [None], _ReplicaHistory(workers)

            def tick(jobs: int, done_rows: int, failed: int, replicas: int) -> None:
                import time

                started[0] = started[0] or time.monotonic()
                if jobs < jobs_total:  # after the last job only the replicas move (scale to zero)
                    progress.update(task, rate=f"{done_rows / max(1e-6, time.monotonic() - started[0]):.0f}")
                progress.update(task, completed=jobs, rows=done_rows, failed=failed, replicas=f"{replicas}/{workers}",
                                spark=history.add(replicas))

            summary = run_demo(opts, tick, log=(lambda _m: None) if as_json else (lambda m: err.print(m, highlight=False)))
    except (TimeoutError, RuntimeError) as exc:
        _fail(str(exc), code=1)
    if as_json:
        print(summary_json(summary))
    else:
        _print_summary(summary)
    raise typer.Exit(0 if summary.failed == 0 else 1)


class _ReplicaHistory:
    """Workers over time for the live view: one bar per second, the last 30 seconds."""

    _BARS = "▁▂▃▄▅▆▇█"

    def __init__(self, most: int) -> None:
        self._most, self._bars, self._second = max(1, most), [], None

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
        if key != "cost":
            table.add_row(key, str(value))
    out.print(table)
    if getattr(summary, "cost", None):  # the run's cost report (spotbatch scheduler report)
        from spotbatch.scheduler.report import render_table, report_from_json

        out.print(render_table(report_from_json(summary.cost)))


@app.command()
def broker(port: Optional[int] = typer.Option(None, help="Port to listen on (default: a free one).")) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) until Ctrl-C."""
    from spotbatch.embedded import serve_forever

    raise typer.Exit(serve_forever(port))


def _register_subcommands() -> None:
    from spotbatch.dlq import register as register_dlq
    from spotbatch.scaler.cli import register as register_scaler
    from spotbatch.scheduler.cli import register as register_scheduler

    register_scaler(app)
    register_scheduler(app)
    register_dlq(app)


_register_subcommands()
polish_help(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
