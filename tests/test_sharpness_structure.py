"""sharpjax.sharpness's modules import one another one way: no circle, not even a lazy one."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sharpjax" / "sharpness"


def imports_within_the_package(path: Path) -> set[str]:
    """Modules of sharpjax.sharpness that ``path`` imports anywhere (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] != ["sharpjax", "sharpness"]:
                continue
            # Importing the package runs its __init__, which imports every module.
            module = parts[2] if len(parts) > 2 else "__init__"
            if (PACKAGE / f"{module}.py").exists():
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imports_within_the_package(p) - {p.stem} for p in PACKAGE.glob("*.py")}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"curvature", "diagonal", "hvp", "lanczos"} <= set(graph)
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle in sharpjax.sharpness: {error.args[1]}")
    # The layers the package is built on come first.
    assert order.index("curvature") < order.index("hvp")
    assert order.index("curvature") < order.index("diagonal")


def test_the_checker_sees_a_cycle_through_a_lazy_import(tmp_path):
    # The check itself: a function-level import back up the layers counts as an edge.
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from sharpjax.sharpness.curvature import Operator\n")
    b.write_text("def f():\n    from sharpjax.sharpness import hvp\n")
    assert imports_within_the_package(a) == {"curvature"}
    assert imports_within_the_package(b) == {"__init__", "hvp"}


def test_matplotlib_is_imported_only_inside_the_plot_functions():
    # The light install has no matplotlib: importing the measures must not need it.
    for path in PACKAGE.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names]
                assert not any(n.startswith("matplotlib") for n in names), path.name
