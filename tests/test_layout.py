"""The folder layout is the architecture: layers import only downwards, no module grows past a reader's hold,
and the README's layout table names exactly the packages there are."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# common (what both sides use) <- client (site) / server (coordinator) <- sim / deploy <- cli (the `mome` command)
LAYER = {"common": 0, "client": 1, "server": 1, "sim": 2, "deploy": 2, "cli": 3}
MAX_LINES = 350


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def _imported_packages(path: Path) -> set[str]:
    """The project layers a module imports (every project import is mome.<layer>...)."""
    return {name.split(".")[1] for name in _imported_modules(path) if name.startswith("mome.")} & set(LAYER)


@pytest.mark.parametrize("folder", [*sorted(LAYER), "tests", "benchmarks"])
def test_every_project_import_is_under_mome(folder):
    bare = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / folder).rglob("*.py"))
            for name in _imported_modules(path) if name.split(".")[0] in LAYER]
    assert not bare, bare


@pytest.mark.parametrize("package", sorted(LAYER))
def test_each_layer_imports_only_layers_below_it(package):
    wrong = [f"{path.relative_to(ROOT)} imports {other}" for path in _modules(package)
             for other in _imported_packages(path) if other != package and LAYER[other] >= LAYER[package]]
    assert not wrong, wrong


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mome.server.report import write_report\n    import mome.cli.main\n")
    assert _imported_packages(bad) == {"server", "cli"}


def test_no_module_grows_past_what_a_reader_can_hold():
    long = {str(p.relative_to(ROOT)): n for package in LAYER for p in _modules(package)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_readme_layout_table_names_every_package_and_nothing_else():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w]+)/` \|", table, flags=re.M))
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"benchmarks"}
    assert listed == on_disk, (listed, on_disk)
