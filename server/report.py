"""report.md with tables and PNG plots for a run folder holding one or more strategies' metrics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mome.common.wire import Status  # noqa: E402
from mome.server.results import FAILED  # noqa: E402


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _failed(text: str) -> str:
    return f'<span style="color:red">**{text}**</span>'


def _summary_table(strategies: dict) -> list[str]:
    lines = ["| strategy | mean Dice | worst site | worst Dice | mean HD95 (vox) | sites scored / models saved "
             "| wall time (s) |", "|---|---|---|---|---|---|---|"]
    for name, m in strategies.items():
        s = m["summary"]
        if m.get("status") == FAILED:
            lines.append(f"| {name} | {_failed('FAILED')} | – | – | – | 0 / {s.get('n_models_saved', 0)} | "
                         f"{m.get('wall_time_s', 0):.0f} |")
            continue
        lines.append(f"| {name} | {_fmt(s.get('dice_mean'))} | {s.get('worst_site', '–')} | "
                     f"{_fmt(s.get('worst_dice'))} | {_fmt(s.get('hd95_mean'), 2)} | "
                     f"{s.get('n_evaluated', '–')} / {s.get('n_models_saved', '–')} | {m.get('wall_time_s', 0):.0f} |")
    failed = [(n, m) for n, m in strategies.items() if m.get("status") == FAILED]
    lines += [""] + [f"- {_failed(f'{n} failed')}: {m.get('error', '')}" for n, m in failed] if failed else []
    return lines


def _site_status_lines(m: dict) -> list[str]:
    """Why a site has no metrics (no held-out labels, a failed evaluation, a failed final step), and any failed
    segmentation of its unlabelled cases."""
    lines = []
    for site, e in m["sites"].items():
        status = e.get("status", Status.EVALUATED)
        if status != Status.EVALUATED:
            text = f"{site}: {status}: {e.get('reason', '')}; model {'saved' if e.get('model_saved') else 'NOT saved'}"
            lines.append(f"- {text if status == Status.NO_LABELS else _failed(text)}")
        if e.get("segmentation"):
            text = f"{site}: segmenting its unlabelled held-out cases {e['segmentation']}"
            lines.append(f"- {_failed(text)}")
    return ["Not scored here (a site without labelled held-out cases is not a failure), or not all segmented:", "",
            *lines, ""] if lines else []


def site_table(strategies: dict, sites: list[str], traits: dict[str, str | None]) -> list[str]:
    """Mean Dice per site (rows) and strategy (columns), with how each site is made where that is known."""
    names = list(strategies)
    with_traits = any(traits.values())
    lines = ["| site | " + ("how the site is made | " if with_traits else "") + " | ".join(names) + " |",
             "|---|" + ("---|" if with_traits else "") + "---|" * len(names)]
    for site in sites:
        cells = [_fmt(strategies[n]["sites"].get(site, {}).get("dice_mean")) for n in names]
        trait = f"{traits.get(site) or '–'} | " if with_traits else ""
        lines.append(f"| {site} | {trait}" + " | ".join(cells) + " |")
    return lines


def _region_table(m: dict) -> list[str]:
    regions = m.get("regions", [])
    lines = ["| site | n train/val/test | " + " | ".join(regions) + " | HD95 | up (MB) | down (MB) |",
             "|---|---|" + "---|" * len(regions) + "---|---|---|"]
    for site, e in m["sites"].items():
        dice = " | ".join(_fmt(d) for d in e.get("dice", [None] * len(regions)))
        counts = f"{e.get('n_train', '–')}/{e.get('n_val', '–')}/{e.get('n_test', '–')}"
        lines.append(f"| {site} | {counts} | {dice} | {_fmt(e.get('hd95'), 2)} | "
                     f"{e.get('bytes_up', 0) / 1e6:.2f} | {e.get('bytes_down', 0) / 1e6:.2f} |")
    return lines


def _bar_plot(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str,
              ylim: tuple[float, float] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) + 2), 4))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.5)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncols=min(len(series), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _curves_plot(path: Path, m: dict) -> Path | None:
    rounds = [r for r in m.get("rounds", []) if r["phase"] != "evaluate"]
    if not rounds:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sites = sorted({s for r in rounds for s in r["sites"]})
    for site in sites:
        steps = [(i, r["sites"][site]) for i, r in enumerate(rounds) if site in r["sites"]]
        axes[0].plot([i + 1 for i, _ in steps], [v.get("train_loss", np.nan) for _, v in steps], "o-", label=site)
        axes[1].plot([i + 1 for i, _ in steps], [v.get("val_dice", np.nan) for _, v in steps], "o-", label=site)
    labels = [f"{r['phase']}{r['round'] + 1}" for r in rounds]
    for ax, title in zip(axes, ("training loss (last epoch)", "validation Dice (site's own val cases)")):
        ax.set_xticks(range(1, len(rounds) + 1), labels, rotation=45, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{m['strategy']}: per-round curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _heatmap(path: Path, rows: list[str], cols: list[str], values: np.ndarray, title: str, cmap: str) -> Path:
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.6 * len(rows) + 2))
    im = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: Path, strategies: dict, traits: dict[str, str | None] | None = None,
                 overlays: dict[str, Path] | None = None) -> Path:
    """Write <run>/report.md and its PNGs from the per-strategy metrics; `traits`: how each site differs;
    `overlays`: a picture per site of one held-out case segmented (drawn where the images are, never here)."""
    sites = sorted({s for m in strategies.values() for s in m["sites"]})
    lines = ["# MoME run report", "", f"Run folder: `{run_dir}`", "", "## Summary (held-out cases of each site)", ""]
    lines += _summary_table(strategies) + ["", "## Mean Dice per site", ""]
    lines += site_table(strategies, sites, traits or {})
    scored = [s for s in sites if any(m["sites"].get(s, {}).get("dice_mean") is not None for m in strategies.values())]
    if scored:  # a site without labelled held-out cases has no bar to draw
        dice_png = _bar_plot(run_dir / "dice_per_site.png", scored,
                             {n: [m["sites"].get(s, {}).get("dice_mean", np.nan) for s in scored]
                              for n, m in strategies.items()}, "mean Dice", "Held-out Dice per site and strategy",
                             ylim=(0, 1))
        lines += ["", f"![Dice per site]({dice_png.name})", ""]
    else:
        lines += ["", "No site has labelled held-out cases: nothing to plot.", ""]
    if overlays:
        lines += ["## One held-out case per site", "",
                  "The slice through the most tumour: the image, the site's own reference, the prediction of the "
                  "model the site ended with.", ""]
        lines += [f"![{site}]({png.relative_to(run_dir)})" for site, png in sorted(overlays.items())] + [""]
    for name, m in strategies.items():
        lines += [f"## {name}", "", *_region_table(m), "", *_site_status_lines(m)]
        if m.get("dropped"):
            lines += ["Dropped updates / sites:", ""]
            lines += [f"- step {d['step']}: {d['site']}: {d['reason']}" for d in m["dropped"]] + [""]
        curves = _curves_plot(run_dir / f"curves_{name}.png", m)
        if curves:
            lines += [f"![curves]({curves.name})", ""]
        lines += _extras(run_dir, name, m)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _extras(run_dir: Path, name: str, m: dict) -> list[str]:
    """Gate weights and modality Shapley plots where the strategy reports them."""
    lines, sites = [], list(m["sites"])
    weights = {s: e["gate_weights"] for s, e in m["sites"].items() if e.get("gate_weights")}
    if weights:
        png = _heatmap(run_dir / f"gate_weights_{name}.png", list(weights), m.get("experts", []),
                       np.array(list(weights.values())), "mean gate weight (rows: site's test cases; cols: expert)",
                       "viridis")
        lines += [f"![gate weights]({png.name})", ""]
    shapley = {s: e["shapley"] for s, e in m["sites"].items() if e.get("shapley")}
    if shapley:
        players = [*m.get("modalities", []), "clinical"]
        png = _bar_plot(run_dir / f"shapley_{name}.png", players,
                        {s: v for s, v in shapley.items()}, "Shapley value (Dice)",
                        f"{name}: modality contributions per site (own model)")
        lines += [f"![modality Shapley]({png.name})", ""]
        lines += ["| site | " + " | ".join(players) + " |", "|---|" + "---|" * len(players)]
        lines += [f"| {s} | " + " | ".join(_fmt(x) for x in v) + " |" for s, v in shapley.items()] + [""]
    variants = {s: e.get("variants", {}) for s, e in m["sites"].items() if e.get("variants")}
    if variants:
        kinds = sorted({k for v in variants.values() for k in v})
        lines += ["Other variants (mean Dice): " + ", ".join(kinds), "",
                  "| site | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        lines += [f"| {s} | " + " | ".join(_fmt(v.get(k, {}).get("dice_mean")) for k in kinds) + " |"
                  for s, v in variants.items()] + [""]
    return lines
