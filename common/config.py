"""One typed configuration for data, model, training and federation, read from Flower's run config."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import tomllib
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from enum import StrEnum
from typing import Any, Mapping

OUT_DIR_KEY = "out-dir"  # run-config key for where the coordinator writes; not a training setting
SITE_KEYS_KEY = "site-keys"  # the coordinator's folder of enrolled signing keys, <site-id>.pub ("" = unsigned)
LABELS_KEY = "labels"  # the coordinator's dataset.json: the federation's label contract ("" = what every site declares)
COORDINATOR_KEYS = {OUT_DIR_KEY: "runs/coordinator", SITE_KEYS_KEY: "",
                    LABELS_KEY: ""}  # run-config keys sites are never sent
MAX_SIDE = 160  # no training patch side above this (a site's default policy-max-size)


class Strategy(StrEnum):
    """What `mome sim` can run; the first three are federated (Flower), the last two simulation-only references."""

    MOME = "mome"
    FEDAVG = "fedavg"
    FEDAVG_FT = "fedavg-ft"  # FedAvg, then local fine-tuning at each site
    FEDBN = "fedbn"  # FedAvg whose normalisation layers stay at each site (FedBN, Li et al. 2021)
    FEDSM = "fedsm"  # MoME's experts, but a selector trained to tell the sites apart picks one (FedSM, Xu et al. 2022)
    LOCAL = "local"  # each site alone
    CENTRALIZED = "centralized"  # pooled data: an upper reference, impossible in a real federation

    @property
    def federated(self) -> bool:
        return self in (Strategy.MOME, Strategy.FEDAVG, Strategy.FEDAVG_FT, Strategy.FEDBN, Strategy.FEDSM)

    @property
    def mixes(self) -> bool:
        """Per-site experts and a gate over them (MoME's protocol); the others share one model."""
        return self in (Strategy.MOME, Strategy.FEDSM)

    @classmethod
    def parse(cls, name: str) -> "Strategy":
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown strategy {name!r}; choose from {' | '.join(cls)}") from None


PERSONALISE = ("prior", "gate")  # the gate's output bias alone, or all of the gate
FINAL_MIXTURES = ("personal", "validated")  # the personalised gate's mixture; or chosen on validation cases


class GateAggregation(StrEnum):
    """How the server combines the sites' gate updates."""

    FEDAVG = "fedavg"  # weighted by the sites' declared validation cases
    DRO = "dro"  # ... and by exp(loss / T): sites the gate serves worst count more
    TRIMMED_MEAN = "trimmed-mean"  # Flower's FedTrimmedAvg, unweighted
    MEDIAN = "median"  # Flower's FedMedian, unweighted


# settings that change how a run is operated, not what it computes
OPERATIONAL = {"min_sites", "start_sites", "step_retries", "force_resume", "connect_timeout", "round_timeout"}


@dataclass(frozen=True)
class Config:
    """Every knob of a run. Flower run-config keys are the kebab-case field names."""

    # data
    modalities: str = "T1,T1ce,T2,FLAIR"  # federation-wide imaging vocabulary, in channel order
    clinical_fields: str = "age=num:100,sex=cat:F|M,risk=cat:low|high"  # name=num:scale | name=cat:a|b
    size: int = 48  # voxels per side of the synthetic heads `mome sim` generates (training follows the plan)
    # plan: the federation's geometry, planned by the coordinator from the sites' aggregate geometry unless set
    target_spacing: str = ""  # "x,y,z" mm in RAS; every case is resampled to it
    patch_size: str = ""  # "x,y,z" voxels of a training patch
    max_patch_voxels: int = 96**3  # memory budget of one training patch (the planned patch fits under it)
    infer_voxels: int = 4_000_000  # largest sliding window at inference (a smaller case is one window)
    sw_overlap: float = 0.25  # sliding-window overlap
    val_fraction: float = 0.2  # share of a site's training cases held out for validation
    max_voxels: int = 64_000_000  # a NIfTI whose header declares more voxels (x channels) is refused unread
    # model
    stem_channels: int = 8
    channels: str = "16,32,64"  # shared body: feature channels per resolution level
    modality_dropout: float = 0.25  # chance of hiding each present modality during training
    aug_blur: float = 0.2  # chance a training patch is blurred (Gaussian, 0.5-1.0 voxels): softer scanner kernels
    aux_weight: float = 0.3  # weight of the per-modality auxiliary head losses
    balance_alpha: float = 1.0  # strength of the modality loss factors (0 disables balancing)
    gate_pool: int = 8  # gate sees channels average-pooled to gate_pool^3
    gate_hidden: int = 32
    gate_top_k: int = 0  # 0 = dense softmax over all experts
    # training
    seed: int = 0
    lr: float = 3e-3
    lr_decay: bool = False  # anneal each training call's lr to 0 (nnU-Net's poly): the kept last epoch settles
    batch_size: int = 2
    expert_epochs: int = 4  # = warmup-epochs: the expert round is also the last FedAvg round (experts-update-shared)
    gate_steps: int = 30  # gate optimiser steps per gate round, on the site's held-out split
    gate_prior_lr: float = 3e-2  # lr of the gate's output bias, its case-independent preference over experts
    own_prior_cases: float = 1.0  # MoME: the kept gate gives the own expert >= this/(this + cases it was tuned on)
    personalise_epochs: int = 3  # fedavg-ft's local fine-tuning; MoME personalises its gate for as many steps
    personalise: str = "prior"  # what a MoME site's personalisation fits: the gate's "prior" or the whole "gate"
    personal_prior_lr: float = 0.1  # lr of the gate's output bias in personalisation
    final_mixture: str = "personal"  # what a MoME site keeps: "personal", or "validated" (client/choice.py)
    # federation
    strategy: str = "mome"  # a Strategy
    warmup_rounds: int = 9
    warmup_epochs: int = 4  # local epochs per warm-up (and matching FedAvg) round
    expert_rounds: int = 1
    shared_expert: bool = True  # the mixture also holds the federation's shared warm-up model (a generalist)
    experts_update_shared: bool = True  # the first expert round is also a FedAvg round of the shared model
    refresh_own_expert: bool = True  # at the end a site's own expert is the shared model fine-tuned as fedavg-ft's
    gate_rounds: int = 2
    gate_aggregation: str = "trimmed-mean"  # a GateAggregation
    dro_temperature: float = 1.0
    dro_max_loss: float = 10.0  # DRO reads each site's loss clipped to [0, this]
    gate_trim_fraction: float = 0.34  # trimmed-mean: share cut from each tail (Flower's FedTrimmedAvg beta): 1 of 3-5
    # coordinator integrity: no single site can take over what the others get
    max_site_cases: int = 100_000  # a site's declared case counts are capped here before they weigh anything
    max_site_weight: float = 0.5  # no site's aggregation weight exceeds this (or 1/n_sites where that is larger)
    max_update_ratio: float = 3.0  # L2 change a site may make, relative to the norm of the weights it was sent
    max_update_norm: float = 1e4  # absolute ceiling on that change
    update_clip: float = 2.0  # MoME/FedSM, 3+ sites: each change clipped to this x the median site's, the round's too
    min_sites: int = 2  # quorum: a step needs this many good replies (else retried, then the run stops)
    start_sites: int = 0  # the run starts once this many sites are connected (0: min-sites)
    step_retries: int = 1  # times a step short of quorum is sent again
    force_resume: bool = False  # resume from a checkpoint made with another training config
    # what a site releases
    min_cases: int = 3  # no metric or trained update leaves a site if computed from fewer cases
    dp_clip: float = 0.0  # > 0: clip each upload's change to this L2 norm and add Gaussian noise (differential privacy)
    dp_noise_multiplier: float = 0.0  # noise std = dp-noise-multiplier x dp-clip
    dp_delta: float = 1e-5  # the delta at which each site's epsilon is reported
    connect_timeout: float = 300.0  # seconds to wait for the sites to connect
    round_timeout: float = 900.0  # seconds to wait for sites' replies in one step

    def __post_init__(self) -> None:
        if self.gate_aggregation not in set(GateAggregation):
            raise ValueError(f"gate-aggregation {self.gate_aggregation!r}; choose from {' | '.join(GateAggregation)}")
        if self.personalise not in PERSONALISE:
            raise ValueError(f"personalise {self.personalise!r}; choose from {' | '.join(PERSONALISE)}")
        if self.final_mixture not in FINAL_MIXTURES:
            raise ValueError(f"final-mixture {self.final_mixture!r}; choose from {' | '.join(FINAL_MIXTURES)}")
        if not 0.0 <= self.gate_trim_fraction < 0.5:  # Flower's trimmed mean cuts this share from each tail
            raise ValueError(f"gate-trim-fraction {self.gate_trim_fraction} must be in [0, 0.5)")
        for value, prop in ((self.target_spacing, "spacing"), (self.patch_size, "patch")):
            if value:
                getattr(self, prop)  # a malformed plan fails here, naming the key

    @property
    def training(self) -> dict[str, Any]:
        """The settings a checkpoint's weights depend on (resume refuses a checkpoint made with others)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL}

    @property
    def planned(self) -> bool:
        return bool(self.target_spacing and self.patch_size)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return _triple(self.target_spacing, float, "target-spacing")

    @property
    def patch(self) -> tuple[int, int, int]:
        return _triple(self.patch_size, int, "patch-size")

    @property
    def divisor(self) -> int:
        """Spatial sizes the expert takes are multiples of this: its body halves the resolution once per level."""
        return 2 ** len(self.channel_list)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.modalities.split(",") if m.strip())

    @property
    def local_epochs(self) -> int:
        """Epochs of local training a site spends in MoME (warm-up + expert rounds): every baseline gets as many."""
        return self.warmup_rounds * self.warmup_epochs + self.expert_rounds * self.expert_epochs

    @property
    def channel_list(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.channels.split(","))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case keys, as Flower's run config carries them."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items()}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))


def _triple(text: str, kind: type, name: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"{name} {text!r}: expected three positive numbers x,y,z (the plan sets it when empty)")
    return values


def from_mapping(cls: type, values: Mapping[str, Any], what: str = "config", prefix: str = ""):
    """An instance of a dataclass of typed defaults (Config, a site's policy) from kebab- or snake-case keys, each
    value read as its default's type; errors name each key as the user wrote it (`prefix` + key)."""
    known = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = [key for key in values if key.replace("-", "_") not in known]
    if unknown:
        raise ValueError(f"unknown {what} key {', '.join(repr(prefix + k) for k in unknown)}; known keys: "
                         f"{', '.join(sorted(prefix + k.replace('_', '-') for k in known))}")
    kwargs = {}
    for key, value in values.items():
        kind = type(known[key.replace("-", "_")])
        try:
            kwargs[key.replace("-", "_")] = _coerce(value, kind)
        except (TypeError, ValueError):
            raise ValueError(f"{what} key {prefix + key!r}: cannot read {value!r} as {kind.__name__}") from None
    return cls(**kwargs)


def config_from_mapping(values: Mapping[str, Any]) -> Config:
    """Build a Config from run-config style keys (kebab or snake case); unknown keys are an error."""
    return from_mapping(Config, values)


def request_config(record: Mapping[str, Any]) -> Config:
    """A message's config record as a Config, built once per distinct record: a site's guard, its policy check and
    the handler of one message all read the same request."""
    return _cached_config(tuple(sorted((k, type(v).__name__, tuple(v) if isinstance(v, list) else v)
                                       for k, v in record.items())))


@functools.lru_cache(maxsize=4)
def _cached_config(items: tuple) -> Config:
    return config_from_mapping({k: list(v) if isinstance(v, tuple) else v for k, _, v in items})


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    return kind(value)


# `flwr run --run-config` syntax: space-separated key=value, values quoted or bare
_RUN_CONFIG_ITEM = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)""")


def parse_run_config(text: str | None) -> dict[str, Any]:
    """'k=v k2="s" k3=word' -> {k: v}, read as `flwr run --run-config` reads it (each value TOML: numbers, bools,
    quoted strings) except that a bare word is taken as a string. Keys are checked against Config (the
    coordinator-only `out-dir` aside), so a typo fails here, before any site starts."""
    values: dict[str, Any] = {}
    rest = _RUN_CONFIG_ITEM.sub("", text or "").strip()
    if rest:
        raise ValueError(f"run config {rest!r} is not key=value")
    for key, raw in _RUN_CONFIG_ITEM.findall(text or ""):
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    config_from_mapping({k: v for k, v in values.items() if k not in COORDINATOR_KEYS})
    return values


def package_version() -> str:
    """The installed mome-fl version ("unknown" from a bare checkout)."""
    try:
        return metadata.version("mome-fl")
    except metadata.PackageNotFoundError:
        return "unknown"


def selector_config(cfg: Config) -> Config:
    """The config a strategy's mixture is used with: FedSM's selector routes each case to one expert (top-1)."""
    return cfg.replace(gate_top_k=1) if cfg.strategy == Strategy.FEDSM else cfg
