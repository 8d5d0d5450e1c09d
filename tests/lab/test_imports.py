"""The lab's import graph: acyclic, and each module importing only what its concern needs
(plots take arrays, the statistics write nothing)."""

from __future__ import annotations

import ast
from pathlib import Path

import moelab.lab

LAB = Path(moelab.lab.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(LAB.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in LAB.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The moelab modules `path` imports, at any level (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs or {node.module}  # `from pkg import submodule` imports the submodule
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("moelab.")}


GRAPH = {name: _imports(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def test_lab_imports_have_no_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        assert name not in stack, " -> ".join([*stack[stack.index(name):], name])
        if name in done:
            return
        for dep in sorted(GRAPH[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


def test_plots_and_statistics_stay_in_their_lane() -> None:
    assert not {m for m in _imports(MODULES["moelab.lab.plots"]) if m.startswith("moelab.lab.specialization")}
    stats = _imports(MODULES["moelab.lab.specialization.stats"])
    assert not stats & {"moelab.io", "moelab.lab.plots", "moelab.lab.report", "moelab.lab.specialization.analysis"}
    assert not {m for m in _imports(MODULES["moelab.lab.report"]) if m.startswith("moelab.lab.specialization")}
    for name in MODULES:
        if name.startswith("moelab.lab.experiments"):  # descriptions: no orchestration, no report
            assert not GRAPH[name] & {"moelab.lab.failures", "moelab.lab.report", "moelab.lab.demo"}, name
