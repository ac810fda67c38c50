"""The package layers of docs/architecture.md, checked on the source and at run time.

- The contracts in ``.importlinter`` (import-linter): the engine imports nothing of the service,
  the core imports neither the HTTP layer nor torch, the worker never imports the HTTP layer.
- No import cycle anywhere in the repository (function-level imports count; ``TYPE_CHECKING``
  imports do not, since they never run).
- The Alembic scripts import the core's ORM, never the HTTP layer.
- Importing every module of the core loads neither FastAPI nor torch.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dns_core", "service", "api", "worker", "netsurgery")


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--config", str(ROOT / ".importlinter"), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


def _cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in imports.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_repository() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    imports = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    assert sum(map(len, imports.values())) > 100, "the graph is implausibly small: are the packages found?"
    cycles = _cycles(imports)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
    # graphlib agrees: the graph orders topologically
    tuple(graphlib.TopologicalSorter(imports).static_order())


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_migrations_import_the_core_not_the_http_layer() -> None:
    scripts = sorted((ROOT / "migrations").rglob("*.py"))
    assert scripts
    used = {script.relative_to(ROOT).as_posix(): _imported_roots(script) for script in scripts}
    assert "service" in used["migrations/env.py"]
    offending = {name: roots & {"api", "worker", "netsurgery"} for name, roots in used.items()}
    assert not any(offending.values()), offending


@pytest.mark.parametrize(
    ("package", "absent"),
    [
        ("service", ["fastapi", "starlette", "torch", "dns_core", "api", "worker"]),
        ("dns_core", ["fastapi", "starlette", "celery", "sqlalchemy", "pydantic", "service", "api"]),
    ],
)
def test_importing_a_layer_loads_nothing_above_it(package: str, absent: list[str]) -> None:
    """Every module of the package imported in a fresh interpreter: none of ``absent`` gets loaded."""
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        package = importlib.import_module({package!r})
        names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        print(" ".join(sorted(m for m in {absent!r} if m in sys.modules)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, loaded = [*done.stdout.splitlines(), ""][:2]
    assert int(count) > 3
    assert loaded == "", f"importing {package} loads {loaded}"
