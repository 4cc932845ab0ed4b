"""``spotbatch worker``, and the worker's settings flags, declared once: ``worker`` takes
them all; ``scale-local`` (spotbatch.cli.scaler) takes ``SCALE_LOCAL_WORKER_OPTIONS`` and
hands the values to its workers as configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

import typer

from spotbatch.cli.common import BootstrapOpt, ConfigOpt, fail, load_or_exit, option_group, setup_logging
from spotbatch.errors import JobError

__all__ = ["WORKER_OPTIONS", "SCALE_LOCAL_WORKER_OPTIONS", "settings_flags", "register"]


class _Setting(NamedTuple):
    """A plain settings flag: not given (None) falls through to the environment and the
    YAML file; its help, ``text``, gets the env var of the setting it is the flag of."""

    kind: type
    text: str


def _options(table: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {name: (Optional[entry.kind], typer.Option(None, help=f"{entry.text} [env SPOTBATCH_{name.upper()}]."))
            if isinstance(entry, _Setting) else entry for name, entry in table.items()}


# name -> (type, option) or a _Setting, in --help order. The names are the settings'
# (spotbatch.config) but for the two in _SETTING.
WORKER_OPTIONS: dict[str, tuple[Any, Any]] = _options({
    "bootstrap": (Optional[str], BootstrapOpt),
    "topic": _Setting(str, "Jobs topic"),
    "group": _Setting(str, "Consumer group"),
    "model": _Setting(str, "Model: tiny, minilm, torchscript:PATH, export:PATH, st:PATH"),
    "output": _Setting(str, "Output prefix: a folder or s3://bucket/prefix"),
    "skip_model": (Optional[list[str]], typer.Option(
        None, "--skip-model", metavar="MODEL", help="A model another fleet serves from this topic in its own consumer group: "
        "its jobs are committed past untouched (repeatable; env SPOTBATCH_SKIP_MODELS, comma-separated).")),
    "input_prefix": (Optional[list[str]], typer.Option(
        None, "--input-prefix", metavar="PREFIX", help="URI jobs may read only under this folder or s3://bucket/prefix/ "
        "(repeatable; env SPOTBATCH_INPUT_PREFIXES, comma-separated); none: URI jobs are refused.")),
    "max_batch_rows": _Setting(int, "Close a batch at this many rows"),
    "max_wait_ms": _Setting(int, "...or when its oldest row waited this long"),
    "max_batch_tokens": _Setting(int, "Text models: close a batch at this many padded tokens (rows sorted by length)"),
    "device": _Setting(str, "auto, cpu, cuda, cuda:N"),
    "precision": _Setting(str, "auto, fp32, bf16, fp16"),
    "torch_threads": _Setting(int, "torch.set_num_threads for CPU inference"),
    "session_timeout_ms": _Setting(int, "Kafka group session timeout"),
    "metrics_port": _Setting(int, "Serve /metrics and /healthz here (0 = off)"),
    "drain_s": _Setting(float, "Seconds to drain after a notice/SIGTERM before leaving the group"),
    "notice_source": _Setting(str, "Spot notices: auto, aws, gcp, azure, signal, none"),
    "rebalance_hold_s": _Setting(float, "After a rebalance recommendation, start no large job for this long"),
    "checkpoint_interval": _Setting(str, "Part size of URI jobs: '5000rows', '60s' or 'auto'"),
    "checkpoint_uri": _Setting(str, "Checkpoint store (default: <output>/_checkpoints)"),
    "max_attempts": _Setting(int, "Attempts finishing no part before a job goes to the DLQ"),
    "broker_wait_s": (Optional[float], typer.Option(
        None, help="Exit 1 once Kafka is unreachable this many seconds, at start or mid-run "
        "(env SPOTBATCH_BROKER_WAIT_S; default 60).")),
})

# What scale-local's workers take from its command line (one port or one Kafka wait for
# all of them would not fit: those stay in the YAML file or the environment).
SCALE_LOCAL_WORKER_OPTIONS = {k: WORKER_OPTIONS[k] for k in (
    "bootstrap", "topic", "group", "model", "output", "device", "precision", "torch_threads", "max_batch_rows",
    "max_wait_ms", "session_timeout_ms", "drain_s", "notice_source", "checkpoint_interval", "checkpoint_uri")}

_SETTING = {"bootstrap": "kafka_bootstrap", "input_prefix": "input_prefixes", "skip_model": "skip_models"}  # option name -> setting


def settings_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Option values -> load_settings flags (None, or an empty list, is "not given")."""
    return {_SETTING.get(name, name): (value or None) if isinstance(value, list) else value
            for name, value in values.items()}


@option_group(WORKER_OPTIONS, into="options")
def worker(
    options: dict,
    burst: bool = typer.Option(False, "--burst", help="Exit 0 once caught up with the log end."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Consume jobs, batch rows across jobs, infer, write Parquet, commit."""
    settings = load_or_exit(config, **settings_flags(options))
    setup_logging()
    from spotbatch.workers import StartupError, run_worker  # torch import stays off the other verbs' path

    try:
        run_worker(settings, burst=burst)
    except StartupError as exc:  # output not writable (2), Kafka not reachable (1): one line, no traceback
        fail(str(exc), code=exc.code)
    except (JobError, ValueError) as exc:  # bad --model / --device / --output: the operator's to fix
        fail(str(exc))


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
