"""Patches on the plan's canonical grid: foreground-balanced, augmented training patches (MONAI) and
sliding-window inference with Gaussian blending, one case at a time."""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import SlidingWindowInferer
from monai.transforms import (Compose, Lambdad, RandAdjustContrastd, RandAffined, RandCropByPosNegLabeld, RandFlipd,
                              RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd,
                              RandSimulateLowResolutiond, SpatialPadd)

from mome.common.cases import CASE_KEYS
from mome.common.config import MAX_SIDE, Config
from mome.common.labels import LabelSpec


def fit_patch(shape: Sequence[float], max_voxels: int, divisor: int, max_side: int = MAX_SIDE) -> tuple[int, int, int]:
    """`shape` rounded up to the divisor (each side at most max_side), then shrunk along the side largest relative
    to `shape` until it holds at most max_voxels (never below the divisor)."""
    top = max(divisor, max_side // divisor * divisor)
    patch = [min(top, max(divisor, divisor * math.ceil(s / divisor))) for s in shape]
    while math.prod(patch) > max_voxels and max(patch) > divisor:
        axis = max((a for a in range(3) if patch[a] > divisor), key=lambda a: (patch[a] / max(shape[a], 1), patch[a]))
        patch[axis] -= divisor
    return tuple(int(p) for p in patch)


@dataclass(frozen=True)
class Window:
    """How whole cases are inferred: windows of at most max_voxels, blended with Gaussian weights."""

    max_voxels: int
    overlap: float
    divisor: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Window":
        return cls(cfg.infer_voxels, cfg.sw_overlap, cfg.divisor)

    def roi(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The window for a case of this shape: the whole case when it fits max_voxels (one forward, no blending
        seams), else the window within max_voxels that computes the fewest voxels in all (windows x window size):
        every window costs a forward per expert, and shrinking all three sides a little would double the windows
        along each."""
        fitting = []  # (voxels computed, windows, roi)
        for pick in itertools.product(*(self._sides(s) for s in shape)):  # (windows, side) along each axis
            windows, roi = math.prod(n for n, _ in pick), tuple(side for _, side in pick)
            if math.prod(roi) <= self.max_voxels:
                fitting.append((windows * math.prod(roi), windows, roi))
        # a case too large for `most` windows per axis: every side shrunk together, as for training patches
        return min(fitting)[2] if fitting else fit_patch(shape, self.max_voxels, self.divisor, max_side=max(shape))

    def _sides(self, size: int, most: int = 12) -> list[tuple[int, int]]:
        """(n, the smallest divisor-aligned side that covers `size` in n windows at this overlap), n = 1..most."""
        out = []
        for n in range(1, most + 1):
            side = size / (1 + (n - 1) * (1 - self.overlap))
            side = max(self.divisor, self.divisor * math.ceil(side / self.divisor))
            if not out or side < out[-1][1]:
                out.append((n, side))
        return out

    def infer(self, network: Callable[[torch.Tensor, int], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """network(window [1, M, ...], case index) -> logits, over every case of the batch image [B, M, ...]."""
        outs = []
        roi = self.roi(image.shape[2:])
        inferer = SlidingWindowInferer(roi, sw_batch_size=1, overlap=self.overlap, mode="gaussian")
        with warnings.catch_warnings():  # MONAI 1.5 indexes with lists internally, which torch 2.13 warns about
            warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
            for i in range(image.shape[0]):
                outs.append(inferer(image[i:i + 1], lambda x, i=i: network(x, i)))
        return torch.cat(outs)


def augmentation(cfg: Config, spec: LabelSpec) -> Compose:
    """A random training patch of a case (half of them centred on the target), augmented as nnU-Net does on
    MONAI's transforms: flips, small rotations and scaling, intensity scale/shift, gamma, noise, low resolution."""
    keys = ("image", "label")
    return Compose([
        SpatialPadd(keys, spatial_size=cfg.patch),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=cfg.patch, pos=1, neg=1, num_samples=1),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandAffined(keys, prob=0.2, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        # nnU-Net's blur: another scanner's softer reconstruction kernel or a resampled scan
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=cfg.aug_blur),
        RandSimulateLowResolutiond("image", prob=0.15, zoom_range=(0.5, 1.0)),  # thick-slice / resampled scans
        Lambdad("label", lambda label: torch.from_numpy(spec.to_target(np.asarray(label[0]).round()))),
    ])


def _as_tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v.as_tensor() if hasattr(v, "as_tensor") else v for k, v in batch.items()}


class PatchLoader:
    """Re-iterable: each pass draws one augmented patch per case, in a fresh shuffled order, batched."""

    def __init__(self, cases: Sequence[dict], cfg: Config, spec: LabelSpec, seed: int | None = None):
        items = [{"image": c["image"], "label": c["label"][None].float(), **{k: c[k] for k in CASE_KEYS}}
                 for c in cases]
        seed = cfg.seed if seed is None else seed
        transform = augmentation(cfg, spec)
        transform.set_random_state(seed=seed)
        self.loader = DataLoader(Dataset(items, transform), batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                                 generator=torch.Generator().manual_seed(seed))
        self.n_cases = len(items)

    def __iter__(self) -> Iterable[dict[str, torch.Tensor]]:
        return (_as_tensors(b) for b in self.loader)

    def __len__(self) -> int:
        return len(self.loader)
