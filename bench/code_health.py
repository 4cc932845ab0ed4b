"""Code-health figures for spotbatch/: import cycles, the largest module and function.

Run:  .venv/bin/python bench/code_health.py [--json] [--root spotbatch]

Cycles count every import in a module, lazy ones inside functions included (they
still tie the modules together), resolved to spotbatch modules as import-linter does; a cycle is a strongly
connected component of more than one module. Sizes count lines. Generated code
(spotbatch/scaler/proto) is left out. For duplicate blocks, the workplace tool
``duplicates`` reads the same tree.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

_SKIP = ("scaler/proto",)


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        if any(part in str(rel) for part in _SKIP):
            continue
        name = ".".join(rel.with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` depends on pkg.sub (as import-linter reads it); on pkg
            # itself only for names that are not submodules.
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in known] or [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def largest_function(paths: dict[str, Path]) -> tuple[str, int]:
    best = ("", 0)
    for name, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                size = node.end_lineno - node.lineno + 1
                if size > best[1]:
                    best = (f"{name}.{node.name}", size)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--root", default="spotbatch")
    args = ap.parse_args(argv)
    paths = modules(Path(args.root).resolve())
    graph = {name: imports(name, path, set(paths)) for name, path in paths.items()}
    found = cycles(graph)
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in paths.items()}
    module = max(sizes, key=sizes.__getitem__)
    function, lines = largest_function(paths)
    report = {"modules": len(paths), "cycles": len(found), "modules_in_cycles": sum(map(len, found)),
              "cycle_members": found, "largest_module": {"name": module, "lines": sizes[module]},
              "largest_function": {"name": function, "lines": lines}}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"modules {report['modules']}, import cycles {report['cycles']} "
              f"({report['modules_in_cycles']} modules in them)")
        for comp in found:
            print("  cycle:", " <-> ".join(comp))
        print(f"largest module {module} ({sizes[module]} lines); largest function {function} ({lines} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
