"""Expert network (light per-modality stems, presence-aware fusion, half-resolution FiLM U-Net body) and the mixture of
experts' outputs that the gate (common/gate.py) weighs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from mome.common.clinical import parse_schema
from mome.common.config import Config
from mome.common.gate import GateNet, gate_weights
from mome.common.labels import LabelKind
from mome.common.state import load_numpy_state

if TYPE_CHECKING:
    from mome.common.patches import Window

# oneDNN's 3D convolutions (backward above all) run 1.5-3x faster on CPU in channels-last layout
CHANNELS_LAST = torch.channels_last_3d
LEAKY_SLOPE = 0.01
LEAKY_RELU = ("leakyrelu", {"negative_slope": LEAKY_SLOPE, "inplace": True})


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST)


def _instance_norm(channels: int) -> tuple:
    """Instance norm (plus a learnt per-channel affine) as one-channel groups: GroupNorm keeps channels-last."""
    return ("group", {"num_groups": channels})


def norm_keys(model: nn.Module) -> set[str]:
    """Parameter names of the model's normalisation layers (what FedBN keeps at each site)."""
    kinds = (nn.GroupNorm, nn.modules.batchnorm._NormBase)
    norms = [name for name, module in model.named_modules() if isinstance(module, kinds)]
    return {f"{n}.{p}" for n in norms for p, _ in model.get_submodule(n).named_parameters()}


def probabilities(logits: torch.Tensor, kind: LabelKind) -> torch.Tensor:
    """Sigmoid for nested regions, softmax over channels for exclusive classes."""
    if LabelKind(kind) is LabelKind.REGIONS:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def drop_modalities(
    presence: torch.Tensor, n_modalities: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hide each present modality (imaging and clinical) with probability p; never all imaging ones of a case."""
    if p <= 0:
        return presence
    draws = torch.rand(presence.shape, generator=generator).to(presence.device)
    kept = presence * (draws >= p).to(presence.dtype)
    imaging, kept_imaging = presence[:, :n_modalities], kept[:, :n_modalities]
    lost = (kept_imaging.sum(1) == 0) & (imaging.sum(1) > 0)
    if lost.any():
        # restore one present modality per emptied case, picked by the same random draws
        pick = torch.argmax(torch.where(imaging > 0, draws[:, :n_modalities], -1.0), dim=1)
        kept[lost, pick[lost]] = 1.0
    return kept


class FiLM(nn.Module):
    """Feature-wise affine modulation of a feature map by an embedding; starts as the identity."""

    def __init__(self, embed_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(embed_dim, 2 * channels)
        # zero init: an untrained conditioning must not disturb the image pathway
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(embedding)[:, :, None, None, None].chunk(2, dim=1)
        return x * (1 + gamma) + beta


class ExpertNet(nn.Module):
    """Segmentation expert: light per-modality stems -> presence-aware mean fusion -> half-resolution U-Net body
    with clinical FiLM -> 2x upsampling and a light full-resolution refinement on the fused stem features.

    Only the stems, the fusion, the refinement and the output head run at full resolution: on CPU the time goes
    to memory traffic of wide full-resolution tensors, so the U-Net body runs from half resolution down.
    """

    def __init__(
        self,
        n_modalities: int,
        n_clinical: int,
        n_out: int,
        stem_channels: int = 8,
        channels: Sequence[int] = (16, 32, 64),
        clinical_hidden: int = 32,
        film_decoder: bool = True,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        self.n_modalities, self.n_clinical, self.n_out = n_modalities, n_clinical, n_out
        self.stem_channels, self.channels, self.film_decoder = stem_channels, channels, film_decoder
        # one 3x3x3 convolution per modality, no norm (inputs are z-scored per channel), at full resolution
        self.stems = nn.ModuleList(
            Convolution(3, 1, stem_channels, kernel_size=3, norm=None, act=LEAKY_RELU) for _ in range(n_modalities)
        )
        # a strided 3x3x3 head per modality: some spatial context (a 1x1x1 head separates the modalities' aux scores
        # far less, which the balancer needs) at the cost of a half-resolution output
        self.aux_heads = nn.ModuleList(
            Convolution(3, stem_channels, n_out, kernel_size=3, strides=2, conv_only=True) for _ in range(n_modalities)
        )
        # body input (half resolution): pooled fused stem features + the presence mask as constant channels
        ins = (stem_channels + n_modalities + 1,) + channels[:-1]
        self.encoders = nn.ModuleList(
            UnetResBlock(3, cin, cout, kernel_size=3, stride=1 if i == 0 else 2, norm_name=_instance_norm(cout))
            for i, (cin, cout) in enumerate(zip(ins, channels))
        )
        self.decoders = nn.ModuleList(
            UnetUpBlock(3, channels[i + 1], channels[i], kernel_size=3, stride=1, upsample_kernel_size=2,
                        norm_name=_instance_norm(channels[i]))
            for i in reversed(range(len(channels) - 1))
        )
        # back to full resolution, concatenated with the fused stem features so fine boundaries survive
        self.upsample = get_conv_layer(3, channels[0], stem_channels, kernel_size=2, stride=2, conv_only=True,
                                       is_transposed=True)
        self.refine = Convolution(3, 2 * stem_channels, stem_channels, kernel_size=3,
                                  norm=_instance_norm(stem_channels), act=LEAKY_RELU)
        self.head = UnetOutBlock(3, stem_channels, n_out)
        # clinical values and their presence bit, so "absent" differs from "all zeros"
        self.clinical_encoder = nn.Sequential(
            nn.Linear(n_clinical + 1, clinical_hidden), nn.GELU(),
            nn.Linear(clinical_hidden, clinical_hidden), nn.GELU(),
        )
        film_channels = [channels[-1]] + (list(reversed(channels[:-1])) + [stem_channels] if film_decoder else [])
        self.films = nn.ModuleList(FiLM(clinical_hidden, c) for c in film_channels)
        self.clinical_head = nn.Linear(clinical_hidden, n_out)
        self.to(memory_format=CHANNELS_LAST)

    @classmethod
    def from_config(cls, cfg: Config, n_clinical: int, n_out: int) -> "ExpertNet":
        return cls(len(cfg.modality_names), n_clinical, n_out, cfg.stem_channels, cfg.channel_list)

    def stem_features(self, image: torch.Tensor) -> torch.Tensor:
        """Per-modality features [B, M, C, D, H, W], computed once and reusable across presence masks.

        All stems run as one grouped convolution (same result as stems[m] on channel m): one kernel call, and its
        channels-last output holds each voxel's M*C features side by side, which the fusion reads as a matrix.
        """
        weight = torch.cat([stem.conv.weight for stem in self.stems])
        bias = torch.cat([stem.conv.bias for stem in self.stems])
        x = F.conv3d(_channels_last(image), weight, bias, padding=1, groups=self.n_modalities)
        return F.leaky_relu(x, LEAKY_SLOPE, inplace=True).unflatten(1, (self.n_modalities, -1))

    def aux_logits(self, stem_feats: torch.Tensor) -> torch.Tensor:
        """Each modality's own segmentation guess [B, M, R, D, H, W], used to measure its contribution.

        The heads predict at half resolution (one grouped convolution, like the stems); the logits are
        nearest-upsampled here, so 2x average pooling (as training does) gives back the heads' output.
        """
        weight = torch.cat([head.conv.weight for head in self.aux_heads])
        bias = torch.cat([head.conv.bias for head in self.aux_heads])
        x = F.conv3d(_channels_last(stem_feats.flatten(1, 2)), weight, bias, stride=2, padding=1,
                     groups=self.n_modalities)
        return F.interpolate(x, size=stem_feats.shape[3:], mode="nearest").unflatten(1, (self.n_modalities, -1))

    def clinical_embedding(self, clinical: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        present = presence[:, self.n_modalities :]
        return self.clinical_encoder(torch.cat([clinical * present, present], dim=1))

    def clinical_logits(self, clinical: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Auxiliary clinical head [B, R]: logits of each output channel's volume fraction."""
        return self.clinical_head(self.clinical_embedding(clinical, presence))

    def _mean_features(self, stem_feats: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Mean of the present modalities' features [B, C, D, H, W] (absent ones are excluded, not zero-averaged)."""
        b, m, c = stem_feats.shape[:3]
        imaging = presence[:, :m].to(stem_feats.dtype)
        weights = imaging / imaging.sum(1, keepdim=True).clamp(min=1.0)
        # one matmul per case over the channels-last voxel matrix (a view of stem_features' output):
        # [voxels, M*C] @ [M*C, C] of stacked weight_m * identity reads and writes each full-size tensor once
        eye = torch.eye(c, dtype=stem_feats.dtype, device=stem_feats.device)
        mixer = (weights[:, :, None, None] * eye).reshape(b, m * c, c)
        voxels = stem_feats.flatten(1, 2).movedim(1, -1)
        fused = voxels.reshape(b, -1, m * c) @ mixer
        return fused.reshape(*voxels.shape[:-1], c).movedim(-1, 1)

    def _with_mask(self, x: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        mask = presence[:, :, None, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)
        return _channels_last(torch.cat([x, mask], dim=1))

    def fuse(self, stem_feats: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        """Mean over present modalities only + mask channels [B, C+M+1, D, H, W]; the body reads it 2x pooled."""
        return self._with_mask(self._mean_features(stem_feats, presence), presence)

    def decode(self, stem_feats: torch.Tensor, presence: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """Fusion + half-resolution U-Net body + full-resolution refinement: logits [B, R, D, H, W]."""
        factor = 2 ** len(self.channels)
        if any(s % factor for s in stem_feats.shape[3:]):
            raise ValueError(f"spatial size {tuple(stem_feats.shape[3:])} must be divisible by {factor}")
        fused = self._mean_features(stem_feats, presence)
        embedding = self.clinical_embedding(clinical, presence)
        # = avg_pool3d(fuse(...), 2): the mask channels are constant, so they are appended after pooling
        x = self._with_mask(F.avg_pool3d(fused, 2), presence)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = self.films[0](skips.pop(), embedding)
        for i, decoder in enumerate(self.decoders):
            x = decoder(x, skips.pop())
            if self.film_decoder:
                x = self.films[i + 1](x, embedding)
        x = self.refine(torch.cat([self.upsample(x), fused], dim=1))
        if self.film_decoder:
            x = self.films[-1](x, embedding)
        return self.head(x)

    def forward(self, image: torch.Tensor, presence: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return self.decode(self.stem_features(image), presence, clinical)


def model_logits(model: ExpertNet, batch: Mapping[str, torch.Tensor], window: "Window | None" = None) -> torch.Tensor:
    """One model's logits on whole cases: sliding windows when a Window is given, else one pass."""
    if window is None:
        return model(batch["image"], batch["presence"], batch["clinical"])
    presence, clinical = batch["presence"], batch["clinical"]
    return window.infer(lambda x, i: model(x, presence[i:i + 1], clinical[i:i + 1]), batch["image"])


def mixing_space(logits: torch.Tensor, kind: LabelKind) -> torch.Tensor:
    """An expert's logits in the space the mixture averages: log-odds for regions, log-probabilities for classes."""
    return logits if LabelKind(kind) is LabelKind.REGIONS else torch.log_softmax(logits, dim=1)


@torch.no_grad()
def expert_logits(experts: Sequence[ExpertNet], batch: Mapping[str, torch.Tensor], kind: LabelKind,
                  window: "Window | None" = None) -> torch.Tensor:
    """Frozen experts' outputs in the space the mixture averages [B, K, R, D, H, W] (eval mode, no graph):
    log-odds for nested regions, log-probabilities for exclusive classes."""
    out = []
    for expert in experts:
        expert.eval()
        out.append(mixing_space(model_logits(expert, batch, window), kind))
    return torch.stack(out, dim=1)


def mixture_logits(
    experts: Sequence[ExpertNet],
    gate: GateNet,
    batch: Mapping[str, torch.Tensor],
    kind: LabelKind,
    cached: torch.Tensor | None = None,
    window: "Window | None" = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate-weighted mean of the experts' log-odds (log-probabilities for classes): the mixture's logits
    [B, R, ...], and the weights [B, K]; grads reach the gate only.

    Not a mean of probabilities: that mixture is less confident than its experts wherever they disagree, so a
    soft loss scores it worse than the single expert it would beat on thresholded Dice, and a gate trained on that
    loss collapses onto one expert per case. In log-odds the mixture keeps its experts' confidence."""
    scores = cached if cached is not None else expert_logits(experts, batch, kind, window)
    weights = gate_weights(gate, batch)
    return (weights[:, :, None, None, None, None] * scores).sum(1), weights


def build_expert(cfg: Config, n_clinical: int, n_out: int, seed: int | None = None) -> ExpertNet:
    """Expert with weights initialised from the seed, leaving the global RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed if seed is None else seed)
        return ExpertNet.from_config(cfg, n_clinical, n_out)


def load_expert(cfg: Config, n_out: int, state: Mapping[str, np.ndarray] | None = None) -> ExpertNet:
    """The expert a config describes, with the given weights (or freshly initialised from the seed)."""
    model = build_expert(cfg, parse_schema(cfg.clinical_fields).width, n_out)
    if state is not None:
        load_numpy_state(model, state)
    return model
