"""One picture of a segmentation: a slice through the lesion with the image, the reference and the prediction,
what a clinician looks at first. Drawn in the patient's frame (RAS, anterior up) whatever the files' orientation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLOURS = ("#ffd400", "#ff2d2d", "#2d9bff", "#00d17a", "#d12dff", "#ff8c00")  # label 1, 2, ...


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The volume in RAS axis order (a trailing singleton axis dropped) and its affine."""
    image = nib.as_closest_canonical(nib.squeeze_image(nib.load(path)))
    return np.asarray(image.dataobj), image.affine


def lesion_slice(labels: np.ndarray) -> int:
    """The axial slice with the most labelled voxels (the middle one if none is labelled)."""
    area = (labels > 0).sum(axis=(0, 1))
    return int(area.argmax()) if area.any() else labels.shape[2] // 2


def overlay_png(image: Path, prediction: Path, out: Path, reference: Path | None = None,
                names: dict[int, str] | None = None, title: str = "") -> Path:
    """Write `out`: the image, then the reference (if given) and the prediction over it, on the axial slice
    through the most lesion (of the reference, else of the prediction). All files must share one grid."""
    pixels, affine = _canonical(image)
    labels = [("reference", reference)] if reference is not None else []
    panels = [("image", None)]
    for heading, path in [*labels, ("prediction", prediction)]:
        values, grid = _canonical(path)
        if values.shape != pixels.shape[:3] or not np.allclose(grid, affine, atol=1e-3):
            raise ValueError(f"{path.name} is not on the grid of {image.name}")
        panels.append((heading, values.astype(int)))
    predicted = panels[-1][1]
    zooms = nib.affines.voxel_sizes(affine)
    z = lesion_slice(panels[1][1] if reference is not None else predicted)
    shown = np.rot90(pixels[..., z] if pixels.ndim == 3 else pixels[..., z, 0])
    low, high = np.percentile(shown, [1, 99]) if shown.size else (0, 1)
    values = sorted(int(v) for v in np.unique(np.concatenate([p.ravel() for _, p in panels[1:]])) if v > 0)
    cmap = ListedColormap([COLOURS[(v - 1) % len(COLOURS)] for v in range(1, max(values, default=1) + 1)])
    aspect = zooms[1] / zooms[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (heading, labels) in zip(np.atleast_1d(axes), panels):
        ax.imshow(shown, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect)
        if labels is not None:
            mask = np.rot90(labels[..., z])
            ax.imshow(np.ma.masked_where(mask <= 0, mask), cmap=cmap, vmin=0.5, vmax=cmap.N + 0.5, alpha=0.5,
                      aspect=aspect, interpolation="nearest")
        ax.set_title(heading, fontsize=10)
        ax.axis("off")
    legend = [Patch(color=cmap.colors[v - 1], label=(names or {}).get(v, f"label {v}")) for v in values]
    if legend:
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.suptitle(f"{title} (axial slice {z})".strip(), fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
