"""What every CLI module shares: the consoles, the common options, one-line errors,
settings loading and logging set-up. The verbs' modules (cli, dlq, scaler.cli,
scheduler.cli) import from here, never from each other."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from spotbatch.config import ConfigError, load_settings

__all__ = ["err", "out", "BootstrapOpt", "ConfigOpt", "fail", "load_or_exit", "setup_logging"]

err = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line in logs
out = Console()

BootstrapOpt = typer.Option(None, "--bootstrap", help="Kafka bootstrap servers [env SPOTBATCH_KAFKA_BOOTSTRAP].")
ConfigOpt = typer.Option(None, "--config", help="YAML settings file [env SPOTBATCH_CONFIG].")


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def load_or_exit(config: Optional[Path], **flags):
    try:
        return load_settings(config, **flags)
    except ConfigError as exc:
        fail(str(exc))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_kafka_one_line)


def _kafka_one_line(record: logging.LogRecord) -> bool:
    """kafka-python logs a traceback for a connection reset (a lost broker): keep it one line."""
    if record.name.startswith("kafka") and record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {exc}", ()
        record.exc_info, record.exc_text = None, None
    return True
