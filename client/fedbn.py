"""FedBN (Li et al., ICLR 2021): a site's normalisation layers never leave it. The site keeps its own (in its output
folder, across rounds and message processes), puts them into every shared model it is sent, and uploads the
normalisation parameters exactly as it received them, so the federation averages everything else."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mome.common.state import State

NORMS_FILE = "fedbn_norms.npz"


def with_own_norms(sent: State, keys: set[str], folder: Path | None) -> State:
    """The shared model with this site's own normalisation parameters where it has them (none before its first
    round)."""
    path = folder / NORMS_FILE if folder is not None else None
    if path is None or not path.exists():
        return sent
    with np.load(path) as own:
        return {k: own[k] if k in keys and k in own.files and own[k].shape == v.shape else v for k, v in sent.items()}


def keep_own_norms(trained: State, sent: State, keys: set[str], folder: Path | None) -> State:
    """Store the trained normalisation parameters at the site; return the update to upload (those as sent)."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / NORMS_FILE, **{k: trained[k] for k in keys if k in trained})
    return {k: sent[k] if k in keys else v for k, v in trained.items()}
