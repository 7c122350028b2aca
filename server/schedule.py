"""The steps of a run, the same for the coordinator and every test that counts them."""

from __future__ import annotations

from mome.common.config import Config, Strategy


def shared_rounds(cfg: Config) -> int:
    """FedAvg rounds (of warmup_epochs each) that give a site at least MoME's local epochs."""
    return -(-cfg.local_epochs // max(cfg.warmup_epochs, 1))


def schedule(cfg: Config) -> list[tuple[str, int]]:
    """The steps of a run: (phase, round index). Baselines get the same local training epochs."""
    strategy = Strategy.parse(cfg.strategy)
    if strategy.mixes:
        return ([("warmup", r) for r in range(cfg.warmup_rounds)] + [("expert", r) for r in range(cfg.expert_rounds)]
                + [("gate", r) for r in range(cfg.gate_rounds)] + [("evaluate", 0)])
    if strategy.federated:
        return [("shared", r) for r in range(shared_rounds(cfg))] + [("evaluate", 0)]
    raise ValueError(f"{strategy} is not a federated strategy")
