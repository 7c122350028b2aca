"""Does a site's model survive how hospitals store and resample scans? And does `mome predict` fit a BraTS case?

Robustness: labelled held-out cases of finished `mome sim` runs (several runs: one per seed, e.g. a `mome bench`
preset's seed-N folders), as stored and as the variants of sim/perturb.py (upsampled x4 and back: the halo; background
noise; a softer kernel; intensities x1000; another grid, the issue's 4x4x6 mm relative to 5 mm voxels; 2.5x thicker
slices; the same head on a BraTS-sized 240x240x155 grid), segmented with the model each site ends up using
(`<run>/mome/sites/<site>/model`) through `mome predict`, scored on the variant's own grid. --out writes the table
(mean over seeds of each variant's difference to the original grid, and its spread) as markdown and JSON.

BraTS predict: one BraTS-shaped case (4 channels, 240x240x155 at 1 mm: a synthetic head scaled to a real head's
size) through `mome predict` with the run's 4-expert mixture, in a child process: wall time and peak RSS.

    python benchmarks/bench_geometry.py RUN [RUN ...] [--cases 4] [--out docs/bench/robustness] [--skip-robustness]
                                        [--skip-predict] [--threads 2]
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
                written, problems = predict(bundle, [folder], folder / "pred", allow_missing=True)
                if problems or not written:
                    raise SystemExit(f"{folder}: {problems}")
                truth = np.asarray(nib.load(folder / "labelsTs" / f"{case}.nii.gz").dataobj)
                scores[name].append(dice(np.asarray(nib.load(written[0]).dataobj), truth))
            print(f"{site.name} {case}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in scores.items()), flush=True)
    return scores


def robustness_table(per_run: list[dict[str, list[float]]], runs: list[Path]) -> str:
    """Markdown: per variant the mean Dice and its difference to the original grid (mean and sd over runs, and the
    worst run), over the same cases."""
    deltas = {k: [float(np.mean(s[k]) - np.mean(s["original"])) for s in per_run] for k in per_run[0]}
    n = len(per_run[0]["original"])
    lines = [f"Mean Dice of each site's final MoME model on {n} labelled held-out cases per run, each variant scored on "
             f"its own grid; {len(runs)} run(s): {', '.join(str(r) for r in runs)}", "",
             "| variant | mean Dice | − original (mean ± sd over runs) | worst run |", "|---|---|---|---|"]
    for name in per_run[0]:
        mean = np.mean([np.mean(s[name]) for s in per_run])
        spread = np.std(deltas[name], ddof=1) if len(runs) > 1 else 0.0
        lines.append(f"| {name} | {mean:.3f} | {np.mean(deltas[name]):+.3f} ± {spread:.3f} | {min(deltas[name]):+.3f} |")
    return "\n".join(lines)


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
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
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
            per_run = [robustness(run, args.cases, work / str(i)) for i, run in enumerate(args.runs)]
            table = robustness_table(per_run, args.runs)
            print("\n" + table)
            result["robustness"] = [{k: float(np.mean(v)) for k, v in scores.items()} for scores in per_run]
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".md").write_text(table + "\n")
                args.out.with_suffix(".json").write_text(json.dumps(
                    {"runs": [str(r) for r in args.runs], "cases_per_site": args.cases,
                     "per_run": [{k: [float(x) for x in v] for k, v in s.items()} for s in per_run]}, indent=1))
        if args.skip_predict:
            return
        folder = brats_case(args.runs[0], work)
        bundle = args.model or args.runs[0] / "mome" / "model"
        timing = timed_predict(bundle, folder, args.threads)
        experts = len(json.loads((bundle / "metadata.json").read_text())["experts"])
        print(f"\nmome predict, one 4-channel 240x240x155 case at 1 mm, {experts}-expert mixture, {args.threads} threads: "
              f"{timing['wall_s']:.1f} s wall, peak RSS {timing['peak_rss_gb']:.2f} GB")
        result["brats_predict"] = timing
        print(json.dumps(result))


if __name__ == "__main__":
    main()
