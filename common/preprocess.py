"""Deterministic MONAI preprocessing of one case and its inverse for writing predictions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, NormalizeIntensityd, Resized


def case_transform(size: int) -> Compose:
    """Per-channel z-score over the head (non-zero voxels), then resample to size^3."""
    shape = (size, size, size)
    return Compose([
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        Resized(keys="image", spatial_size=shape, mode="trilinear", align_corners=False),
        Resized(keys="label", spatial_size=shape, mode="nearest", allow_missing_keys=True),
    ])


def intensity_stats(image: np.ndarray, present: np.ndarray) -> np.ndarray:
    """log1p of the raw foreground mean and std per channel: scanner-level cues for the gate."""
    stats = np.zeros((image.shape[0], 2), dtype=np.float32)
    for c in np.flatnonzero(present):
        voxels = np.abs(image[c][image[c] != 0])
        if voxels.size:
            stats[c] = np.log1p([voxels.mean(), voxels.std()])
    return stats.reshape(-1)


def resize_probs(probs: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Probabilities [C, s, s, s] back to the case's original voxel grid."""
    out = F.interpolate(probs[None].float(), size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0].numpy()
