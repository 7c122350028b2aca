"""Opt-in differential privacy on what a site uploads: the change it made to the weights it was sent is clipped
to `dp-clip` (L2) and Gaussian noise of std `dp-noise-multiplier` x `dp-clip` is added, at the site, before the
upload. The privacy spent is accounted with Opacus's RDP accountant over every upload of the site (the whole
update is one Gaussian mechanism, no subsampling), kept in <out-dir>/privacy.json across messages and processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mome.common.atomic import write_json
from mome.common.config import Config
from mome.common.state import float_changes, l2_norm

LEDGER = "privacy.json"


def clip_and_noise(update: dict[str, np.ndarray], sent: dict[str, np.ndarray], clip: float, noise_multiplier: float,
                   rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    """sent + clip(update - sent) + N(0, (noise_multiplier * clip)^2); returns it and the clipped change's norm."""
    deltas = float_changes(update, sent)
    norm = l2_norm(deltas.values())
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out = dict(update)
    for n in deltas:
        noisy = deltas[n] * scale + rng.normal(0.0, noise_multiplier * clip, size=deltas[n].shape)
        out[n] = (sent[n] + noisy).astype(sent[n].dtype)
    return out, norm * scale


# RDP orders: Opacus's default grid starts at 1.1; small noise needs orders nearer 1 for a tight bound
ORDERS = [1.0 + x / 100 for x in range(1, 10)] + [1.0 + x / 10 for x in range(1, 100)] + list(range(12, 256))


def epsilon(noise_multipliers: list[float], delta: float) -> float:
    """Epsilon at delta of the Gaussian mechanisms applied so far (one per upload, the whole update each time).

    The whole update is clipped to C, so one patient more or less can move it anywhere in a ball of radius C: the
    sensitivity is 2C, and noise of std s x C is a Gaussian mechanism of noise multiplier s / 2."""
    if not noise_multipliers:
        return 0.0
    from opacus.accountants import RDPAccountant  # here: opacus costs every ClientApp process 1.5 s to import

    accountant = RDPAccountant()
    accountant.history = [(sigma / 2, 1.0, 1) for sigma in noise_multipliers]
    return float(accountant.get_epsilon(delta, alphas=ORDERS))


class PrivacyLedger:
    """The uploads a site has made under DP, on disk beside its model, and the epsilon they add up to."""

    def __init__(self, out_dir: Path | None, cfg: Config, site_id: str):
        self.path = (out_dir / LEDGER) if out_dir is not None else None
        self.cfg, self.site_id = cfg, site_id
        self.uploads: list[dict] = json.loads(self.path.read_text())["uploads"] if self.path and self.path.exists() \
            else []

    @property
    def enabled(self) -> bool:
        return self.cfg.dp_clip > 0

    def privatise(self, update: dict[str, np.ndarray], sent: dict[str, np.ndarray], what: str,
                  step: str) -> tuple[dict[str, np.ndarray], dict]:
        """The upload with DP applied, recorded; metrics: epsilon so far at dp-delta."""
        # the one random choice not seeded from config: noise the coordinator could regenerate protects nothing
        noisy, clipped = clip_and_noise(update, sent, self.cfg.dp_clip, self.cfg.dp_noise_multiplier,
                                        np.random.default_rng())
        self.uploads.append({"step": step, "what": what, "noise_multiplier": self.cfg.dp_noise_multiplier,
                             "clip": self.cfg.dp_clip, "clipped_norm": clipped})
        if self.path is not None:
            write_json(self.path, {"site": self.site_id, "uploads": self.uploads})
        return noisy, self.spent()

    def spent(self) -> dict:
        sigmas = [u["noise_multiplier"] for u in self.uploads]
        if not sigmas:
            return {}
        eps = float("inf") if min(sigmas) <= 0 else epsilon(sigmas, self.cfg.dp_delta)
        return {"dp_epsilon": eps, "dp_delta": self.cfg.dp_delta}
