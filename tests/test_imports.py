"""Imports of the project's own modules stand at the top of each file, where a reader sees what a
file depends on (and an import cycle shows at once instead of hiding in a function body).
Optional third-party packages (ray, mlflow, optuna, matplotlib, ...) may still be imported lazily."""
from __future__ import annotations

import ast
from pathlib import Path

from repo_scripts import ROOT

PROJECT_PACKAGES = ("metatta", "trainers")
SCANNED = ("metatta", "trainers", "launch", "benchmarks")
# being cleaned in the final pass: these files still import project modules inside functions
EXEMPT = {
    "metatta/adapter_eval.py",
    "metatta/data/streams.py",
    "metatta/experiment.py",
    "metatta/learned",
    "metatta/methods",
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
