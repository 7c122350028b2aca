"""What `mome bench` concludes: per strategy and preset the mean and worst-site Dice over seeds, and MoME's paired
difference against every other strategy with a 95 % bootstrap interval (cases resampled within each site, seeds
resampled); written as results.json, results.md and bench.png."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mome.common.atomic import atomic_write_bytes  # noqa: E402
from mome.common.config import Strategy  # noqa: E402

REFERENCE = Strategy.MOME.value
BOOTSTRAP_REPS = 4000


def case_dice(run: dict) -> dict[str, dict[str, np.ndarray]]:
    """{strategy: {site: mean-over-regions Dice per case}}; a site that kept no model scores 0 on every case (its
    result was lost), sites without labelled held-out cases are left out."""
    scores = run["scores"]
    counts = {site: len(cases) for per_site in scores.values() for site, cases in per_site.items() if cases}
    out: dict[str, dict[str, np.ndarray]] = {}
    for strategy, per_site in scores.items():
        out[strategy] = {site: np.asarray(per_site[site], dtype=float).mean(1) if per_site.get(site)
                         else np.zeros(n) for site, n in sorted(counts.items()) if n}
    return out


def paired_interval(ours: list[dict[str, np.ndarray]], theirs: list[dict[str, np.ndarray]],
                    rng: np.random.Generator, reps: int = BOOTSTRAP_REPS) -> dict[str, list[float]]:
    """MoME minus a baseline on the mean over sites and on the worst site: [observed, 2.5 %, 97.5 %]. One list
    entry per seed; within a seed both strategies are scored on the same resampled cases."""
    boot_mean, boot_worst, seen_mean, seen_worst = [], [], [], []
    for a, b in zip(ours, theirs):
        sites = [s for s in a if len(a[s])]
        draws = [rng.integers(0, len(a[s]), (reps, len(a[s]))) for s in sites]
        am = np.stack([a[s][d].mean(1) for s, d in zip(sites, draws)], 1)  # [reps, sites]
        bm = np.stack([b[s][d].mean(1) for s, d in zip(sites, draws)], 1)
        boot_mean.append(am.mean(1) - bm.mean(1))
        boot_worst.append(am.min(1) - bm.min(1))
        site_a, site_b = np.array([a[s].mean() for s in sites]), np.array([b[s].mean() for s in sites])
        seen_mean.append(site_a.mean() - site_b.mean())
        seen_worst.append(site_a.min() - site_b.min())
    pick = rng.integers(0, len(ours), (reps, len(ours)))  # seeds resampled too

    def interval(boot: list[np.ndarray], seen: list[float]) -> list[float]:
        values = np.take_along_axis(np.stack(boot, 1), pick, 1).mean(1)
        return [float(np.mean(seen)), *np.percentile(values, [2.5, 97.5]).tolist()]

    return {"mean": interval(boot_mean, seen_mean), "worst": interval(boot_worst, seen_worst)}


def summarise(results: dict[str, dict[int, dict]], seed: int = 0) -> dict:
    """Per preset: each strategy's mean and worst-site Dice (mean and sd over seeds), per-site means, cost, and
    MoME's paired difference against every other strategy."""
    rng = np.random.default_rng(seed)
    out = {}
    for preset, runs in results.items():
        seeds = sorted(runs)
        dice = [case_dice(runs[s]) for s in seeds]
        strategies = [s for s in dice[0] if all(s in d for d in dice)]
        entry: dict = {"seeds": seeds, "traits": runs[seeds[0]].get("traits", {}), "strategies": {}, "versus": {}}
        for name in strategies:
            site_means = [{site: float(v.mean()) for site, v in d[name].items()} for d in dice]
            means = [np.mean(list(m.values())) for m in site_means]
            worsts = [min(m.values()) for m in site_means]
            cost = [runs[s]["cost"].get(name, {}) for s in seeds]
            entry["strategies"][name] = {
                "mean": _mean_sd(means), "worst": _mean_sd(worsts),
                "sites": {site: _mean_sd([m[site] for m in site_means]) for site in site_means[0]},
                "wall_time_s": float(np.mean([c.get("wall_time_s", 0.0) for c in cost])),
                "bytes": float(np.mean([c.get("bytes", 0) for c in cost]))}
        if REFERENCE in strategies:
            ours = [d[REFERENCE] for d in dice]
            entry["versus"] = {name: paired_interval(ours, [d[name] for d in dice], rng)
                               for name in strategies if name != REFERENCE}
        if late := _late_join([runs[s].get("late_join") for s in seeds], rng):
            entry["late_join"] = late
        out[preset] = entry
    return out


LATE_REFERENCE = f"{REFERENCE}-adapted"


def _late_join(runs: list[dict | None], rng: np.random.Generator) -> dict | None:
    """The hospital that joined late: each model's mean Dice over seeds, and adapted MoME's paired differences."""
    if not runs or any(r is None or LATE_REFERENCE not in r.get("scores", {}) for r in runs):
        return None
    names = [n for n in runs[0]["scores"] if all(n in r["scores"] for r in runs)]
    per_case = {n: [{"late": np.asarray(r["scores"][n], dtype=float).mean(1)} for r in runs] for n in names}
    return {"traits": runs[0]["traits"], "cases": runs[0].get("cases"), "n_test": len(per_case[LATE_REFERENCE][0]["late"]),
            "models": {n: _mean_sd([float(d["late"].mean()) for d in per_case[n]]) for n in names},
            "versus": {n: paired_interval(per_case[LATE_REFERENCE], per_case[n], rng)["mean"]
                       for n in names if n != LATE_REFERENCE}}


def _mean_sd(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def verdict(interval: list[float]) -> str:
    _, low, high = interval
    return "MoME ahead" if low > 0 else "**MoME behind**" if high < 0 else "no clear difference"


def markdown(summary: dict, title: str) -> str:
    lines = [f"# {title}", "",
             "Mean over sites and worst site of each site's mean Dice on its labelled held-out cases (mean ± sd over "
             "seeds). MoME − strategy: the paired difference, [95 % bootstrap interval] over cases and seeds.", ""]
    for preset, entry in summary.items():
        n = len(entry["seeds"])
        lines += [f"## {preset} ({n} seed{'s' * (n != 1)}: {', '.join(map(str, entry['seeds']))})", "",
                  "| strategy | mean | worst site | MoME − it, mean | MoME − it, worst site | wall s | MB sent |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in entry["strategies"].items():
            versus = entry["versus"].get(name)
            cells = [_interval(versus["mean"]), _interval(versus["worst"])] if versus else ["", ""]
            lines.append(f"| {name} | {_pm(s['mean'])} | {_pm(s['worst'])} | {cells[0]} | {cells[1]} | "
                         f"{s['wall_time_s']:.0f} | {s['bytes'] / 1e6:.0f} |")
        sites = list(next(iter(entry["strategies"].values()))["sites"])
        lines += ["", "| site | " + " | ".join(entry["strategies"]) + " |", "|---" * (len(entry["strategies"]) + 1)
                  + "|"]
        for site in sites:
            trait = entry["traits"].get(site)
            label = f"{site} ({trait})" if trait else site
            lines.append(f"| {label} | " + " | ".join(_pm(s["sites"][site]) for s in entry["strategies"].values())
                         + " |")
        if late := entry.get("late_join"):
            lines += ["", f"Late join: a hospital that took no part ({late['traits']}) adapts what it was given on its "
                      f"{late['cases']} labelled cases (`mome adapt`), scored on its {late['n_test']} held-out cases.", "",
                      "| model | Dice | MoME adapted − it |", "|---|---|---|"]
            for name, value in late["models"].items():
                versus = late["versus"].get(name)
                lines.append(f"| {name} | {_pm(value)} | {_interval(versus) if versus else ''} |")
        lines.append("")
    return "\n".join(lines)


def _pm(pair: list[float]) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _interval(values: list[float]) -> str:
    return f"{values[0]:+.3f} [{values[1]:+.3f}, {values[2]:+.3f}] {verdict(values)}"


def plot(summary: dict, path: Path) -> Path:
    """One panel per preset: each strategy's mean (filled) and worst-site (open) Dice, ± sd over seeds."""
    fig, axes = plt.subplots(1, len(summary), figsize=(3.6 * len(summary), 3.6), sharey=True, squeeze=False)
    for ax, (preset, entry) in zip(axes[0], summary.items()):
        names = list(entry["strategies"])
        x = np.arange(len(names))
        for offset, key, face in ((-0.12, "mean", None), (0.12, "worst", "none")):
            values = np.array([entry["strategies"][n][key] for n in names])
            ax.errorbar(x + offset, values[:, 0], yerr=values[:, 1], fmt="o", mfc=face, capsize=3,
                        color="tab:blue", label=f"{key} site" if key == "worst" else "mean over sites")
        ax.set_xticks(x, names, rotation=40, ha="right")
        ax.set_title(f"{preset} ({len(entry['seeds'])} seeds)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice (held-out cases)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(summary: dict, folder: Path, title: str = "mome bench") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "results.json", json.dumps(summary, indent=2).encode(), mode=0o644)
    atomic_write_bytes(folder / "results.md", markdown(summary, title).encode(), mode=0o644)
    return [folder / "results.json", folder / "results.md", plot(summary, folder / "bench.png")]


def load_results(out: Path) -> dict[str, dict[int, dict]]:
    """The scored runs under a bench folder (<preset>/seed-<n>/case_scores.json)."""
    results: dict[str, dict[int, dict]] = {}
    for path in sorted(out.glob("*/seed-*/case_scores.json")):
        run = json.loads(path.read_text())
        results.setdefault(run["preset"], {})[int(run["seed"])] = run
    return results
