"""A PNG montage of synthetic sites: one row per site, one column per sequence, plus the label."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mome.sim.synth import SEQUENCES


def _preview_row(site: Path) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
    """Row title, axial slices per present sequence and label slice of a site's first training case."""
    meta = json.loads((site / "dataset.json").read_text())
    case = sorted((site / "labelsTr").glob("*.nii.gz"))[0].name[: -len(".nii.gz")]
    label = np.asarray(nib.load(site / "labelsTr" / f"{case}.nii.gz").dataobj)
    target = label >= 2 if (label >= 2).any() else label > 0  # slice through the core when there is one
    z = int(round(ndimage.center_of_mass(target)[2])) if target.any() else label.shape[2] // 2
    lacks = set(meta.get("missing_channels", {}).get(case, []))
    slices = {}
    for k, seq in meta["channel_names"].items():
        path = site / "imagesTr" / f"{case}_{int(k):04d}.nii.gz"
        if seq not in lacks and path.exists():
            slices[seq] = np.asarray(nib.load(path).dataobj[:, :, z], np.float32)
    knobs = meta.get("synthetic", {})
    title = (f"{meta['name']}\n{knobs.get('convention', '?')}\n"
             f"scanner {knobs.get('scanner', '?')}, {knobs.get('spacing', '?')} mm")
    return title, slices, label[:, :, z]


def write_preview(site_dirs: list[Path], png_path: Path) -> Path:
    """PNG montage: a row per site (first training case, axial slice through the tumour), a column per sequence."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas for PNG

    rows = [_preview_row(Path(s)) for s in site_dirs]
    colours = ListedColormap(["#2ca02c", "#d62728", "#ffdd00"])  # oedema green, core red, enhancing yellow
    fig = Figure(figsize=(2.0 * (len(SEQUENCES) + 1), 2.1 * len(rows)))
    axes = fig.subplots(len(rows), len(SEQUENCES) + 1, squeeze=False)
    for (title, slices, label), row in zip(rows, axes):
        for seq, ax in zip(SEQUENCES, row):
            if seq in slices:
                top = np.percentile(slices[seq], 99.5)  # per-panel window, like a radiology viewer
                ax.imshow(slices[seq].T, cmap="gray", origin="lower", vmin=0, vmax=top)
            ax.set_title(seq if seq in slices else f"{seq}: absent", fontsize=8)
        base = next(iter(slices.values()), np.zeros(label.shape))
        row[-1].imshow(base.T, cmap="gray", origin="lower")
        row[-1].imshow(np.ma.masked_equal(label, 0).T, cmap=colours, vmin=0.5, vmax=3.5, origin="lower", alpha=0.6)
        row[-1].set_title("label", fontsize=8)
        row[0].set_ylabel(title, fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return Path(png_path)
