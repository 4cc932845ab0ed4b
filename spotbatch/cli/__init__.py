"""The ``spotbatch`` command: one Typer app; each verb is a thin shell over a module.

One module per verb group: ``worker``, ``publish``, ``demo``, ``broker``, ``scaler``
(``lag``, ``scaler serve``, ``scale-local``), ``scheduler`` (+ ``simulate``,
``spot_options``), ``dlq``, ``models`` and ``rollout``. What they share is in
``common``, which imports none of them; none of them imports this package's ``__init__``
back, and nothing outside the CLI imports the CLI.
"""

from __future__ import annotations

import typer

from spotbatch.cli import broker, demo, dlq, models, publish, rollout, scaler, scheduler, worker
from spotbatch.cli.common import polish_help

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batch inference on spot GPUs, fed by Kafka.")
for _verbs in (worker, publish, demo, broker, scaler, scheduler, dlq, models, rollout):  # the order of `spotbatch --help`
    _verbs.register(app)
polish_help(app)


def main() -> None:
    app()
