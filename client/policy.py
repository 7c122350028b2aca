"""What a site lets the coordinator ask of it: limits set in the SuperNode's node config (or a policy file it
points to) that no run config can exceed. A request beyond them is refused, naming the limit; the site stays up."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from flwr.app import Message

from mome.common.config import MAX_SIDE, Strategy, from_mapping, request_config
from mome.common.schema import expert_count
from mome.common.wire import Key, record_bytes

PREFIX = "policy-"  # node-config keys: policy-max-size=96 ..., or policy-file="/etc/mome/policy.toml"


class PolicyRefusal(ValueError):
    """A request beyond the site's policy; the message names the limit and is sent to the coordinator."""


@dataclass(frozen=True)
class SitePolicy:
    max_size: int = MAX_SIDE  # voxels per side of a training patch
    max_channels: int = 256  # widest feature level of the network
    max_batch_size: int = 16
    max_epochs: int = 50  # local epochs in one message (training, fine-tuning, personalisation)
    max_gate_steps: int = 2000
    max_experts: int = 32
    max_message_mb: float = 2048.0  # weights in one request
    allowed_strategies: str = "mome,fedavg,fedavg-ft,fedbn,fedsm"
    # floors the coordinator cannot lower (0: the run config's value is accepted)
    min_cases: int = 0  # e.g. 3: refuse a run config with min-cases below it
    min_dp_noise_multiplier: float = 0.0  # > 0: refuse uploads without DP at least this noise

    @classmethod
    def from_node_config(cls, node: Mapping) -> "SitePolicy":
        values = {}
        if node.get(f"{PREFIX}file"):
            values.update(tomllib.loads(Path(str(node[f"{PREFIX}file"])).read_text()))
        values.update({k[len(PREFIX):]: v for k, v in node.items() if k.startswith(PREFIX) and k != f"{PREFIX}file"})
        return from_mapping(cls, values, "site policy", PREFIX)

    def check(self, msg: Message) -> None:
        """Raise PolicyRefusal if the request asks for more than this site allows."""
        content = msg.content
        if Key.CONFIG not in content.config_records:
            return
        try:  # only the config keys (and values) of this protocol version
            cfg = request_config(content[Key.CONFIG])
        except ValueError as exc:
            raise PolicyRefusal(f"request config: {str(exc)[:200]}") from None
        phase = content.config_records.get("phase", {})
        epochs = max([int(phase.get("epochs", 0)), int(phase.get("finetune-epochs", 0)), cfg.personalise_epochs])
        asked = {"patch side": (max(cfg.patch) if cfg.patch_size else 0, self.max_size), "channels": (max(cfg.channel_list), self.max_channels),
                 "batch-size": (cfg.batch_size, self.max_batch_size), "epochs": (epochs, self.max_epochs),
                 "gate-steps": (cfg.gate_steps, self.max_gate_steps),
                 "experts": (expert_count(content), self.max_experts),
                 "message MB": (record_bytes(content) / 2**20, self.max_message_mb)}
        for name, (value, limit) in asked.items():
            if value > limit:
                raise PolicyRefusal(f"{name} {value:g} above this site's limit {limit:g}")
        if cfg.min_cases < self.min_cases:
            raise PolicyRefusal(f"min-cases {cfg.min_cases} below this site's floor {self.min_cases}")
        if self.min_dp_noise_multiplier > 0 and (cfg.dp_clip <= 0 or
                                                 cfg.dp_noise_multiplier < self.min_dp_noise_multiplier):
            raise PolicyRefusal(f"dp-noise-multiplier {cfg.dp_noise_multiplier:g} (dp-clip {cfg.dp_clip:g}) below "
                                f"this site's floor {self.min_dp_noise_multiplier:g}")
        allowed = {s.strip() for s in self.allowed_strategies.split(",")}
        if Strategy.parse(cfg.strategy) not in allowed:
            raise PolicyRefusal(f"strategy {cfg.strategy} not among this site's allowed strategies "
                                f"({', '.join(sorted(allowed))})")

