"""Pictures of sites: a montage of synthetic sites (a row per site, a column per sequence, plus the label), and a
run's segmentation overlay per site."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mome.common.sitedata import DEFAULT_FILE_ENDING, image_file
from mome.sim.synth import SEQUENCES

log = logging.getLogger("mome.sim")
SHOWN_FIRST = {"FLAIR": 0, "T1CE": 1, "T2": 2}


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
        path = image_file(site / "imagesTr", case, int(k), DEFAULT_FILE_ENDING)
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


def site_overlays(run_dir: Path, strategy: str, site_dirs: list[Path]) -> dict[str, Path]:
    """Per site, its first labelled held-out case segmented by the model the site ended with under `strategy`:
    <run>/overlays/<site>/<case>.png (image, reference, prediction). Sites without a labelled held-out case or a
    saved model have none; a site whose picture fails is logged and left out (the picture is not the result)."""
    from mome.client.overlay import overlay_png
    from mome.client.predict import predict
    from mome.common.labels import label_spec_from_dataset_json
    from mome.common.wire import site_id_from_name

    pictures = {}
    for site in map(Path, site_dirs):
        site_id = site_id_from_name(site.name)
        bundle = run_dir / strategy / "sites" / site_id / "model"
        labelled = sorted((site / "labelsTs").glob("*.nii*")) if (site / "labelsTs").is_dir() else []
        if not labelled or not bundle.is_dir():
            continue
        case = labelled[0].name.split(".nii")[0]
        folder = run_dir / "overlays" / site_id
        try:
            written, _ = predict(bundle, [site], folder, only={case}, allow_missing=True)
            meta = json.loads((site / "dataset.json").read_text())
            ending = meta.get("file_ending", DEFAULT_FILE_ENDING)
            present = [int(k) for k in meta["channel_names"]
                       if image_file(site / "imagesTs", case, int(k), ending).exists()]
            # the sequence a reader looks at a tumour in first: FLAIR, then T1ce and T2
            channel = min(present, key=lambda k: (SHOWN_FIRST.get(meta["channel_names"][str(k)].upper(), 9), k))
            image = image_file(site / "imagesTs", case, channel, ending)
            pictures[site_id] = overlay_png(
                image, written[0], folder / f"{case}.png", reference=labelled[0],
                names=label_spec_from_dataset_json(meta).value_names(),
                title=f"{site_id}, {case}, {meta['channel_names'][str(channel)]}, {strategy}")
        except Exception as exc:  # noqa: BLE001
            log.warning("no overlay for %s: %s: %s", site_id, type(exc).__name__, exc)
    return pictures
