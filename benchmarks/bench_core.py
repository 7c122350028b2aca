"""Benchmark of the learning core: expert training speed against a plain MONAI UNet of the same size, Shapley
reuse vs naive."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from monai.losses import DiceFocalLoss
from monai.networks.nets import UNet

from mome.common.config import Config
from mome.common.labels import LabelKind, LabelSpec
from mome.common.patches import PatchLoader
from mome.common.model import build_expert
from mome.common.shapley import shapley_values
from mome.common.train import train_expert

N_CLINICAL, N_OUT, KIND = 4, 3, "regions"


def random_batches(cfg: Config, n: int, size: int, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(cfg.seed)
    m = len(cfg.modality_names)
    return [{
        "image": torch.randn(batch, m, size, size, size, generator=g),
        "presence": torch.ones(batch, m + 1),
        "clinical": torch.rand(batch, N_CLINICAL, generator=g),
        "stats": torch.rand(batch, 2 * m, generator=g),
        "label": (torch.rand(batch, N_OUT, size, size, size, generator=g) > 0.9).float(),
    } for _ in range(n)]


def random_cases(batches: list[dict], size: int) -> list[dict]:
    """The same voxels as whole cases on a canonical grid 1.25x the patch, for the patch pipeline (MONAI crop and
    augmentation, shuffled DataLoader): what a site's training epoch really runs."""
    big = int(size * 1.25)
    cases = []
    for b in batches:
        for i in range(b["image"].shape[0]):
            image = torch.nn.functional.interpolate(b["image"][i:i + 1], size=(big,) * 3)[0]
            label = torch.nn.functional.interpolate(b["label"][i:i + 1], size=(big,) * 3)[0]
            cases.append({"image": image, "label": (label.sum(0)).clamp(max=3).to(torch.int16),
                          "summary": image[:, ::8, ::8, ::8].contiguous(), "presence": b["presence"][i],
                          "clinical": b["clinical"][i], "stats": b["stats"][i]})
    return cases


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_unet(target: int, in_channels: int) -> UNet:
    """Plain 3-level MONAI UNet whose width is chosen so its parameter count is closest to target."""
    def make(base: int) -> UNet:
        return UNet(3, in_channels, N_OUT, channels=(base, 2 * base, 4 * base), strides=(2, 2), num_res_units=2)
    return make(min(range(4, 64), key=lambda b: abs(n_params(make(b)) - target)))


def expert_epoch(cfg: Config, model) -> Callable[[list], None]:
    """One train_expert epoch (main + aux losses, balancer, AdamW) over the given batches."""
    return lambda batches: train_expert(model, batches, [], cfg, KIND, epochs=1, progress=False)


def plain_epoch(cfg: Config, unet: UNet) -> Callable[[list], None]:
    loss_fn, optimizer = DiceFocalLoss(sigmoid=True), torch.optim.AdamW(unet.parameters(), lr=cfg.lr)

    def run(batches: list) -> None:
        unet.train()
        for batch in batches:
            loss = loss_fn(unet(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def interleaved(jobs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per job; jobs alternate within each repetition so bursts of outside load hit all alike."""
    for job in jobs.values():
        job()  # warm-up: allocator, oneDNN kernel selection
    runs: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median is reported)")
    parser.add_argument("--size", type=int, default=48, help="volume edge in voxels")
    parser.add_argument("--batch", type=int, default=2, help="cases per batch")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed repetition")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(size=args.size, batch_size=args.batch)
    batches = random_batches(cfg, args.steps, args.size, args.batch)
    voxels = args.batch * args.size**3
    model = build_expert(cfg, N_CLINICAL, N_OUT)
    unet = matched_unet(n_params(model), len(cfg.modality_names))
    train_mome = expert_epoch(cfg, model)
    train_plain = plain_epoch(cfg, unet)
    probe = build_expert(cfg, N_CLINICAL, N_OUT)
    patch_cfg = cfg.replace(patch_size=f"{args.size},{args.size},{args.size}")
    spec = LabelSpec(LabelKind.REGIONS, ("wt", "tc", "et"), ((1, 2, 3), (2, 3), (3,)), (0, 1, 2, 3), (1, 2, 3))
    patches = PatchLoader(random_cases(batches, args.size), patch_cfg, spec)
    patched = build_expert(cfg, N_CLINICAL, N_OUT)
    train_patched = expert_epoch(cfg, patched)
    t = interleaved({
        "mome": lambda: train_mome(batches),
        "patches": lambda: train_patched(patches),
        "plain": lambda: train_plain(batches),
        "reuse": lambda: shapley_values(probe, batches[0], KIND, mode="reuse"),
        "naive": lambda: shapley_values(probe, batches[0], KIND, mode="naive"),
    }, args.repeats)
    step = {name: t[name] / len(batches) for name in ("mome", "patches", "plain")}
    print(f"\n{args.size}^3, batch {args.batch}, {torch.get_num_threads()} torch threads, median of {args.repeats}\n")
    print("| measure | ExpertNet | plain MONAI UNet |")
    print("|---|---|---|")
    print(f"| parameters | {n_params(model):,} | {n_params(unet):,} |")
    print(f"| train step (s) | {step['mome']:.3f} | {step['plain']:.3f} |")
    print(f"| train throughput (voxels/s) | {voxels / step['mome']:,.0f} | {voxels / step['plain']:,.0f} |")
    print(f"| step time / ExpertNet's | 1.00 | {step['plain'] / step['mome']:.2f} |")
    print(f"\nwith the patch pipeline (MONAI crop + augmentation, shuffled DataLoader, {args.size}^3 patches): "
          f"{step['patches']:.3f} s per step, {voxels / step['patches']:,.0f} voxels/s, "
          f"{step['plain'] / step['patches']:.2f} x the plain UNet's throughput on ready batches")
    print(f"\nShapley, one batch, all subsets: {t['reuse']:.3f} s with feature reuse, {t['naive']:.3f} s with naive "
          f"forwards ({t['naive'] / t['reuse']:.2f}x faster)")


if __name__ == "__main__":
    main()
