"""``spotbatch scheduler ...``: prices, simulate, plan, apply, report.

Keep imports of heavy modules (kafka, boto3, matplotlib, kubernetes) inside the
command bodies: ``spotbatch --help`` must stay fast.
"""

from __future__ import annotations

import typer

__all__ = ["register"]

scheduler_app = typer.Typer(no_args_is_help=True, help="Hybrid spot/on-demand scheduler: costs, plans, reports.")


def register(app: typer.Typer) -> None:
    """Attach this module's verbs to the main app."""
    app.add_typer(scheduler_app, name="scheduler")
