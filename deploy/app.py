"""The app folder `flwr run` submits: the project itself, or a staged copy holding only the code."""

from __future__ import annotations

import logging
import shutil
import tomllib
from pathlib import Path
from typing import Any, Iterable

import tomli_w

from mome.common.config import COORDINATOR_KEYS, Config

log = logging.getLogger("mome.deploy")


def _app_config(project_dir: Path) -> dict[str, Any]:
    doc = tomllib.loads((project_dir / "pyproject.toml").read_text())
    return doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})


def app_for_run(project_dir: Path, keys: Iterable[str], stage_dir: Path, private: Iterable[Path] = ()) -> Path:
    """The app folder `flwr run` submits (as a FAB, to the SuperLink and every SuperNode).

    The project folder itself, unless (a) its [tool.flwr.app.config] lacks a key we override (Flower refuses
    overrides of undeclared keys) or (b) a private folder (site data, keys) lies inside it, where the FAB's
    *.json/*.toml patterns could pick files up. Then a staged copy holding only the code is submitted."""
    declared = _app_config(project_dir)
    missing = sorted(set(keys) - set(declared))
    inside = [Path(p).resolve() for p in private if Path(p).resolve().is_relative_to(project_dir.resolve())]
    if inside:  # only a problem if Flower would actually bundle something from there
        bundled = _fab_files(project_dir)
        inside = [p for p in inside if any(f.is_relative_to(p) for f in bundled)]
    if not missing and not inside:
        return project_dir
    if missing:
        log.warning("pyproject.toml [tool.flwr.app.config] lacks %s; submitting a staged copy of the app (%s) "
                    "that declares every Config key", ", ".join(missing), stage_dir)
    if inside:
        log.warning("%s inside the app folder: submitting a staged copy with the code only (%s)",
                    ", ".join(map(str, inside)), stage_dir)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    for entry in sorted(project_dir.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").exists() and entry.name != "tests":
            shutil.copytree(entry, stage_dir / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", ".gitignore"):
        if (project_dir / name).exists():
            shutil.copy2(project_dir / name, stage_dir / name)
    doc = tomllib.loads((project_dir / "pyproject.toml").read_text())
    table = doc.setdefault("tool", {}).setdefault("flwr", {}).setdefault("app", {}).setdefault("config", {})
    for key, value in {**Config().to_run_config(), **COORDINATOR_KEYS}.items():
        table.setdefault(key, value)
    (stage_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return stage_dir


def _fab_files(project_dir: Path) -> list[Path]:
    """The files `flwr run <project_dir>` would bundle (Flower's own selection: patterns and .gitignore)."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project_dir))) as fab:
        return [(project_dir / name).resolve() for name in fab.namelist()]

