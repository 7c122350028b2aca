"""Does a site's model survive how hospitals store and resample scans? And does `mome predict` fit a BraTS case?

Robustness: every labelled held-out case of a finished `mome sim` run, as stored and as four variants (upsampled x4
and back with linear interpolation: the halo; low-level background noise; another grid, the issue's 4x4x6 mm
relative to 5 mm voxels; the same head on a BraTS-sized 240x240x155 grid), segmented with the model each site ends
up using (`<run>/mome/sites/<site>/model`) through `mome predict`, scored on the variant's own grid.

BraTS predict: one BraTS-shaped case (4 channels, 240x240x155 at 1 mm: a synthetic head scaled to a real head's
size) through `mome predict` with the run's 4-expert mixture, in a child process: wall time and peak RSS.

    python benchmarks/bench_geometry.py RUN [--cases 4] [--skip-robustness] [--skip-predict] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mome.common.sitedata import find_site_dirs
from mome.sim.perturb import VARIANTS, write_case

REGIONS = ([1, 2, 3], [2, 3], [3])


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    scores = []
    for members in REGIONS:
        x, y = np.isin(pred, members), np.isin(truth, members)
        scores.append(1.0 if not x.any() and not y.any() else 2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def robustness(run: Path, cases_per_site: int, work: Path) -> dict[str, list[float]]:
    from mome.client.predict import predict

    scores: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for site in find_site_dirs(run / "data"):
        bundle = run / "mome" / "sites" / site.name / "model"
        cases = sorted(p.name[: -len(".nii.gz")] for p in (site / "labelsTs").glob("*.nii.gz"))[:cases_per_site]
        for case in cases:
            for name, transform in VARIANTS.items():
                folder = write_case(work / site.name / case / name, site, case, transform)
                written, problems = predict(bundle, [folder], folder / "pred")
                if problems or not written:
                    raise SystemExit(f"{folder}: {problems}")
                truth = np.asarray(nib.load(folder / "labelsTs" / f"{case}.nii.gz").dataobj)
                scores[name].append(dice(np.asarray(nib.load(written[0]).dataobj), truth))
            print(f"{site.name} {case}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items()), flush=True)
    return scores


def brats_case(run: Path, work: Path) -> Path:
    """A held-out synthetic case with its voxels taken as 5 mm (a 240 mm head), resampled to 1 mm 240x240x155."""
    from mome.sim.perturb import resampled

    site = find_site_dirs(run / "data")[0]
    case = sorted(p.name[: -len(".nii.gz")] for p in (site / "labelsTs").glob("*.nii.gz"))[0]

    def to_brats(array, affine, label):
        big = np.diag([5.0, 5.0, 5.0, 1.0])  # a real head's extent
        big[:3, 3] = -2.5 * (np.asarray(array.shape) - 1)
        target = np.diag([1.0, 1.0, 1.0, 1.0])
        target[:3, 3] = -0.5 * (np.asarray((240, 240, 155)) - 1)
        return resampled(lambda shape, aff: ((240, 240, 155), target))(array, big, label)

    return write_case(work / "brats", site, case, to_brats)


def timed_predict(bundle: Path, folder: Path, threads: int) -> dict:
    """`mome predict` in a child process limited to `threads` torch threads: wall seconds and peak RSS (GB)."""
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); from mome.cli.main import main; "
            "sys.argv = ['mome', 'predict', '--model', sys.argv[2], '--out', sys.argv[3], '--input', sys.argv[4]]; "
            "sys.exit(main())")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(threads), str(bundle), str(folder / "pred"), str(folder)],
                   check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB -> GB
    return {"wall_s": wall, "peak_rss_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--cases", type=int, default=4, help="labelled held-out cases per site")
    parser.add_argument("--skip-robustness", action="store_true")
    parser.add_argument("--skip-predict", action="store_true", help="no BraTS-sized predict timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="bundle to time (default: RUN/mome/model)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result = {}
        if not args.skip_robustness:
            scores = robustness(args.run, args.cases, work)
            base = float(np.mean(scores["original"]))
            print(f"\nmean Dice over {len(scores['original'])} held-out cases, each variant on its own grid\n")
            print("| variant | mean Dice | vs original |\n|---|---|---|")
            for name, values in scores.items():
                print(f"| {name} | {np.mean(values):.3f} | {np.mean(values) - base:+.3f} |")
            result["robustness"] = {k: float(np.mean(v)) for k, v in scores.items()}
        if args.skip_predict:
            return
        folder = brats_case(args.run, work)
        bundle = args.model or args.run / "mome" / "model"
        timing = timed_predict(bundle, folder, args.threads)
        experts = len(json.loads((bundle / "metadata.json").read_text())["experts"])
        print(f"\nmome predict, one 4-channel 240x240x155 case at 1 mm, {experts}-expert mixture, {args.threads} threads: "
              f"{timing['wall_s']:.1f} s wall, peak RSS {timing['peak_rss_gb']:.2f} GB")
        result["brats_predict"] = timing
        print(json.dumps(result))


if __name__ == "__main__":
    main()
