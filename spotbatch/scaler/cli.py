"""``spotbatch lag``, ``spotbatch scaler ...`` and ``spotbatch scale-local``.

Keep imports of heavy modules (grpc, kafka) inside the command bodies: ``spotbatch
--help`` must stay fast.
"""

from __future__ import annotations

import typer

__all__ = ["register"]

scaler_app = typer.Typer(no_args_is_help=True, help="KEDA external scaler.")


def register(app: typer.Typer) -> None:
    """Attach this module's verbs to the main app."""
    app.add_typer(scaler_app, name="scaler")
