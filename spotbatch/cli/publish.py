"""``spotbatch publish``: rows (or raw job JSON lines) -> jobs -> the jobs topic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from kafka import KafkaProducer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from spotbatch.cli.common import BootstrapOpt, ConfigOpt, err, fail, load_or_exit, out
from spotbatch.errors import JobError
from spotbatch.kafka_security import client_options

__all__ = ["register"]


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

    settings = load_or_exit(config, kafka_bootstrap=bootstrap, topic=topic, model=model)
    if "://" not in file and not Path(file).is_file():
        fail(f"input file {file} does not exist; pass a JSONL or Parquet file (or s3://...)")
    if raw:  # the whole file is checked before anything connects or is sent
        try:
            pub.check_raw(_lines(file))
        except (pub.PublishError, FileNotFoundError) as exc:
            fail(f"{exc}: fix the file and publish it again")
    try:
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, bootstrap_timeout_ms=5_000,
                                 **client_options(settings))
    except Exception as exc:  # noqa: BLE001 - any connect failure gets the same fix
        fail(f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc}); pass --bootstrap HOST:PORT")
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
        fail(f"{exc}: fix the file and publish it again" if raw else
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


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
