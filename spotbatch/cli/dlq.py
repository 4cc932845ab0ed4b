"""``spotbatch dlq list|show|redrive``: the dead letters of a jobs topic (spotbatch.dlq
parses them; here they are read from Kafka, shown and re-published)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from spotbatch.cli.common import (
    BootstrapOpt,
    ConfigOpt,
    JsonOpt,
    err,
    fail,
    grouped,
    load_or_exit,
    option_group,
    out,
)
from spotbatch.dlq import (
    DeadLetter,
    RedriveRefused,
    dedupe,
    find,
    original_bytes,
    parse_dead_letter,
    parse_offset,
    select,
)
from spotbatch.kafka_security import client_options
from spotbatch.records import dlq_topic

if TYPE_CHECKING:
    from rich.console import JustifyMethod

__all__ = ["register"]

REASON_WIDTH = 60  # reasons longer than this are cut in the table (the JSON has them whole)


dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters of a jobs topic: list, show, redrive.")

# Where the dead letters are read from: every dlq verb takes these (the keywords of _load).
_SOURCE_OPTIONS = {
    "topic": (str, typer.Option(..., "--topic", help="Jobs topic whose <topic>.dlq to read.")),
    "bootstrap": (Optional[str], BootstrapOpt),
    "timeout_s": (float, typer.Option(30.0, "--timeout-s", min=1, help="Give up reading the DLQ after this long.")),
    "config": (Optional[Path], ConfigOpt),
}


def _load(*, topic: str, bootstrap: Optional[str], config: Optional[Path], timeout_s: float):
    """(settings, de-duplicated dead letters of <topic>.dlq)."""
    from kafka.errors import KafkaError, UnknownTopicOrPartitionError

    from spotbatch.kafka_admin import read_all
    settings = load_or_exit(config, kafka_bootstrap=bootstrap, topic=topic)
    name = dlq_topic(settings.topic)
    try:
        records = read_all(settings.kafka_bootstrap, name, timeout_s=timeout_s,
                           client_options={"bootstrap_timeout_ms": int(min(timeout_s, 10.0) * 1000),
                                           **client_options(settings)})
    except UnknownTopicOrPartitionError:
        hint = f" (did you mean --topic {topic.removesuffix('.dlq')}?)" if topic.endswith(".dlq") else ""
        fail(f"topic {name} does not exist on {settings.kafka_bootstrap}; pass the jobs topic with --topic{hint}")
    except KafkaError as exc:
        if "bootstrap" in str(exc).lower():  # kafka-python 3: KafkaTimeoutError "Unable to bootstrap from ..."
            fail(f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc}); pass --bootstrap HOST:PORT")
        fail(f"reading {name} from {settings.kafka_bootstrap} failed ({exc}); check the broker, "
             "or raise --timeout-s", code=1)
    return settings, dedupe(parse_dead_letter(r) for r in records)


def _table(letters: list[DeadLetter], title: str):
    from rich.table import Table

    table = Table(title=title)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("partition", "right"), ("offset", "right"), ("job id", "left"), ("code", "left"),
        ("reason", "left"), ("size", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for d in letters:
        reason = d.reason if len(d.reason) <= REASON_WIDTH else d.reason[:REASON_WIDTH - 1] + "…"
        size = f"{d.size}{'*' if d.truncated else ''}"
        table.add_row(str(d.source_partition), str(d.source_offset), d.job_id or "-", d.code or "-",
                      reason.replace("\n", " "), size)
    return table


@dlq_app.command("list")
@option_group(_SOURCE_OPTIONS, into="source")
def list_(
    code: Optional[list[str]] = typer.Option(None, "--code", help="Only these error codes (repeatable)."),
    as_json: bool = JsonOpt,
    source: Optional[dict[str, Any]] = None,  # _SOURCE_OPTIONS go here in --help
) -> None:
    """Dead letters of <topic>.dlq, one per source record (the last written)."""
    settings, letters = _load(**grouped(source))
    if code:
        letters = [d for d in letters if d.code in set(code)]
    if as_json:
        print(json.dumps([d.summary() for d in letters]))
        return
    out.print(_table(letters, f"{settings.topic}.dlq: {len(letters)} dead letters (* truncated here)"))


@dlq_app.command()
@option_group(_SOURCE_OPTIONS, into="source")
def show(
    which: str = typer.Argument(..., metavar="OFFSET_OR_JOBID", help="Source offset (N or PARTITION:N) or job id."),
    as_json: bool = JsonOpt,
    source: Optional[dict[str, Any]] = None,  # _SOURCE_OPTIONS go here in --help
) -> None:
    """One dead letter in full: headers, reason, value."""
    settings, letters = _load(**grouped(source))
    hits = find(letters, which)
    if not hits:
        fail(f"no dead letter in {settings.topic}.dlq at source offset or job id {which!r}; "
             f"see `spotbatch dlq list --topic {settings.topic}`", code=1)
    if as_json:
        print(json.dumps([d.detail() for d in hits]))
        return
    from rich.table import Table

    for d in hits:
        table = Table(title=f"source {d.source_topic}:{d.source_partition}:{d.source_offset}", show_header=False)
        for key, value in d.detail().items():
            if key == "headers":
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
        out.print(table)


@dlq_app.command()
@option_group(_SOURCE_OPTIONS, into="source")
def redrive(
    code: Optional[list[str]] = typer.Option(None, "--code", help="Dead letters with this error code (repeatable)."),
    job_id: Optional[list[str]] = typer.Option(None, "--job-id", help="Dead letters of this job id (repeatable)."),
    offset: Optional[list[str]] = typer.Option(None, "--offset", help="Source offset N or PARTITION:N (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be sent; send nothing."),
    to_topic: Optional[str] = typer.Option(None, "--to-topic", help="Publish to this topic instead of the jobs "
                                           "topic (e.g. model_not_served letters to the fleet that serves them)."),
    as_json: bool = JsonOpt,
    source: Optional[dict[str, Any]] = None,  # _SOURCE_OPTIONS go here in --help
) -> None:
    """Re-publish chosen dead letters' original bytes (key, value, headers) to the jobs topic.

    Selectors of different kinds must all match; values of one kind are alternatives.
    """
    if not (code or job_id or offset):
        fail("redrive needs a selector; pass --code CODE, --job-id ID or --offset N (see `spotbatch dlq list`)")
    offsets = []
    for text in offset or []:
        try:
            offsets.append(parse_offset(text))
        except ValueError:
            fail(f"--offset {text!r} must be N or PARTITION:N (source offsets, non-negative integers)")
    options = grouped(source)
    settings, letters = _load(**options)
    chosen = select(letters, codes=code or (), job_ids=job_id or (), offsets=offsets)
    ready, refused = [], []
    for d in chosen:
        try:
            ready.append((d, original_bytes(d)))
        except RedriveRefused as exc:
            refused.append((d, str(exc)))
    target = to_topic or settings.topic
    sent, failed = (0, []) if dry_run else _send(settings, target, ready, options["timeout_s"])
    report = {"topic": target, "selected": len(chosen), "redriven": sent, "dry_run": dry_run,
              "would_redrive": len(ready) if dry_run else None,
              "refused": [{"source": d.summary()["source"], "job_id": d.job_id, "why": why} for d, why in refused],
              "failed": failed,
              "letters": [d.summary() for d, _ in ready]}
    if as_json:
        print(json.dumps(report))
    else:
        if dry_run:
            out.print(_table([d for d, _ in ready], f"would redrive {len(ready)} of {len(chosen)} selected to {target}"))
        else:
            out.print(f"redrove {sent} of {len(chosen)} selected dead letters to {target}")
        for _, why in refused:
            err.print(f"[red]refused:[/red] {why}", highlight=False)
        for why in failed:
            err.print(f"[red]send failed:[/red] {why}", highlight=False)
    raise typer.Exit(1 if refused or failed else 0)


def _send(settings: Any, topic: str, ready: list[tuple[DeadLetter, Optional[bytes]]],
          timeout_s: float) -> tuple[int, list[str]]:
    """Publish and wait for every ack: (acknowledged, [errors])."""
    if not ready:
        return 0, []
    from kafka import KafkaProducer

    try:
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, acks="all",
                                 max_request_size=max(1024 * 1024, 2 * max(len(v or b"") for _, v in ready)),
                                 bootstrap_timeout_ms=5_000, **client_options(settings))
    except Exception as exc:  # noqa: BLE001 - any connect failure gets the same fix
        fail(f"cannot reach Kafka at {settings.kafka_bootstrap} ({exc}); pass --bootstrap HOST:PORT")
    sent, failed = 0, []
    try:
        futures = [(d, producer.send(topic, key=d.key, value=value, headers=d.headers or None))
                   for d, value in ready]
        producer.flush(timeout=timeout_s)
        for d, future in futures:
            try:
                future.get(timeout=max(1.0, timeout_s))
                sent += 1
            except Exception as exc:  # noqa: BLE001 - reported per letter
                failed.append(f"source {d.source_partition}:{d.source_offset}: {exc}")
    finally:
        producer.close()
    return sent, failed


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")
