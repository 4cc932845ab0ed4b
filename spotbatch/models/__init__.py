"""Model handlers: a small protocol (base.py), a registry, built-ins and users' models.

Names a job may give in its ``model`` field:

- a registered name: ``tiny`` (toy, deterministic, 8-d) or ``minilm``
  (all-MiniLM-L6-v2, 384-d), plus anything added with ``register``;
- ``torchscript:PATH``: a file saved with ``torch.jit.save`` (input column ``x``);
- ``export:PATH``: a file saved with ``torch.export.save`` (input column ``x``);
- ``st:PATH``: a sentence-transformers folder with mean pooling (input column ``text``).

The prefix is everything before the first colon, so PATH may itself hold colons.
Registered names cannot contain a colon, which keeps the two kinds apart.
``get_handler(..., model_dirs=[...])`` confines user paths to those folders; a worker
that takes jobs from people it does not fully trust should set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import JobError
from .base import ModelHandler, Outputs
from .minilm import minilm
from .tiny import TinyHandler
from .user import TensorModelHandler, sentence_folder

__all__ = ["ModelHandler", "Outputs", "USER_PREFIXES", "register", "get_handler", "available"]

USER_PREFIXES = ("torchscript", "export", "st")

_FACTORIES: dict[str, Callable[..., ModelHandler]] = {}


def register(name: str, factory: Callable[..., ModelHandler], *, replace: bool = False) -> None:
    """Make ``get_handler(name, **options)`` return ``factory(**options)``."""
    if not name or ":" in name or name != name.strip():
        raise ValueError(f"bad model name {name!r}: non-empty, no colon, no surrounding spaces")
    if name in _FACTORIES and not replace:
        raise ValueError(f"model {name!r} is already registered (pass replace=True to override)")
    _FACTORIES[name] = factory


def available() -> list[str]:
    """The registered names, sorted (user-model prefixes are in USER_PREFIXES)."""
    return sorted(_FACTORIES)


def get_handler(name: str, *, model_dirs: Iterable[str | Path] | None = None, **options: Any) -> ModelHandler:
    """A new, not yet loaded handler for ``name``; JobError("unknown_model") if none fits."""
    prefix, sep, path = name.partition(":") if isinstance(name, str) else ("", "", "")
    if sep and prefix in USER_PREFIXES:
        return _user_handler(prefix, _user_path(path, model_dirs), **options)
    if isinstance(name, str) and name in _FACTORIES:
        return _FACTORIES[name](**options)
    choices = ", ".join(available()) + ", " + ", ".join(f"{p}:PATH" for p in USER_PREFIXES)
    raise JobError("unknown_model", f"field 'model' is {name!r}; choose one of: {choices}")


def _user_handler(prefix: str, path: Path, **options: Any) -> ModelHandler:
    if prefix == "st":
        return sentence_folder(path, **options)
    return TensorModelHandler(prefix, path, **options)


def _user_path(raw: str, model_dirs: Iterable[str | Path] | None) -> Path:
    """Resolve and check a user model path now, so a typo fails the job at once."""
    if not raw:
        raise JobError(
            "unknown_model", "field 'model' names a user model but no path; e.g. torchscript:/models/m.pt"
        )
    path = Path(raw).expanduser().resolve()
    if model_dirs is not None:
        roots = [Path(d).expanduser().resolve() for d in model_dirs]
        if not any(path.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none"
            reason = f"model path {path} is outside the allowed model folders: {allowed}"
            raise JobError("unknown_model", reason)
    if not path.exists():
        raise JobError("unknown_model", f"model path {path} does not exist")
    return path


register("tiny", TinyHandler)
register("minilm", minilm)
