"""Which modules a Python source file imports, read from its syntax tree (imports inside functions included).

One reader for the two places that need the package's import graph: the Serve code version (every module the
serving path reaches is hashed, `fipray.ray.serve_version`) and the architecture test (floors and cycles).
"""

from __future__ import annotations

import ast
from collections.abc import Callable


def module_imports(source: str, module: str, is_package: bool, exists: Callable[[str], bool]) -> set[str]:
    """The modules that `source` (the text of `module`) imports anywhere, relative imports resolved.

    Args:
        source: the file's text.
        module: its dotted name (a package by its own name, not `.__init__`).
        is_package: whether the file is a package's `__init__.py` (relative imports start from the package).
        exists: whether a dotted name is a module of interest; `from a import b` counts as `a.b` when that
            exists and as `a` otherwise, and a name that does not exist is cut back to its longest prefix that
            does (an imported function counts as its module). Names with no such prefix are left out.

    Returns:
        The imported modules, `module` itself left out.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and not exists(target):
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found
