"""One import name: the project installs the `mome` package and nothing else at the top level, and Flower finds its
apps in the installed package (not in the source tree or the app folder)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("common", "client", "server", "sim", "deploy", "cli")


def _top_level(names: list[str]) -> set[str]:
    """Importable top-level names among installed file paths (dist-info folders and scripts are not modules)."""
    tops = set()
    for name in names:
        first = name.split("/")[0]
        if first.endswith((".dist-info", ".egg-info")) or first in ("..", "bin") or first.startswith("__editable__"):
            continue
        tops.add(first.removesuffix(".py"))
    return tops


def test_the_distribution_declares_only_mome():
    dist = distribution("mome-fl")
    assert (dist.read_text("top_level.txt") or "").split() == ["mome"]
    assert [ep.value for ep in dist.entry_points.select(group="console_scripts", name="mome")] == ["mome.cli.main:main"]


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory) -> tuple[Path, Path]:
    """(python, site-packages) of a fresh virtual environment holding a regular (non-editable) install of the project;
    the dependencies are borrowed from this environment's site-packages by path, without its .pth files (so the
    editable install here cannot answer an import there)."""
    root = tmp_path_factory.mktemp("clean")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    source = root / "source"  # a copy: pip builds in the source tree and would leave build/ in the checkout
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, cwd=root)
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_a_regular_install_puts_only_mome_at_the_top_level(clean_env):
    _, site = clean_env
    record = next(site.glob("mome_fl-*.dist-info")) / "RECORD"
    installed = [line.split(",")[0] for line in record.read_text().splitlines() if line]
    assert _top_level(installed) == {"mome"}, sorted(_top_level(installed))
    assert not any((site / name).exists() for name in LAYERS)


def test_flower_loads_both_apps_from_the_installed_package(clean_env, tmp_path):
    python, site = clean_env
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    code = (
        "import importlib.util, sys\n"
        "from flwr.supercore.object_ref import load_app\n"
        "for ref in sys.argv[2:4]:\n"
        "    app = load_app(ref, RuntimeError, project_dir=sys.argv[1])\n"
        "    module = sys.modules[ref.split(':')[0]]\n"
        "    print(type(app).__name__, module.__file__)\n"
        "print('bare:', [n for n in sys.argv[4:] if importlib.util.find_spec(n)])\n"
    )
    empty_app_dir = tmp_path / "app"
    empty_app_dir.mkdir()
    refs = [components["serverapp"], components["clientapp"]]
    # -I: no PYTHONPATH (Flower's Ray backend puts the test process's sys.path there), no script folder on sys.path
    out = subprocess.run([python, "-I", "-c", code, str(empty_app_dir), *refs, *LAYERS], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ServerApp ") and lines[1].startswith("ClientApp "), out.stdout
    for line in lines[:2]:
        assert Path(line.split(" ", 1)[1]).is_relative_to(site / "mome"), line
    assert lines[2] == "bare: []", "a generic top-level name resolves in the clean environment"


def test_the_checker_sees_a_stray_top_level_module():
    assert _top_level(["mome/__init__.py", "common/config.py", "helpers.py", "mome_fl-0.1.0.dist-info/RECORD",
                       "../../bin/mome"]) == {"mome", "common", "helpers"}
