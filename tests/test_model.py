"""Shapes, dtypes and robustness of the expert, the gate and the mixture; modality dropout; state round trip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.nn.functional import avg_pool3d, interpolate

from mome.common.clinical import parse_schema
from mome.common.config import Config
from mome.common.metrics import dice_score, evaluate, expert_predictor, mixture_predictor
from mome.common.gate import GateNet, build_gate, load_gate
from mome.common.model import ExpertNet, build_expert, drop_modalities, mixture_logits, probabilities
from mome.common.state import load_numpy_state, load_state, save_state, state_to_numpy

M, F, SIZE = 4, 3, 16
CFG = Config(channels="8,16,32", stem_channels=4)


def all_patterns_batch(kind: str, n_out: int) -> dict[str, torch.Tensor]:
    """One case per presence pattern: all 2^M imaging subsets x clinical on/off."""
    g = torch.Generator().manual_seed(0)
    presence = torch.tensor(list(itertools.product([0.0, 1.0], repeat=M + 1)))
    b = presence.shape[0]
    image = torch.randn(b, M, SIZE, SIZE, SIZE, generator=g) * presence[:, :M, None, None, None]
    labels = torch.randint(0, n_out, (b, SIZE, SIZE, SIZE), generator=g)
    onehot = torch.nn.functional.one_hot(labels, n_out).movedim(-1, 1).float()
    label = onehot if kind == "classes" else (torch.rand(b, n_out, SIZE, SIZE, SIZE, generator=g) > 0.7).float()
    return {
        "image": image,
        "presence": presence,
        "clinical": torch.randn(b, F, generator=g) * presence[:, M:],
        "stats": torch.rand(b, 2 * M, generator=g) * presence[:, :M].repeat(1, 2),
        "label": label,
    }


@pytest.mark.parametrize("kind,n_out", [("regions", 3), ("classes", 4)])
def test_every_presence_pattern_gives_finite_outputs(kind, n_out):
    batch = all_patterns_batch(kind, n_out)
    b = batch["image"].shape[0]
    assert b == 2 ** (M + 1)
    model = build_expert(CFG, F, n_out).eval()
    with torch.no_grad():
        feats = model.stem_features(batch["image"])
        logits = model.decode(feats, batch["presence"], batch["clinical"])
        aux = model.aux_logits(feats)
        clin = model.clinical_logits(batch["clinical"], batch["presence"])
    assert feats.shape == (b, M, CFG.stem_channels, SIZE, SIZE, SIZE)
    assert logits.shape == (b, n_out, SIZE, SIZE, SIZE) and logits.dtype == torch.float32
    assert aux.shape == (b, M, n_out, SIZE, SIZE, SIZE)
    assert clin.shape == (b, n_out)
    for t in (feats, logits, aux, clin):
        assert torch.isfinite(t).all()
    experts = [model, build_expert(CFG, F, n_out, seed=1)]
    gate = build_gate(CFG.replace(gate_pool=4), F, n_experts=2)
    logits, weights = mixture_logits(experts, gate, batch, kind)
    probs = probabilities(logits, kind)
    assert probs.shape == (b, n_out, SIZE, SIZE, SIZE) and weights.shape == (b, 2)
    assert torch.isfinite(probs).all() and torch.allclose(weights.sum(1), torch.ones(b))
    if kind == "classes":
        assert torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-5)
    result = evaluate(mixture_predictor(experts, gate, kind), [batch], kind)
    assert result["n"] == b and len(result["dice"]) == (n_out if kind == "regions" else n_out - 1)
    assert all(np.isfinite(v) for v in [*result["dice"], result["dice_mean"], result["hd95"]])


def test_absent_modality_is_excluded_not_zero_averaged():
    model = build_expert(CFG, F, 2).eval()
    g = torch.Generator().manual_seed(1)
    image, clinical = torch.randn(1, M, SIZE, SIZE, SIZE, generator=g), torch.randn(1, F, generator=g)
    presence = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    scrambled = image.clone()
    scrambled[:, [1, 3]] = torch.randn(1, 2, SIZE, SIZE, SIZE, generator=g)  # what an absent channel holds is ignored
    with torch.no_grad():
        assert torch.allclose(model(image, presence, clinical), model(scrambled, presence, clinical))
        feats = model.stem_features(image)
        fused = model.fuse(feats, presence)[:, : CFG.stem_channels]
        assert torch.allclose(fused, (feats[:, 0] + feats[:, 2]) / 2, atol=1e-6)


@pytest.mark.parametrize("kind", ["regions", "classes"])
def test_mixture_averages_log_odds_so_agreeing_experts_keep_their_confidence(kind):
    """Two experts: one sure (+4 log-odds), one mildly against (-2). Averaging probabilities would give 0.55 and
    a loss that prefers the sure expert alone; in log-odds the equal mixture is sigmoid(1) = 0.73."""
    batch = all_patterns_batch(kind, 2)
    b = batch["image"].shape[0]
    gate = build_gate(CFG.replace(gate_pool=4), F, n_experts=2)
    with torch.no_grad():  # an equal-weight gate
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.zero_()
    shape = (b, 1, 2, SIZE, SIZE, SIZE)
    if kind == "regions":
        scores = torch.cat([torch.full(shape, 4.0), torch.full(shape, -2.0)], dim=1)
        expected = torch.sigmoid(torch.tensor(1.0))
    else:  # log-probabilities of the two classes: expert 1 gives p1 = 0.9, expert 2 gives p1 = 0.3
        p = torch.tensor([[0.1, 0.9], [0.7, 0.3]])
        scores = p.log()[None, :, :, None, None, None].expand(b, 2, 2, SIZE, SIZE, SIZE)
        expected = torch.softmax(p.log().mean(0), dim=0)[1]
    logits, weights = mixture_logits([], gate, batch, kind, cached=scores)
    probs = probabilities(logits, kind)
    assert torch.allclose(weights, torch.full((b, 2), 0.5))
    assert torch.allclose(probs[:, 1 if kind == "classes" else 0], expected.expand_as(probs[:, 0]), atol=1e-6)


def test_top_k_gate_keeps_k_experts():
    gate = GateNet(M, F, n_experts=4, pool=4, hidden=8, top_k=2)
    batch = all_patterns_batch("regions", 1)
    weights = gate(batch["image"], batch["presence"], batch["clinical"], batch["stats"])
    assert ((weights > 0).sum(1) == 2).all() and torch.allclose(weights.sum(1), torch.ones(len(weights)))


def test_an_anchored_gate_keeps_its_floor_through_a_bundle_and_the_travelling_gate_has_none():
    gate = load_gate(CFG, 3)
    batch = all_patterns_batch("regions", 1)
    batch["clinical"] = torch.randn(len(batch["image"]), parse_schema(CFG.clinical_fields).width)
    before = gate(batch["image"], batch["presence"], batch["clinical"], batch["stats"])
    kept = gate.anchored(2, 0.5)
    after = kept(batch["image"], batch["presence"], batch["clinical"], batch["stats"])
    assert torch.allclose(after, 0.5 * before + torch.tensor([0.0, 0.0, 0.5])) and (after[:, 2] >= 0.5).all()
    assert "anchor" not in state_to_numpy(gate), "the gate the sites and the server exchange is unchanged"
    loaded = load_gate(CFG, 3, state_to_numpy(kept))  # as a bundle stores and predict reads it
    assert torch.equal(loaded(batch["image"], batch["presence"], batch["clinical"], batch["stats"]), after)
    with pytest.raises(ValueError, match="anchor"):
        load_gate(CFG, 3, {**state_to_numpy(kept), "anchor": np.array([0.0, 0.7, 0.7], np.float32)})


def test_modality_dropout_hides_only_present_and_never_all_imaging():
    presence = torch.tensor(list(itertools.product([0.0, 1.0], repeat=M + 1))).repeat(20, 1)
    dropped = drop_modalities(presence, M, p=0.9, generator=torch.Generator().manual_seed(0))
    assert (dropped <= presence).all()
    had_imaging = presence[:, :M].sum(1) > 0
    assert (dropped[had_imaging, :M].sum(1) >= 1).all()
    assert (dropped < presence).any()
    assert torch.equal(drop_modalities(presence, M, p=0.0), presence)


def test_state_round_trip(tmp_path):
    source, target = build_expert(CFG, F, 3, seed=1), build_expert(CFG, F, 3, seed=2)
    path = save_state(tmp_path / "expert.npz", source, {"kind": "regions", "modalities": list(CFG.modality_names)})
    arrays, meta = load_state(path)
    assert meta["kind"] == "regions" and [p.name for p in tmp_path.iterdir()] == ["expert.npz"]  # no temp file left
    load_numpy_state(target, arrays)
    for name, value in state_to_numpy(source).items():
        np.testing.assert_array_equal(state_to_numpy(target)[name], value)
    batch = all_patterns_batch("regions", 3)
    assert torch.equal(expert_predictor(source, "regions")(batch), expert_predictor(target, "regions")(batch))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_numpy_state(ExpertNet(M, F, 2, 4, (8, 16, 32)), arrays)
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(target, {k: v for k, v in arrays.items() if "head" not in k})


def test_metric_conventions_for_empty_masks():
    """Both empty: Dice 1, HD95 0. One side empty: Dice 0, HD95 = volume diagonal. Never NaN."""
    label = torch.zeros(3, 1, 8, 8, 8)
    label[1:, :, 2:5, 2:5, 2:5] = 1
    probs = torch.zeros_like(label)
    probs[2] = label[2]  # case 0: both empty, case 1: missed, case 2: perfect
    result = evaluate(lambda batch: probs, [{"label": label}], "regions")
    diagonal = (3 * 8**2) ** 0.5
    assert result["dice"] == pytest.approx([2 / 3])
    assert result["hd95"] == pytest.approx(diagonal / 3)
    assert dice_score(probs, label, "regions").tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-4)
    assert evaluate(lambda batch: probs, [{"label": label}], "regions", with_hd95=False)["hd95"] is None


def test_batched_stems_and_aux_heads_match_the_per_modality_modules():
    """stem_features/aux_logits run all modalities at once; each slice must equal its own module, grads included."""
    model = build_expert(CFG, F, 3)
    image = torch.randn(2, M, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    feats = model.stem_features(image)
    aux = model.aux_logits(feats)
    for m in range(M):
        torch.testing.assert_close(feats[:, m], model.stems[m](image[:, m : m + 1]), atol=1e-5, rtol=1e-5)
        coarse = model.aux_heads[m](feats[:, m])  # the heads predict at half resolution
        torch.testing.assert_close(aux[:, m], interpolate(coarse, scale_factor=2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(avg_pool3d(aux[:, m], 2), coarse, atol=1e-5, rtol=1e-5)
    presence = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]] * 2)
    (model.decode(feats, presence, torch.randn(2, F)).square().mean() + aux.square().mean()).backward()
    # the modality balancer scales each stem's own gradients: they must reach the stems' parameters
    assert all(stem.conv.weight.grad is not None and stem.conv.weight.grad.abs().sum() > 0 for stem in model.stems)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, M, 12, 12, 12), torch.ones(1, M + 1), torch.randn(1, F))
