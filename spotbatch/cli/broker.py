"""``spotbatch broker``: the embedded Kafka-compatible broker, until Ctrl-C."""

from __future__ import annotations

from typing import Optional

import typer

__all__ = ["register"]


def broker(port: Optional[int] = typer.Option(None, help="Port to listen on (default: a free one).")) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) until Ctrl-C."""
    from spotbatch.embedded import serve_forever

    raise typer.Exit(serve_forever(port))


def register(app: typer.Typer) -> None:
    app.command("broker")(broker)
