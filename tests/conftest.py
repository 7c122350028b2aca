"""Shared fixtures: one seed and one torch thread count for every test, quality floors reported with their margin,
and a tiny synthetic federation written once per test session."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mome.common.config import Config

TINY = Config(size=24, target_spacing="1,1,1", patch_size="24,24,24")  # planned: cases preprocessed
# a federation run in seconds: tiny networks, one round of each phase
TINY_RUN = Config(size=24, channels="8,16,32", stem_channels=4, warmup_rounds=1, warmup_epochs=1, expert_epochs=1,
                  gate_steps=2, personalise_epochs=1, gate_rounds=2, batch_size=2,
                  min_cases=1,  # the tiny sites hold 2 held-out cases; tests of min-cases set it back
                  min_sites=1)  # one- and two-site federations, and steps where one site is refused on purpose
TINY_OVERRIDES = " ".join(f"{k}={v}" for k, v in TINY_RUN.to_run_config().items() if k != "strategy" and v != "")


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> list[Path]:
    """Four 24^3 sites of the mixed preset (read-only: copy before corrupting)."""
    from mome.sim.synth import generate_federation

    out = tmp_path_factory.mktemp("federation")
    return generate_federation(out, sites=4, preset="mixed", seed=0, size=24, cases=4, test_cases=2)


@pytest.fixture(scope="session")
def two_sites(tmp_path_factory) -> list[Path]:
    """Two 24^3 sites (a standard one and a convention-minority one), read-only."""
    from mome.sim.synth import generate_federation

    return generate_federation(tmp_path_factory.mktemp("fed2"), sites=2, preset="mixed", seed=1, size=24,
                               cases=4, test_cases=2)


@pytest.fixture
def site_copy(tiny_federation, tmp_path) -> Path:
    """A private copy of the first site to corrupt."""
    return Path(shutil.copytree(tiny_federation[0], tmp_path / tiny_federation[0].name))


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# What a trained model's score may depend on, fixed here for the whole suite: a machine's own thread count changes
# the order of float sums (and so the trained weights); the simulation's sites run one thread each as well.
SEED = 0
TORCH_THREADS = 1
_QUALITY = pytest.StashKey[list]()


def _seed_everything() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(scope="session", autouse=True)
def fixed_torch():
    """One torch thread and one seed for every test and fixture (session-scoped: set before any module's training)."""
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    _seed_everything()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def reseeded(fixed_torch):
    """Each test starts from the same global RNG state, whatever ran before it."""
    _seed_everything()


@pytest.fixture
def quality(request):
    """quality(name, value, floor): assert a learned score clears its floor, and list it with its margin in the
    run's summary, so a log shows how close every quality assertion came."""
    def check(name: str, value: float, floor: float) -> None:
        request.config.stash.setdefault(_QUALITY, []).append((f"{request.node.name}: {name}", value, floor))
        assert value >= floor, f"{name} {value:.3f} < floor {floor}"
    return check


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(_QUALITY, [])
    if rows:
        terminalreporter.section("quality floors (value, floor, margin)")
        for name, value, floor in rows:
            terminalreporter.write_line(f"{value:7.3f} {floor:6.2f} {value - floor:+7.3f}  {name}")
