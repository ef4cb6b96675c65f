"""The layering: `metatta` is the library and never imports the Ray layer (`trainers`), which
only distributes the library's loops and stays small."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from repo_scripts import ROOT

RAY_PACKAGE = "trainers"
MAX_RAY_FILE_LINES = 260


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, wherever it stands (top level or in a function)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_the_library_never_imports_the_ray_layer():
    files = sorted((ROOT / "metatta").rglob("*.py"))
    assert len(files) > 20, files  # the scan sees the package
    upward = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files
              for line, module in imported_modules(path)
              if module == RAY_PACKAGE or module.startswith(RAY_PACKAGE + ".")]
    assert not upward, "metatta must not import the Ray layer:\n" + "\n".join(upward)


def test_ray_layer_files_stay_small():
    files = sorted((ROOT / RAY_PACKAGE).glob("*.py"))
    assert files
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_RAY_FILE_LINES}
    assert not long, f"Ray-layer files over {MAX_RAY_FILE_LINES} lines (move plain logic into metatta/): {long}"


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(f"def f():\n    from {RAY_PACKAGE}.mgg import train_mgg\n    import {RAY_PACKAGE}\n")
    assert [m for _, m in imported_modules(probe)] == [f"{RAY_PACKAGE}.mgg", RAY_PACKAGE]


def test_the_ray_layer_is_not_installed_under_its_generic_name():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["metatta*"]


def test_a_launcher_finds_the_ray_layer_from_any_working_directory(tmp_path):
    launcher = ROOT / "launch" / "train_mgg.py"
    code = f"import runpy; runpy.run_path({str(launcher)!r}); import trainers.mgg; print(trainers.mgg.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(ROOT / "trainers" / "mgg.py")
