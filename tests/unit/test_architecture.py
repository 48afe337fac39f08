"""The package's floors, checked on the import graph: no cycle, no import from a higher floor, small files.

The floors are read from CONTRIBUTING.md's layer table (the row's backticked module patterns, lowest floor
first), so the document and the check cannot drift apart. Every import counts, the ones inside functions
too: a cycle hidden behind a function-local import is still a cycle. A module may import its own floor and
the floors below it; within a floor the graph must stay acyclic.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

from fipray.importgraph import module_imports

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 450  # lines of a module, everything counted
MAX_FUNCTION_LINES = 60  # code lines of a function body: no docstring, comments or blank lines


def floors(contributing: Path = ROOT / "CONTRIBUTING.md") -> list[tuple[str, list[str]]]:
    """[(floor name, [module patterns])] from the table under '## Layers', lowest floor first."""
    text = contributing.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        rows.append((cells[0], re.findall(r"`([\w.*]+)`", cells[1])))
    return rows


def modules(root: Path, package: str = "fipray") -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    found = {}
    for p in sorted((root / package).rglob("*.py")):
        name = ".".join(p.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = p
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (function-local imports included)."""
    return {name: module_imports(path.read_text(), name, path.name == "__init__.py", mods.__contains__)
            for name, path in mods.items()}


def floor_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """Index of the first floor whose patterns match the module (None: in no floor)."""
    for i, (_, patterns) in enumerate(table):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(root: Path, table: list[tuple[str, list[str]]], package: str = "fipray") -> list[str]:
    """Every module in no floor, every import from a higher floor, and every cycle, as messages."""
    graph = imports(modules(root, package))
    out = [f"{m} is in no floor of CONTRIBUTING.md's layer table" for m in graph if floor_of(m, table) is None]
    for m, deps in sorted(graph.items()):
        fm = floor_of(m, table)
        for d in sorted(deps):
            fd = floor_of(d, table)
            if fm is not None and fd is not None and fd > fm:
                out.append(f"{m} ({table[fm][0]}) imports {d} from a higher floor ({table[fd][0]})")
    out += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return out


def test_the_table_names_every_floor_once():
    table = floors()
    assert len(table) >= 8, table
    patterns = [p for _, ps in table for p in ps]
    assert len(patterns) == len(set(patterns))


def test_no_cycle_and_no_upward_import():
    assert violations(ROOT, floors()) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


TOY_TABLE = [("low", ["pkg.low", "pkg.low.*"]), ("high", ["pkg", "pkg.high"])]


def test_a_planted_upward_import_fails(tmp_path):
    root = _plant(tmp_path, {"__init__.py": "", "low/__init__.py": "", "high.py": "",
                             "low/x.py": "def f():\n    from pkg import high  # upward, hidden in a function\n"})
    assert violations(root, TOY_TABLE, "pkg") == [
        "pkg.low.x (low) imports pkg.high from a higher floor (high)"]


def test_a_planted_cycle_through_relative_imports_fails(tmp_path):
    root = _plant(tmp_path, {"__init__.py": "", "high.py": "", "low/__init__.py": "",
                             "low/a.py": "from . import b\n", "low/b.py": "def f():\n    from .a import g\n"})
    assert violations(root, TOY_TABLE, "pkg") == ["import cycle: pkg.low.a <-> pkg.low.b"]


def test_every_module_is_small():
    big = {str(p.relative_to(ROOT)): n for p in modules(ROOT).values()
           if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert big == {}, f"modules over {MAX_FILE_LINES} lines: split them by concern"


def function_sizes(path: Path) -> dict[str, int]:
    """Qualified function name -> code lines of its body (docstring, comments and blank lines left out)."""
    lines = path.read_text().splitlines()
    sizes = {}
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
                body = body[1:]
            code = [s for s in lines[body[0].lineno - 1: node.end_lineno] if s.strip() and not
                    s.strip().startswith("#")]
            sizes[f"{node.name}:{node.lineno}"] = len(code)
    return sizes


def test_every_function_is_short():
    long = {f"{p.relative_to(ROOT)}:{f}": n for p in modules(ROOT).values()
            for f, n in function_sizes(p).items() if n > MAX_FUNCTION_LINES}
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} code lines: one job each"


@pytest.mark.parametrize("pattern", [p for _, ps in floors() for p in ps])
def test_every_pattern_matches_a_module(pattern):
    assert any(fnmatch.fnmatchcase(m, pattern) for m in modules(ROOT)), f"{pattern} matches no module"
