"""Imports run downward: ground floor (bench/ without the top) < middle (defenses/, attacks/,
reports/, installed as bench.defenses, bench.attacks, bench.reports) < top (runner, CLI, API).

Every import statement of every module is read with ``ast`` (imports inside functions too), so a
lazy upward import counts as much as one at the top of a file."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders and the import name they install as (pyproject's package-dir).
PACKAGES = {"bench": "bench", "defenses": "bench.defenses", "attacks": "bench.attacks", "reports": "bench.reports"}
MIDDLE = ("bench.defenses", "bench.attacks", "bench.reports")
# The top floor: the public API and the shells over it. A new module that runs or schedules
# whole evaluations belongs here; everything else in bench/ is ground floor.
TOP = ("bench", "bench.__main__", "bench.api", "bench.cli", "bench.runner", "bench.jobs", "bench.executors", "bench.perf",
       "bench.evaluation", "bench.lifecycle",
       "bench.overhead", "bench.reproduce")


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py"))}


def imported(path: Path, name: str) -> set[str]:
    """Every module an import statement in ``path`` names (``from bench import x`` names ``bench.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
            found.add(base)
    return {m for m in found if m.startswith("bench.")}


def floor(name: str) -> int:
    if name in TOP:
        return 2
    if any(name == m or name.startswith(m + ".") for m in MIDDLE):
        return 1
    return 0


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def upward_imports() -> list[str]:
    known = modules()
    problems = []
    for name, path in known.items():
        for target in imported(path, name):
            target = target if target in known or floor(target) != 0 else target.rpartition(".")[0]
            if floor(target) > floor(name):
                problems.append(f"{name} imports {target}")
            elif floor(name) == 1 == floor(target):
                own = next(m for m in MIDDLE if within(name, m))
                if not within(target, own):
                    problems.append(f"{name} imports {target} (middle floors import only the ground floor)")
    return sorted(problems)


def test_the_layer_map_knows_every_module():
    names = modules()
    for expected in ("bench.registry", "bench.types", "bench.store", "bench.metrics", "bench.confidence",
                     "bench.datasets.cifar", "bench.defenses.pixeldp", "bench.attacks.pgd", "bench.reports.tables",
                     "bench.runner", "bench.cli"):
        assert expected in names
    assert floor("bench.store") == 0 and floor("bench.datasets.cifar") == 0
    assert floor("bench.reports.tables") == 1 and floor("bench.defenses") == 1
    assert floor("bench.runner") == 2 and floor("bench.cli") == 2


def test_the_check_finds_an_upward_import(tmp_path):
    ground = tmp_path / "store.py"
    ground.write_text("def f():\n    from bench.reports.tables import build_tables\nfrom . import runner\n")
    assert imported(ground, "bench.store") >= {"bench.reports.tables", "bench.runner"}


@pytest.mark.parametrize("floor_name", ["ground", "middle"])
def test_imports_run_downward_only(floor_name):
    level = {"ground": 0, "middle": 1}[floor_name]
    problems = [p for p in upward_imports() if floor(p.split()[0]) == level]
    assert problems == []


def import_cycles() -> list[list[str]]:
    """Groups of modules that import each other, directly or around a circle (Tarjan's strongly
    connected components of the import graph, imports inside functions included)."""
    known = modules()
    graph = {name: {t if t in known else t.rpartition(".")[0] for t in imported(path, name)} & set(known) - {name}
             for name, path in known.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_two_modules_import_each_other():
    # a package's __init__ re-exporting its modules is not a circle of logic: leave packages out
    cycles = [[m for m in group if m not in PACKAGES.values() and m != "bench"] for group in import_cycles()]
    assert [group for group in cycles if len(group) > 1] == []
