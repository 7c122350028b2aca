"""One config source: pyproject's Flower run config, the Config dataclass and overrides agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import Config, config_from_mapping, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_run_config_matches_config_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared.pop("out-dir")
    assert declared == Config().to_run_config()


def test_overrides_are_typed_and_unknown_keys_refused():
    cfg = config_from_mapping(parse_overrides('expert-epochs=3 lr=0.01 gate-aggregation="dro"'))
    assert cfg.expert_epochs == 3 and cfg.lr == 0.01 and cfg.gate_aggregation == "dro"
    assert config_from_mapping(cfg.to_run_config()) == cfg
    with pytest.raises(ValueError, match="unknown config key 'expert-epoch'"):
        config_from_mapping({"expert-epoch": 3})
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        config_from_mapping({"expert-epochs": "many"})
