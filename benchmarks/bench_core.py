"""Benchmark of the learning core: expert training throughput against a plain MONAI UNet, Shapley reuse vs naive."""

from __future__ import annotations

import argparse
import statistics
import time

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


def time_expert(cfg: Config, batches, repeats: int) -> tuple[float, int]:
    """Seconds per training step of train_expert (main + aux losses, balancer, AdamW), median over repeats."""
    model = build_expert(cfg, N_CLINICAL, N_OUT)
    train_expert(model, batches[:1], [], cfg, KIND, epochs=1, progress=False)  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_expert(model, batches, [], cfg, KIND, epochs=1, progress=False)
        runs.append((time.perf_counter() - start) / len(batches))
    return statistics.median(runs), n_params(model)


def time_plain(unet: UNet, cfg: Config, batches, repeats: int) -> float:
    loss_fn, optimizer = DiceFocalLoss(sigmoid=True), torch.optim.AdamW(unet.parameters(), lr=cfg.lr)

    def epoch(items) -> None:
        for batch in items:
            loss = loss_fn(unet(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    unet.train()
    epoch(batches[:1])
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        epoch(batches)
        runs.append((time.perf_counter() - start) / len(batches))
    return statistics.median(runs)


def time_shapley(cfg: Config, batch, repeats: int) -> dict[str, float]:
    model = build_expert(cfg, N_CLINICAL, N_OUT)
    out = {}
    for mode in ("reuse", "naive"):
        shapley_values(model, batch, KIND, mode=mode)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            shapley_values(model, batch, KIND, mode=mode)
            runs.append(time.perf_counter() - start)
        out[mode] = statistics.median(runs)
    return out


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
    ours, ours_params = time_expert(cfg, batches, args.repeats)
    unet = matched_unet(ours_params, len(cfg.modality_names))
    plain = time_plain(unet, cfg, batches, args.repeats)
    shap = time_shapley(cfg, batches[0], args.repeats)
    print(f"\n{args.size}^3, batch {args.batch}, {torch.get_num_threads()} torch threads, median of {args.repeats}\n")
    print("| measure | MoME expert | reference | ratio |")
    print("|---|---|---|---|")
    print(f"| train voxels/s (params) | {voxels / ours:,.0f} ({ours_params:,}) | plain MONAI UNet "
          f"{voxels / plain:,.0f} ({n_params(unet):,}) | {plain / ours:.2f} |")
    print(f"| s per train step | {ours:.3f} | {plain:.3f} | |")
    print(f"| Shapley s per batch (32 subsets) | reuse {shap['reuse']:.3f} | naive {shap['naive']:.3f} | "
          f"{shap['naive'] / shap['reuse']:.2f}x faster |")


if __name__ == "__main__":
    main()
