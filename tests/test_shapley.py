"""Exact Shapley values of modality contributions: efficiency, null players, reuse == naive, per-site summary."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mome.common.config import Config
from mome.common.metrics import dice_score
from mome.common.model import build_expert, probabilities
from mome.common.shapley import shapley_values, site_shapley

M, F, SIZE, R = 4, 3, 16, 2
CFG = Config(channels="8,16,32", stem_channels=4)


def random_batch(seed: int) -> dict[str, torch.Tensor]:
    """Cases with different presence patterns (one without clinical, one with a single modality)."""
    g = torch.Generator().manual_seed(seed)
    presence = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 1, 0, 0], [1, 1, 0, 1, 0]], dtype=torch.float32)
    b = presence.shape[0]
    image = torch.randn(b, M, SIZE, SIZE, SIZE, generator=g) * presence[:, :M, None, None, None]
    label = (torch.rand(b, R, SIZE, SIZE, SIZE, generator=g) > 0.6).float()
    clinical = torch.randn(b, F, generator=g) * presence[:, M:]
    return {"image": image, "presence": presence, "clinical": clinical, "stats": torch.zeros(b, 2 * M), "label": label}


@pytest.fixture(scope="module")
def model():
    return build_expert(CFG, F, R).eval()


def value(model, batch, presence, score):
    with torch.no_grad():
        return score(probabilities(model(batch["image"], presence, batch["clinical"]), "regions"), batch["label"])


@pytest.mark.parametrize("hard", [False, True])
def test_values_sum_to_full_minus_empty(model, hard):
    batch = random_batch(0)
    score = partial(dice_score, kind="regions", hard=hard)
    phi = shapley_values(model, batch, "regions", score=score)
    assert phi.shape == (4, M + 1)
    gain = value(model, batch, batch["presence"], score) - value(model, batch, 0 * batch["presence"], score)
    torch.testing.assert_close(phi.sum(1), gain.double(), atol=1e-5, rtol=0)
    assert (phi[batch["presence"] == 0] == 0).all(), "an absent modality contributes nothing"


def test_feature_reuse_matches_naive_reruns(model):
    batch = random_batch(1)
    fast = shapley_values(model, batch, "regions", mode="reuse")
    slow = shapley_values(model, batch, "regions", mode="naive")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    against_prediction = shapley_values(model, batch, "regions", reference="prediction")
    assert torch.isfinite(against_prediction).all()


def test_single_player_gets_the_whole_gain(model):
    batch = random_batch(2)
    phi = shapley_values(model, batch, "regions")
    score = partial(dice_score, kind="regions")
    gain = value(model, batch, batch["presence"], score) - value(model, batch, 0 * batch["presence"], score)
    assert phi[2, 2].item() == pytest.approx(gain[2].item(), abs=1e-5)  # case 2 has only T2


def test_site_summary_averages_over_cases_that_have_the_player(model):
    batches = [random_batch(0), random_batch(3)]
    out = site_shapley(model, batches, "regions", CFG.modality_names)
    assert out["n"] == 8
    assert out["n_present"] == {"T1": 6, "T1ce": 4, "T2": 6, "FLAIR": 4, "clinical": 4}
    phi = torch.cat([shapley_values(model, b, "regions") for b in batches])
    assert out["shapley"]["T1ce"] == pytest.approx(phi[:, 1].sum().item() / 4)
    with pytest.raises(ValueError):
        shapley_values(model, batches[0], "regions", mode="fast")
