"""The gate: a small router from cheap case summaries to weights over the experts, and how one is built and loaded."""

from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from mome.common.clinical import parse_schema
from mome.common.config import Config
from mome.common.state import load_numpy_state

ANCHOR = "anchor"  # GateNet buffer: a floor on one expert's weight


class GateNet(nn.Module):
    """Router: cheap case summaries -> softmax weights over K experts (optionally top-k sparse)."""

    def __init__(
        self, n_modalities: int, n_clinical: int, n_experts: int, pool: int = 8, hidden: int = 32, top_k: int = 0
    ):
        super().__init__()
        self.n_modalities, self.n_experts, self.pool, self.top_k = n_modalities, n_experts, pool, top_k
        conv_channels, grid = 8, 2
        self.image_encoder = nn.Sequential(
            Convolution(3, n_modalities, conv_channels, strides=2, kernel_size=3, norm=None, act="RELU"),
            nn.AdaptiveAvgPool3d(grid),
            nn.Flatten(),
        )
        n_vector = conv_channels * grid**3 + (n_modalities + 1) + n_clinical + 2 * n_modalities
        self.mlp = nn.Sequential(nn.Linear(n_vector, hidden), nn.ReLU(), nn.Linear(hidden, n_experts))

    @classmethod
    def from_config(cls, cfg: Config, n_clinical: int, n_experts: int) -> "GateNet":
        m = len(cfg.modality_names)
        return cls(m, n_clinical, n_experts, cfg.gate_pool, cfg.gate_hidden, cfg.gate_top_k)

    @property
    def prior(self) -> nn.Parameter:
        """The output bias: the part of the routing that is the same for every case (a site-level preference)."""
        return self.mlp[-1].bias

    def logits(self, image, presence, clinical, stats) -> torch.Tensor:
        imaging = presence[:, : self.n_modalities, None, None, None]
        small = F.adaptive_avg_pool3d(image, self.pool) * imaging
        return self.mlp(torch.cat([self.image_encoder(small), presence, clinical, stats], dim=1))

    def forward(self, image, presence, clinical, stats) -> torch.Tensor:
        weights = torch.softmax(self.logits(image, presence, clinical, stats), dim=1)
        if 0 < self.top_k < self.n_experts:
            keep = torch.zeros_like(weights).scatter(1, weights.topk(self.top_k, dim=1).indices, 1.0)
            weights = weights * keep
            weights = weights / weights.sum(1, keepdim=True)
        if hasattr(self, ANCHOR):
            weights = (1 - self.anchor.sum()) * weights + self.anchor
        return weights

    def anchored(self, expert: int, share: float) -> "GateNet":
        """A copy whose every case gives `expert` at least `share` of the weight (the rest routed as before). Only a
        site's kept gate has the anchor, a buffer that its bundle stores: the gate that travels never does."""
        gate = copy.deepcopy(self)
        anchor = torch.zeros(self.n_experts)
        anchor[expert] = share
        gate.register_buffer(ANCHOR, anchor)
        return gate


def gate_weights(gate: GateNet, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The case's weights over the experts, from its whole-case summary (the image pooled to gate_pool^3, which the
    gate pools again to the same; a batch of whole images without one works too): the same for every patch."""
    summary = batch["summary"] if "summary" in batch else batch["image"]
    return gate(summary, batch["presence"], batch["clinical"], batch["stats"])


def build_gate(cfg: Config, n_clinical: int, n_experts: int, seed: int | None = None) -> GateNet:
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed if seed is None else seed)
        return GateNet.from_config(cfg, n_clinical, n_experts)


def load_gate(cfg: Config, n_experts: int, state: Mapping[str, np.ndarray] | None = None) -> GateNet:
    """The gate over n_experts a config describes, with the given weights (or freshly initialised); a kept gate's
    state carries its anchor (GateNet.anchored)."""
    gate = build_gate(cfg, parse_schema(cfg.clinical_fields).width, n_experts)
    if state is not None and ANCHOR in state:
        anchor = np.asarray(state[ANCHOR], dtype=np.float64)
        if anchor.shape != (n_experts,) or anchor.min() < 0 or anchor.sum() > 1:
            raise ValueError(f"the gate's anchor {anchor.tolist()} is not a share of {n_experts} experts")
        gate.register_buffer(ANCHOR, torch.zeros(n_experts))
    if state is not None:
        load_numpy_state(gate, state)
    return gate
