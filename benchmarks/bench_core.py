"""Benchmark of the learning core: expert training throughput against a plain MONAI UNet, Shapley reuse vs naive."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from monai.losses import DiceFocalLoss
from monai.networks.nets import UNet

from common.config import Config
from common.model import build_expert
from common.shapley import shapley_values
from common.train import train_expert

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
    ours_params = n_params(model)
    unet = matched_unet(ours_params, len(cfg.modality_names))
    train_mome, train_plain = expert_epoch(cfg, model), plain_epoch(cfg, unet)
    probe = build_expert(cfg, N_CLINICAL, N_OUT)
    t = interleaved({
        "mome": lambda: train_mome(batches),
        "plain": lambda: train_plain(batches),
        "reuse": lambda: shapley_values(probe, batches[0], KIND, mode="reuse"),
        "naive": lambda: shapley_values(probe, batches[0], KIND, mode="naive"),
    }, args.repeats)
    ours, plain = t["mome"] / len(batches), t["plain"] / len(batches)
    shap = {"reuse": t["reuse"], "naive": t["naive"]}
    print(f"\n{args.size}^3, batch {args.batch}, {torch.get_num_threads()} torch threads, median of {args.repeats}\n")
    print("| measure | MoME | reference | ratio |")
    print("|---|---|---|---|")
    print(f"| parameters | {ours_params:,} (ExpertNet) | {n_params(unet):,} (plain MONAI UNet) | |")
    print(f"| train step (s) | {ours:.3f} | {plain:.3f} | |")
    print(f"| train throughput (voxels/s) | {voxels / ours:,.0f} | {voxels / plain:,.0f} | "
          f"{plain / ours:.2f} (MoME / UNet) |")
    print(f"| Shapley, one batch, all subsets (s) | {shap['reuse']:.3f} (feature reuse) | "
          f"{shap['naive']:.3f} (naive forwards) | {shap['naive'] / shap['reuse']:.2f}x faster |")


if __name__ == "__main__":
    main()
