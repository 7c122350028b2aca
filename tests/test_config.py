"""One config source: pyproject's Flower run config, the Config dataclass and overrides agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mome.common.config import COORDINATOR_KEYS, Config, Strategy, config_from_mapping, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_config_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert {key: declared.pop(key) for key in COORDINATOR_KEYS} == COORDINATOR_KEYS
    assert declared == Config().to_run_config()


def test_overrides_are_typed_and_unknown_keys_refused():
    cfg = config_from_mapping(parse_run_config('expert-epochs=3 lr=0.01 gate-aggregation="dro"'))
    assert cfg.expert_epochs == 3 and cfg.lr == 0.01 and cfg.gate_aggregation == "dro"
    assert config_from_mapping(cfg.to_run_config()) == cfg
    with pytest.raises(ValueError, match="unknown config key 'expert-epoch'"):
        config_from_mapping({"expert-epoch": 3})
    with pytest.raises(ValueError, match="config key 'expert-epochs': cannot read 'many' as int"):
        config_from_mapping({"expert-epochs": "many"})
    with pytest.raises(ValueError, match=r"gate-trim-fraction 0.5 must be in \[0, 0.5\)"):
        config_from_mapping({"gate-trim-fraction": 0.5})  # refused before any site starts, not dropped per round


def test_one_run_config_syntax_for_sim_and_deployment():
    """`flwr run --run-config` syntax (TOML values), plus bare words as strings; typos fail before any site runs."""
    values = parse_run_config('gate-aggregation=dro channels="8,16" modalities=T1,T2 lr=1e-2 warmup-rounds=0 '
                              "out-dir='/tmp/x'")
    assert values == {"gate-aggregation": "dro", "channels": "8,16", "modalities": "T1,T2", "lr": 0.01,
                      "warmup-rounds": 0, "out-dir": "/tmp/x"}
    assert parse_run_config("") == {} and parse_run_config(None) == {}
    with pytest.raises(ValueError, match="unknown config key 'expert-epoch'"):
        parse_run_config("expert-epoch=3")
    with pytest.raises(ValueError, match="not key=value"):
        parse_run_config("expert-epochs 3")


def test_strategy_names_and_the_budget_every_baseline_gets():
    assert [s.value for s in Strategy] == ["mome", "fedavg", "fedavg-ft", "fedbn", "fedsm", "local", "centralized"]
    assert [s for s in Strategy if s.federated] == ["mome", "fedavg", "fedavg-ft", "fedbn", "fedsm"]
    assert [s for s in Strategy if s.mixes] == ["mome", "fedsm"]
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        Strategy.parse("fedprox")
    cfg = Config(warmup_rounds=3, warmup_epochs=2, expert_rounds=2, expert_epochs=5)
    assert cfg.local_epochs == 3 * 2 + 2 * 5


def test_a_request_config_is_built_once_for_the_guard_the_policy_and_the_handler(monkeypatch):
    from flwr.app import ConfigRecord

    from mome.common import config

    built = []
    monkeypatch.setattr(config, "config_from_mapping", lambda values: built.append(values) or Config(**{}))
    config._cached_config.cache_clear()
    record = ConfigRecord({"seed": 3, "channels": "8,16,32", "modalities": "T1,T2"})
    for _ in range(3):  # what one message's guard, policy check and handler each ask for
        config.request_config(record)
    assert len(built) == 1 and built[0] == dict(record)
    config._cached_config.cache_clear()
