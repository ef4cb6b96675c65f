"""Imports of the project's own modules stand at the top of each file, where a reader sees what a
file depends on (and an import cycle shows at once instead of hiding in a function body).
Optional third-party packages (ray, mlflow, optuna, matplotlib, ...) may still be imported lazily.
The scripts (benchmarks/, launch/) use the library's public names only."""
from __future__ import annotations

import ast
from pathlib import Path

from repo_scripts import ROOT

PROJECT_PACKAGES = ("metatta", "trainers")
SCANNED = ("metatta", "trainers", "launch", "benchmarks")
SCRIPTS = ("launch", "benchmarks")
# being cleaned in the final pass: these files still import project modules inside functions
EXEMPT = {
}


def imports_inside_functions(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module inside a function or method body."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            found += [(node.lineno, m) for m in modules if m.split(".")[0] in PROJECT_PACKAGES]
    return sorted(set(found))


def exempt(relative: str) -> bool:
    return any(relative == e or relative.startswith(e + "/") for e in EXEMPT)


def test_project_imports_are_at_the_top_of_every_file():
    files = sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 50, files  # the scan sees the tree
    inner = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files
             if not exempt(str(path.relative_to(ROOT).as_posix()))
             for line, module in imports_inside_functions(path)]
    assert not inner, "import the project's modules at the top of the file:\n" + "\n".join(inner)


def test_the_scan_sees_project_imports_in_functions_and_methods_only(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import metatta.config\n"
                     "def f():\n    import ray\n    from metatta.experiment import run_experiment\n"
                     "class C:\n    def g(self):\n        import trainers.mgg, json\n"
                     "async def h():\n    from mlflow import log_metric\n")
    assert imports_inside_functions(probe) == [(4, "metatta.experiment"), (7, "trainers.mgg")]


def private_names_used(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every private name (leading underscore) a file takes from a project module:
    imported from it, or read as an attribute of a module or name imported from the project."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in PROJECT_PACKAGES:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if any(part.startswith("_") for part in [*node.module.split("."), a.name])]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names
                        if a.name.split(".")[0] in PROJECT_PACKAGES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) and node.value.id in modules:
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return sorted(found)


def test_scripts_use_public_names_of_the_library_only():
    files = sorted(p for folder in SCRIPTS for p in (ROOT / folder).glob("*.py"))
    assert len(files) > 10, files
    private = [f"{path.relative_to(ROOT)}:{line} uses {name}" for path in files
               for line, name in private_names_used(path)]
    assert not private, "scripts call the public API (make the name public or move the code):\n" + "\n".join(private)


def test_the_private_name_scan_sees_imports_and_module_attributes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import json\nfrom metatta import reporting\nfrom metatta.reporting import _short, error_table\n"
                     "from trainers._x import y\nreporting._short('a')\njson._default_encoder\nerror_table._cache\n")
    assert private_names_used(probe) == [(3, "metatta.reporting._short"), (4, "trainers._x.y"),
                                         (5, "reporting._short"), (7, "error_table._cache")]
