"""The package's layout holds: layers import only downwards, no import circle, Ray only where it belongs,
no module doing two things (over 450 lines). Read from the source, so a new import that breaks a rule
fails here with the module and the import named."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mae_search"
BOTTOM = {"config", "parsing", "metrics", "storage"}
# What each part may import from the package (itself included); cli may import anything.
ALLOWED = {
    "bottom": BOTTOM,
    "mae": BOTTOM | {"mae"},
    "data": BOTTOM | {"data"},
    "training": BOTTOM | {"mae", "data", "training"},
    "search": BOTTOM | {"mae", "data", "training", "search"},
    "report": BOTTOM | {"search", "report"},
}
RAY_ALLOWED = ("search.", "data.prepare")
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted names below mae_search (``search.run``, ``cli``) -> their files."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module of the package or top-level package this file imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "mae_search" or node.module.startswith("mae_search."):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def package_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules this file imports (``from mae_search.search import run`` names search.run)."""
    out = set()
    for name in imports(path):
        if name.startswith("mae_search."):
            name = name.removeprefix("mae_search.")
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and not name.endswith("__init__"):
                out.add(name)
    return out


def part(module: str) -> str:
    top = module.split(".")[0]
    return "bottom" if top in BOTTOM else top


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: package_imports(p, known) - {m} for m, p in known.items()}


def test_each_part_imports_only_the_parts_below_it():
    wrong = [f"{m} imports {dep}" for m, deps in graph().items() if part(m) in ALLOWED
             for dep in sorted(deps) if dep.split(".")[0] not in ALLOWED[part(m)]]
    assert not wrong, wrong


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_ray_only_in_search_and_prepare():
    users = [m for m, p in modules().items() if any(n == "ray" or n.startswith("ray.") for n in imports(p))]
    assert users and all(m.startswith(RAY_ALLOWED) for m in users), users


def test_no_module_over_450_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_report_loads_without_ray_or_training():
    """Regenerating a report needs neither a Ray installation nor torch (a laptop with the results table)."""
    code = ("import sys, mae_search.report.build, mae_search.report.terminal; "
            "print(sorted(m for m in ('ray', 'torch', 'mae_search.training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
