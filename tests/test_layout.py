"""The package's shape, checked from its imports: no import circles, pure modules stay pure.

Read from the source with `ast` (every import counts, also the ones inside functions or under
TYPE_CHECKING: a deferred import that dodges a circle is still a circle), and for purity by
importing each pure module in a fresh interpreter and looking at what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "balancer"

# Decisions with no I/O: which server gets a call, which carrier, which server an agent logs into.
PURE = (
    "balancer.balance.model",
    "balancer.balance.planner",
    "balancer.balance.rules",
    "balancer.balance.fields",
    "balancer.carriers.routing",
    "balancer.agents.choice",
    "balancer.agents.facts",
    "balancer.agents.flag_rules",
    "balancer.live.health",
    "balancer.live.registry",
    "balancer.kamailio.model",
)
# Libraries that talk to the outside world; a pure module must not load any of them.
IO_MODULES = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "http",
    "urllib.request",
    "subprocess",
    "pymysql",
    "redis",
    "panoramisk",
    "tenacity",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The balancer modules one file imports (a `from pkg import name` of a submodule counts)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    found.add(sub)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports() -> None:
    graph = import_graph()
    assert "balancer.balance.rules" in graph["balancer.balance.planner"]
    assert "balancer.ops.metrics" in graph["balancer.daemon"]
    # a function-level import is an edge too
    assert "balancer.daemon" in graph["balancer.cli.run"]


def test_cycles_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_every_package_says_what_it_is_for() -> None:
    for init in PACKAGE.rglob("__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init.relative_to(ROOT)} has no docstring"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_no_io_library(module: str) -> None:
    probe = f"import sys, json; import {module}; print(json.dumps(sorted(m for m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(out.stdout))
    offending = sorted(
        name
        for name in loaded
        if any(name == io or name.startswith(f"{io}.") for io in IO_MODULES)
        or name.startswith(
            ("balancer.db.connection", "balancer.ami.session", "balancer.store.redis")
        )
    )
    assert offending == [], f"{module} loads I/O modules: {offending}"


def test_no_module_holds_two_things_in_many_lines() -> None:
    """A rough guard on size: nothing in balancer/ grows past 700 lines unnoticed."""
    big = {
        name: len(path.read_text().splitlines())
        for name, path in modules().items()
        if len(path.read_text().splitlines()) > 700
    }
    assert big == {}
