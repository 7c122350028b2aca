"""`mome predict`: segment cases with a saved bundle and write NIfTI labels on the input's own grid."""

from __future__ import annotations

import dataclasses
import gzip
import logging
from pathlib import Path
from typing import Iterable, Iterator

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from mome.client.overlay import overlay_png
from mome.common.atomic import atomic_write_bytes
from mome.common.bundle import Bundle, load_bundle
from mome.common.clinical import parse_schema, read_clinical_csv
from mome.common.labels import LabelSpec
from mome.common.metrics import Predictor, expert_predictor, mixture_predictor
from mome.common.gate import load_gate
from mome.common.model import load_expert
from mome.common.cases import INPUT_KEYS, geometry_of, preprocess_case
from mome.common.patches import Window
from mome.common.preprocess import to_input_grid
from mome.common.sitedata import BadCase, SiteLayout, SiteReport, case_ids, channel_file, read_case, read_layout

log = logging.getLogger("mome.client")



def predictor(bundle: Bundle) -> Predictor:
    """batch -> probabilities, from the bundle's experts (and gate, for a mixture), in sliding windows."""
    n_out, kind, window = bundle.label_spec.n_out, bundle.label_spec.kind, Window.from_config(bundle.cfg)
    experts = [load_expert(bundle.cfg, n_out, state) for state in bundle.experts.values()]
    if bundle.gate is None:
        return expert_predictor(experts[0], kind, window)
    return mixture_predictor(experts, load_gate(bundle.cfg, len(experts), bundle.gate), kind, window)


def _inputs(source: list[Path], bundle: Bundle) -> tuple[SiteLayout, Path, list[str], dict, dict[str, set[int]]]:
    """A site folder (dataset.json maps its channels; imagesTs/, else imagesTr/) or loose files named
    <case>_<cccc>.nii(.gz), whose channel index is the position in the bundle's modality list; the last item says
    which channels each case's loose files give (only those are read: a sibling file not given is not)."""
    if len(source) == 1 and source[0].is_dir() and (source[0] / "dataset.json").exists():
        site = source[0]
        layout = read_layout(site, bundle.cfg, SiteReport(site))
        image_dir = site / "imagesTs" if (site / "imagesTs").is_dir() else site / "imagesTr"
        rows = read_clinical_csv(site / "clinical.csv") if (site / "clinical.csv").exists() else {}
        return layout, image_dir, case_ids(image_dir.iterdir(), layout.file_ending), rows, {}
    files = [p for s in source for p in (sorted(s.iterdir()) if s.is_dir() else [s])]
    if foreign := [p.name for p in files if not p.name.endswith((".nii", ".nii.gz"))]:
        raise ValueError(f"mome reads NIfTI (.nii, .nii.gz) only, not {', '.join(foreign[:5])}: convert them first "
                         "(e.g. SimpleITK's WriteImage for .mha/.nrrd, dcm2niix for DICOM)")
    ending = ".nii.gz" if files and files[0].name.endswith(".nii.gz") else ".nii"
    named = {p: channel_file(ending).match(p.name) for p in files}
    bad = [str(p) for p, match in named.items() if not match]
    if not files or bad:
        raise ValueError(f"not named <case>_<cccc>{ending}: {', '.join(bad[:5]) or 'no input file'}")
    folders = {p.parent for p in files}
    if len(folders) != 1:
        raise ValueError("loose input files must lie in one folder")
    layout = SiteLayout(folders.pop(), bundle.label_spec, {i: i for i in range(len(bundle.cfg.modality_names))},
                        ending, {}, max_voxels=bundle.cfg.max_voxels)  # oversized headers refused unread, as at a site
    given: dict[str, set[int]] = {}
    for match in named.values():
        case, channel = match.groups()
        given.setdefault(case, set()).add(int(channel))
    if unknown := sorted({c for channels in given.values() for c in channels} - set(layout.channel_modality)):
        raise ValueError(f"channel(s) {', '.join(f'{c:04d}' for c in unknown)} beyond the bundle's "
                         f"{_channel_names(bundle)}")
    return layout, layout.site_dir, case_ids(files, ending), {}, given


def _channel_names(bundle: Bundle) -> str:
    return ", ".join(f"{i:04d} = {name}" for i, name in enumerate(bundle.cfg.modality_names))


def predict(bundle_dir: Path, source: list[Path], out_dir: Path, notes: list[str] | None = None,
            only: set[str] | None = None, overlays: bool = False,
            allow_missing: bool = False) -> tuple[list[Path], list[str]]:
    """Write <out>/<case>.nii.gz per case, on the input's grid; returns (written files, problems of skipped cases).
    Cases are brought to the bundle's plan (its target spacing) as in training. `notes` receives, per case segmented
    without some of the bundle's sequences, which ones: such a case is skipped unless `allow_missing` (the model
    was trained to do without sequences, but a clinician should know the result lacks one). `only`: these
    case ids alone. `overlays`: also <out>/<case>.png, the slice through the most lesion with the prediction."""
    bundle = load_bundle(bundle_dir)
    layout, image_dir, found, rows, given = _inputs([Path(s) for s in source], bundle)  # the user's input first
    found = [case for case in found if only is None or case in only]
    if not bundle.cfg.planned:
        raise ValueError(f"{bundle_dir}: the bundle carries no plan (target-spacing, patch-size); it was made by an "
                         "older version, retrain or set them in its config.json")
    predict_probs = predictor(bundle)
    schema = parse_schema(bundle.cfg.clinical_fields)
    problems: list[str] = []

    def cases() -> Iterator[dict]:  # one case in memory at a time
        for case in found:
            try:
                case_layout = layout if case not in given else dataclasses.replace(
                    layout, channel_modality={c: m for c, m in layout.channel_modality.items() if c in given[case]})
                raw = read_case(case_layout, case, "Ts", len(bundle.cfg.modality_names), with_label=False,
                                image_dir=image_dir, allow_missing=True)
                absent = [n for n, p in zip(bundle.cfg.modality_names, raw["present"]) if not p]
                mapping = f" (loose files' channels: {_channel_names(bundle)})" if case in given else ""
                if absent and not allow_missing:
                    problems.append(f"{image_dir / case}: lacks {', '.join(absent)}{mapping}; --allow-missing "
                                    "segments it without them")
                    continue
                if absent and notes is not None:
                    notes.append(f"{case}: segmented without {', '.join(absent)}{mapping}")
                yield preprocess_case(raw, geometry_of(raw), bundle.cfg, schema, rows.get(case))
            except BadCase as bad:
                path = bad.path or image_dir / case
                problems.append(f"{path}: {bad.reason}")

    shown = tqdm(cases(), total=len(found), desc="segmenting", unit="case", leave=False, disable=len(found) < 2)
    written = segment_cases(predict_probs, shown, bundle.label_spec, out_dir, overlays)
    return written, problems


def segment_cases(predict_probs: Predictor, cases: Iterable[dict], spec: LabelSpec, out_dir: Path,
                  overlays: bool = False) -> list[Path]:
    """Write <out_dir>/<case>.nii.gz for preprocessed cases, on each case's own grid (shape, orientation, affine);
    with `overlays`, <out_dir>/<case>.png beside each (drawn from the files, so it shows what was written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        batch = {k: case[k][None] for k in INPUT_KEYS}
        with torch.no_grad():
            probs = predict_probs(batch)[0]
        label = spec.to_label_map(to_input_grid(probs, case["canonical_affine"], case["affine"], case["shape"]))
        image = _on_input_header(label, case)
        # the project's atomic writer: a reader never sees half a segmentation
        # 0644: the clinical viewer runs as another user (the site's outputs folder is what stays private)
        written.append(atomic_write_bytes(out_dir / f"{case['case_id']}.nii.gz", gzip.compress(image.to_bytes()),
                                          mode=0o644))
        if overlays:
            try:  # the picture is a convenience: its failure loses no segmentation
                overlay_png(Path(case["reference"]), written[-1], out_dir / f"{case['case_id']}.png",
                            names=spec.value_names(), title=case["case_id"])
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: no overlay picture (%s: %s)", case["case_id"], type(exc).__name__, exc)
    return written


def _on_input_header(label: np.ndarray, case: dict) -> nib.Nifti1Image:
    """The label map as a NIfTI with the input's header: its qform and sform (and codes), unscaled uint8."""
    try:
        header = nib.load(case["reference"]).header.copy()
    except Exception:  # the input moved since it was read: its affine is still known
        return nib.Nifti1Image(label.astype(np.uint8), np.asarray(case["affine"], dtype=np.float64))
    image = nib.Nifti1Image(label.astype(np.uint8), None, header=header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    return image
