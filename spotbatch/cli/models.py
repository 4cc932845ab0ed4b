"""``spotbatch models register|list|show|alias``: the model registry on the models topic."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from spotbatch.cli.common import BootstrapOpt, ConfigOpt, JsonOpt, fail, load_or_exit, out

__all__ = ["register"]

models_app = typer.Typer(no_args_is_help=True, help="Model registry: numbered versions, digests and aliases.")
TopicOpt = typer.Option(None, "--models-topic", help="Registry topic [env SPOTBATCH_MODELS_TOPIC; default spotbatch.models].")


def _registry(bootstrap: Optional[str], topic: Optional[str], config: Optional[Path]):
    from spotbatch.kafka_security import client_options
    from spotbatch.rollouts import Registry

    settings = load_or_exit(config, kafka_bootstrap=bootstrap, models_topic=topic)
    return Registry(settings.kafka_bootstrap, settings.models_topic, client_options=client_options(settings))


def _run(action):
    from spotbatch.rollouts import RegistryError

    try:
        return action()
    except (RegistryError, ValueError) as exc:
        fail(str(exc))


@models_app.command("register")
def register_version(
    name: str = typer.Argument(..., help="Model name, e.g. embedder."),
    version: int = typer.Option(..., "--version", help="The new version's number (immutable once registered)."),
    ref: str = typer.Option(..., "--ref", help="What to load: tiny, minilm, st:PATH, torchscript:PATH, export:PATH."),
    precision: str = typer.Option("fp32", "--precision", help="fp32; int8 (dynamically quantised Linear layers), int8-token (per-token activation scales) or bf16: built by the worker at load."),
    notes: str = typer.Option("", "--notes", help="Free text kept with the version."),
    as_json: bool = JsonOpt, bootstrap: Optional[str] = BootstrapOpt, topic: Optional[str] = TopicOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Hash the ref's files and add a version (the first version of a name becomes its champion)."""
    registry = _registry(bootstrap, topic, config)
    entry = _run(lambda: registry.register(name, version, ref, precision=precision, notes=notes))
    if as_json:
        out.print_json(json.dumps(entry.to_json()))
    else:
        out.print(f"registered {name}@{version} ref={ref} {entry.digest}", highlight=False)


@models_app.command("list")
def list_models(as_json: bool = JsonOpt, bootstrap: Optional[str] = BootstrapOpt, topic: Optional[str] = TopicOpt,
                config: Optional[Path] = ConfigOpt) -> None:
    """Every model name with its versions and aliases."""
    state = _run(lambda: _registry(bootstrap, topic, config).state())
    rows = [{"name": n, "versions": sorted(state.versions[n]), "aliases": dict(sorted(state.aliases.get(n, {}).items()))}
            for n in state.names()]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("name", "versions", "aliases")
    for row in rows:
        table.add_row(row["name"], ", ".join(map(str, row["versions"])),
                      ", ".join(f"{a}={v}" for a, v in row["aliases"].items()))
    out.print(table)


@models_app.command("show")
def show(name: str = typer.Argument(..., help="Model name."), as_json: bool = JsonOpt,
         bootstrap: Optional[str] = BootstrapOpt, topic: Optional[str] = TopicOpt, config: Optional[Path] = ConfigOpt) -> None:
    """One model's versions (ref, digest, precision, created, notes) and the aliases on each."""
    state = _run(lambda: _registry(bootstrap, topic, config).state())
    if name not in state.versions:
        _run(lambda: state.resolve(name))  # the one-line 'not in the registry' error
    aliases = state.aliases.get(name, {})
    versions = [{**v.to_json(), "aliases": sorted(a for a, n in aliases.items() if n == v.version)}
                for _, v in sorted(state.versions[name].items())]
    if as_json:
        out.print_json(json.dumps({"name": name, "aliases": aliases, "versions": versions}))
        return
    table = Table("version", "aliases", "ref", "precision", "digest", "created", "notes")
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_at"]))
        table.add_row(str(v["version"]), ", ".join(v["aliases"]), v["ref"], v["precision"], v["digest"][:19] + "...",
                      created, v["notes"])
    out.print(table)


@models_app.command("alias")
def alias(name: str = typer.Argument(..., help="Model name."), alias_name: str = typer.Argument(..., metavar="ALIAS"),
          version: Optional[int] = typer.Argument(None, help="Version to point at; leave out with --remove."),
          remove: bool = typer.Option(False, "--remove", help="Remove the alias."),
          bootstrap: Optional[str] = BootstrapOpt, topic: Optional[str] = TopicOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Point an alias (champion, challenger, any name) at a version."""
    if (version is None) != remove:
        fail("give a VERSION, or --remove to delete the alias")
    _run(lambda: _registry(bootstrap, topic, config).set_alias(name, alias_name, version))
    out.print(f"{name}@{alias_name} -> {version if version is not None else 'removed'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
