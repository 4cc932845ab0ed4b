"""What every CLI module shares: the consoles, the common options (and option groups
declared once for several verbs), one-line errors, settings loading, logging set-up and
help polish. The verbs' modules import from here; this module imports none of them."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.models import ArgumentInfo, DefaultPlaceholder, OptionInfo

from spotbatch.config import ConfigError, load_settings

__all__ = ["err", "out", "BootstrapOpt", "ConfigOpt", "JsonOpt", "fail", "load_or_exit", "setup_logging",
           "option_group", "polish_help", "ProgressLines"]

err = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line in logs
out = Console()

BootstrapOpt = typer.Option(None, "--bootstrap", help="Kafka bootstrap servers [env SPOTBATCH_KAFKA_BOOTSTRAP].")
ConfigOpt = typer.Option(None, "--config", help="YAML settings file [env SPOTBATCH_CONFIG].")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, as written (brackets in it are text, not rich markup), then exit."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
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


def option_group(options: Mapping[str, tuple[Any, Any]], *, into: str) -> Callable:
    """Options declared once and taken by several commands. ``options`` maps a parameter
    name to (its type, its ``typer.Option``); the decorated command's parameter ``into``
    stands for all of them, in that place of its --help (its own default, if any, is never
    used), and receives their values as one dict (name -> value). Groups stack."""

    def wrap(func: Callable) -> Callable:
        hints = typing.get_type_hints(func)
        params: list[inspect.Parameter] = []
        for param in inspect.signature(func).parameters.values():
            if param.name == into:
                params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                             annotation=annotation) for name, (annotation, option) in options.items()]
            else:
                params.append(param.replace(annotation=hints.get(param.name, param.annotation)))

        @functools.wraps(func)
        def command(**values: Any) -> Any:
            group = {name: values.pop(name) for name in options}
            return func(**values, **{into: group})

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": hints.get("return")}
        return command

    return wrap


def grouped(values: dict[str, Any] | None) -> dict[str, Any]:
    """An ``option_group`` parameter's values. Its declared default (None, needed where it
    sits among defaulted parameters) is never passed: the group's wrapper fills it."""
    if values is None:
        raise TypeError("an option_group parameter got no values; call the command through option_group")
    return values


# ---- help as users read it -----------------------------------------------------------------

class _Command(TyperCommand):
    """Usage lines as people write them (`spotbatch publish [OPTIONS] FILE`, not `{file}`);
    no `<bool>` after --help, no `<str>` after an argument's name."""

    def collect_usage_pieces(self, ctx):
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None  # the name column already says FILE
        return params


class _Group(TyperGroup):
    """No `<bool>` after a command group's --help either."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


def _metavar(name: str, annotation: object, info: OptionInfo | ArgumentInfo) -> str:
    """What to type, by the parameter's name and type: HOST:PORT, FILE, SECONDS, N, TOPIC..."""
    args = typing.get_args(annotation)
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    if base is bool:
        return ""  # a flag takes no value
    if name == "bootstrap":
        return "HOST:PORT"
    if base is Path:
        return "DIR" if name.endswith("dir") else "FILE"
    if name.endswith("_ms"):
        return "MS"
    if name.endswith("_s") or name.endswith("_seconds"):
        return "SECONDS"
    if name.endswith("port"):
        return "PORT"
    if base is int:
        return "N"
    if base is float:
        return "NUMBER"
    return name.upper()


def _default(cls: object, base: type) -> bool:
    """typer's own class (or a placeholder for it), which we may replace."""
    return cls is None or cls is base or isinstance(cls, DefaultPlaceholder)


def polish_help(app: typer.Typer) -> None:
    """Make every command's --help say what it means: help text shown as written (typer
    reads it as rich markup, so "[env SPOTBATCH_TOPIC]" vanished), a metavar that says what
    to type instead of <str>/<bool>, and usage lines without braces. Call once, after every
    command is registered."""
    done: set[int] = set()

    def walk(typer_app: typer.Typer) -> None:
        if _default(typer_app.info.cls, TyperGroup):
            typer_app.info.cls = _Group
        for info in typer_app.registered_commands:
            if _default(info.cls, TyperCommand):
                info.cls = _Command
            if info.callback is None:
                raise TypeError(f"command {info.name!r} was registered without a function")
            try:
                hints = typing.get_type_hints(info.callback)
            except Exception:  # noqa: BLE001 - an unresolvable annotation: metavars by name only
                hints = {}
            for name, param in inspect.signature(info.callback).parameters.items():
                default = param.default
                if not isinstance(default, (OptionInfo, ArgumentInfo)) or id(default) in done:
                    continue
                done.add(id(default))
                if default.help:
                    default.help = escape(default.help)
                if default.metavar is None:
                    default.metavar = _metavar(name, hints.get(name), default)
        for group in typer_app.registered_groups:
            if _default(group.cls, TyperGroup):
                group.cls = _Group
            if group.typer_instance is None:
                raise TypeError(f"command group {group.name!r} was registered without a Typer app")
            walk(group.typer_instance)

    walk(app)


class ProgressLines:
    """Progress for long work when stderr is not a terminal (a log, CI, `2> file`), where a
    rich bar draws nothing: one plain line at the start, then at most one every
    ``every_s``, and one at the end. On a terminal it stays silent (the bar shows)."""

    def __init__(self, what: str, *, every_s: float = 10.0, console: Console | None = None,
                 clock=time.monotonic) -> None:
        self._console = console or err
        self._what, self._every_s, self._clock = what, every_s, clock
        self._t0 = self._last = clock()
        self._on = not self._console.is_terminal
        if self._on:
            self._console.print(f"{what}: started", highlight=False, markup=False)

    def update(self, done: int, total: int | None) -> None:
        now = self._clock()
        if not self._on or (now - self._last < self._every_s and done != total):
            return
        self._last = now
        of = f"/{total} ({done / total:.0%})" if total else ""
        self._console.print(f"{self._what}: {done}{of} done, {now - self._t0:.0f}s elapsed",
                            highlight=False, markup=False)
