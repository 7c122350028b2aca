"""Shared fixtures: a tiny synthetic federation written once per test session."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from common.config import Config

TINY = Config(size=24, target_spacing="1,1,1", patch_size="24,24,24")  # planned: cases preprocessed
# a federation run in seconds: tiny networks, one round of each phase
TINY_RUN = Config(size=24, channels="8,16,32", stem_channels=4, warmup_rounds=1, warmup_epochs=1, expert_epochs=1,
                  gate_steps=2, personalise_epochs=1, gate_rounds=2, batch_size=2,
                  min_cases=1)  # the tiny sites hold 2 held-out cases; tests of min-cases set it back
TINY_OVERRIDES = " ".join(f"{k}={v}" for k, v in TINY_RUN.to_run_config().items() if k != "strategy" and v != "")


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory) -> list[Path]:
    """Four 24^3 sites of the mixed preset (read-only: copy before corrupting)."""
    from sim.synth import generate_federation

    out = tmp_path_factory.mktemp("federation")
    return generate_federation(out, sites=4, preset="mixed", seed=0, size=24, cases=4, test_cases=2)


@pytest.fixture(scope="session")
def two_sites(tmp_path_factory) -> list[Path]:
    """Two 24^3 sites (a standard one and a convention-minority one), read-only."""
    from sim.synth import generate_federation

    return generate_federation(tmp_path_factory.mktemp("fed2"), sites=2, preset="mixed", seed=1, size=24,
                               cases=4, test_cases=2)


@pytest.fixture
def site_copy(tiny_federation, tmp_path) -> Path:
    """A private copy of the first site to corrupt."""
    return Path(shutil.copytree(tiny_federation[0], tmp_path / tiny_federation[0].name))


def tree_checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: with other processes on the 2 cores, a 2-thread pool stalls at barriers (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
