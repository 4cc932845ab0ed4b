"""No import cycles in spotbatch/, lazy imports included (issue 11's rule), read by the
same script that prints the figures (bench/code_health.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _code_health():
    spec = importlib.util.spec_from_file_location("code_health", REPO / "bench" / "code_health.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spotbatch_has_no_import_cycles():
    health = _code_health()
    paths = health.modules(REPO / "spotbatch")
    graph = {name: health.imports(name, path, set(paths)) for name, path in paths.items()}
    assert health.cycles(graph) == []


def test_the_cycle_finder_sees_a_lazy_import_cycle(tmp_path):
    health = _code_health()
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import thing  # lazy, still a cycle\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    paths = health.modules(pkg)
    graph = {name: health.imports(name, path, set(paths)) for name, path in paths.items()}
    assert health.cycles(graph) == [["pkg.a", "pkg.b"]]
