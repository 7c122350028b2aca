"""Training on synthetic blobs: held-out Dice rises, the balancer slows a dominant modality, the gate routes."""

from __future__ import annotations

import math

import pytest
import torch

from mome.common.balance import ModalityBalancer
from mome.common.config import Config
from mome.common.metrics import evaluate, expert_predictor
from mome.common.gate import build_gate
from mome.common.model import build_expert, load_expert, mixture_logits
from mome.common.train import personalise_gate, segmentation_loss, train_expert, train_gate
from mome.sim.baselines import train_centralized, train_local

M, F = 4, 3
CFG = Config(channels="8,16,32", stem_channels=4, lr=1e-2, batch_size=2)


def blob_cases(n: int, size: int, seed: int, signature: float = 5.0, complement: bool = False) -> list[dict]:
    """Batches of 2 cases: a sphere (brighter core) in noise on every channel; 2 nested regions (whole, core).

    `signature` sets the raw-intensity stats the gate can read; `complement` flips the labelling convention.
    """
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    batches = []
    for _ in range(0, n, 2):
        images, labels = [], []
        for _ in range(2):
            centre = size * (0.3 + 0.4 * torch.rand(3, generator=g))
            radius = size * (0.18 + 0.08 * torch.rand(1, generator=g))
            dist = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2).sqrt()
            whole, core = (dist < radius).float(), (dist < 0.55 * radius).float()
            image = (whole + core)[None] + 0.6 * torch.randn(M, size, size, size, generator=g)
            images.append((image - image.mean((1, 2, 3), keepdim=True)) / image.std((1, 2, 3), keepdim=True))
            label = torch.stack([whole, core])
            labels.append(1 - label if complement else label)
        batches.append({
            "image": torch.stack(images),
            "presence": torch.ones(2, M + 1),
            "clinical": torch.rand(2, F, generator=g),
            "stats": signature + 0.1 * torch.randn(2, 2 * M, generator=g),
            "label": torch.stack(labels),
        })
    return batches


def test_short_training_raises_held_out_dice(quality):
    train, val = blob_cases(16, 24, seed=0), blob_cases(4, 24, seed=1)
    test = blob_cases(8, 24, seed=2)  # never seen in training nor used to pick the best epoch
    model = build_expert(CFG, F, n_out=2)
    before = evaluate(expert_predictor(model, "regions"), test, "regions")["dice_mean"]
    history = train_expert(model, train, val, CFG, "regions", epochs=6, progress=False)
    after = evaluate(expert_predictor(model, "regions"), test, "regions")
    # blobs fill ~2-5% of the volume (cores ~0.5%): predicting everything scores Dice < 0.1, an untrained net
    # about that, so 0.6 on unseen cases (both regions, incl. the small core) needs real localisation
    assert before < 0.3
    quality("held-out Dice after 6 epochs", after["dice_mean"], 0.6)
    assert len(history["val_dice"]) == 6 and len(history["factors"]) == 6
    assert history["loss"][-1] < history["loss"][0]


def threshold_cases(n: int, size: int, seed: int) -> list[dict]:
    """Label = threshold of channel 0 (a blob in mild noise); channels 1-3 are pure noise."""
    batches = blob_cases(n, size, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for batch in batches:
        batch["image"][:, 1:] = torch.randn(batch["image"][:, 1:].shape, generator=g)
        batch["label"] = (batch["image"][:, :1] > 1.0).float()
    return batches


def test_balancer_formula_slows_only_the_leader():
    balancer = ModalityBalancer(["a", "b", "c"], alpha=1.0, momentum=0.5)
    assert torch.equal(balancer.factors, torch.ones(3))
    balancer.update(torch.tensor([0.8, 0.2, float("nan")]))
    assert balancer.factors.tolist() == pytest.approx([1 - math.tanh(3.0), 1.0, 1.0])
    balancer.update(torch.tensor([0.8, 0.2, 0.2]))  # c seen for the first time: taken as is, no EMA bias
    assert balancer.scores.tolist() == pytest.approx([0.8, 0.2, 0.2])
    model = build_expert(CFG, F, 1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ModalityBalancer(list("abcd"), alpha=0.0).scale_gradients(model.stems)  # alpha 0 disables balancing
    assert all(bool((p.grad == 1).all()) for p in model.stems.parameters())
    b4 = ModalityBalancer(list("abcd"))
    b4.update(torch.tensor([0.9, 0.1, 0.1, 0.1]))
    b4.scale_gradients(model.stems)
    assert all(bool((p.grad < 0.01).all()) for p in model.stems[0].parameters())
    assert all(bool((p.grad == 1).all()) for p in model.stems[1].parameters())
    assert set(b4.log_epoch()) == {f"{k}/{n}" for k in ("factor", "score") for n in "abcd"}


def test_dominant_modality_gets_the_smallest_loss_factor(quality):
    batches = threshold_cases(12, 16, seed=4)
    model = build_expert(CFG, F, n_out=1)
    history = train_expert(model, batches, [], CFG, "regions", epochs=3, progress=False)
    factors = history["factors"][-1]
    others = [factors[f"factor/{n}"] for n in CFG.modality_names[1:]]
    quality("lowest other factor - dominant T1's", min(others) - factors["factor/T1"], 0.2)
    quality("lowest factor of the noise channels", min(others), 0.9)
    assert history["best_val_dice"] is None  # no validation data: the last state is kept


def test_gate_routes_each_site_to_its_own_expert(quality):
    site_a = blob_cases(8, 16, seed=2, signature=4.0)
    site_b = blob_cases(8, 16, seed=3, signature=7.0, complement=True)  # opposite labelling convention
    experts = []
    for site in (site_a, site_b):
        experts.append(build_expert(CFG, F, n_out=2))
        train_expert(experts[-1], site, [], CFG, "regions", epochs=3, progress=False)
    cfg = CFG.replace(gate_pool=4)
    gate = build_gate(cfg, F, n_experts=2)
    history = train_gate(gate, experts, site_a + site_b, cfg, "regions", steps=64, progress=False)
    first_pass = sum(history["loss"][:8]) / 8  # 8 batches: a pass visits each once
    assert history["mean_loss"] < first_pass and history["n"] == 16 and history["steps"] == 64
    with torch.no_grad():
        to_a = torch.cat([mixture_logits(experts, gate, b, "regions")[1][:, 0] for b in site_a])
        to_b = torch.cat([mixture_logits(experts, gate, b, "regions")[1][:, 1] for b in site_b])
    quality("site a's weight on expert a", float(to_a.mean()), 0.8)
    quality("site b's weight on expert b", float(to_b.mean()), 0.8)

    before = [p.detach().clone() for p in gate.parameters()]
    local = personalise_gate(gate, experts, site_b, cfg, "regions", steps=4)
    assert all(torch.equal(a, p) for a, p in zip(before, gate.parameters())), "original gate untouched"
    assert any(not torch.equal(a, p) for a, p in zip(before, local.parameters()))


def test_gate_prior_moves_at_its_own_lr():
    """Adam's first step moves each weight by about its lr: the output bias by gate_prior_lr, the rest by lr."""
    cases = blob_cases(2, 16, seed=2, signature=4.0)
    experts = [build_expert(CFG, F, n_out=2, seed=s) for s in (0, 1)]
    cfg = CFG.replace(gate_pool=4, lr=1e-3, gate_prior_lr=5e-2)
    gate = build_gate(cfg, F, n_experts=2)
    before = {n: p.detach().clone() for n, p in gate.named_parameters()}
    train_gate(gate, experts, cases, cfg, "regions", steps=1, progress=False)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in gate.named_parameters()}
    prior = next(n for n, p in gate.named_parameters() if p is gate.prior)
    assert 0.9 * cfg.gate_prior_lr < moved.pop(prior) < 1.1 * cfg.gate_prior_lr
    assert 0 < max(moved.values()) < 1.1 * cfg.lr, moved


def test_personalisation_fits_only_the_prior_unless_asked_for_the_whole_gate():
    """personalise=prior (default): the per-case routing stays the federation's; personalise=gate: all of it moves."""
    cases = blob_cases(2, 16, seed=2, signature=4.0)
    experts = [build_expert(CFG, F, n_out=2, seed=s) for s in (0, 1)]
    cfg = CFG.replace(gate_pool=4)
    gate = build_gate(cfg, F, n_experts=2)
    prior = next(n for n, p in gate.named_parameters() if p is gate.prior)
    for mode in ("prior", "gate"):
        local = personalise_gate(gate, experts, cases, cfg.replace(personalise=mode), "regions", steps=2)
        moved = {n: float((p.detach() - q.detach()).abs().max())
                 for (n, p), q in zip(local.named_parameters(), gate.parameters())}
        assert moved[prior] > 0.5 * (cfg.personal_prior_lr if mode == "prior" else cfg.gate_prior_lr), moved
        others = max(v for n, v in moved.items() if n != prior)
        assert (others == 0) if mode == "prior" else (others > 0), (mode, moved)
        assert all(p.requires_grad for p in local.parameters())  # a kept gate trains like any other


def test_local_trains_one_model_per_site_and_centralized_one_for_all():
    sites = [tuple(blob_cases(2, 16, seed=s + k) for k in (0, 10)) for s in (5, 6)]
    cfg = CFG.replace(expert_epochs=1, clinical_fields="a=num:1,b=num:1,c=num:1")  # the blobs' F = 3 fields
    local = train_local(sites, cfg, "regions", n_out=2)
    pooled = train_centralized([b for train, _ in sites for b in train], [b for _, val in sites for b in val], cfg,
                               "regions", n_out=2)
    untrained = load_expert(cfg, n_out=2).state_dict()
    states = [m.state_dict() for m in (*local, pooled)]
    assert len(local) == 2
    for i, state in enumerate(states):  # every model trained, and each on different data
        assert any(not torch.equal(state[k], untrained[k]) for k in state)
        for other in states[i + 1:]:
            assert any(not torch.equal(state[k], other[k]) for k in state)


@pytest.mark.parametrize("kind", ["regions", "classes"])
def test_gate_trains_on_the_mixed_logits_with_the_experts_own_loss(kind):
    batch = blob_cases(2, 16, seed=3)[0]
    if kind == "classes":  # background + one class, exclusive
        batch = {**batch, "label": torch.cat([1 - batch["label"][:, :1], batch["label"][:, :1]], 1)}
    cfg = CFG.replace(gate_pool=4)
    experts = [build_expert(cfg, F, n_out=2, seed=s) for s in (0, 1)]
    gate = build_gate(cfg, F, n_experts=2)
    expected = segmentation_loss(kind)(mixture_logits(experts, gate, batch, kind)[0], batch["label"]).item()
    history = train_gate(gate, experts, [batch], cfg, kind, steps=1, progress=False)
    assert history["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_the_final_choice_leans_on_the_personalised_mixture_with_few_cases():
    from mome.client.choice import pick

    assert pick({"personal": [0.6], "global": [0.7], "expert": [0.5]}) == "global"  # one case: that case decides
    assert pick({"personal": [0.6, 0.6, 0.6], "global": [0.9, 0.55, 0.55]}) == "personal"  # a mean won by one case
    assert pick({"personal": [0.6, 0.6, 0.6], "global": [0.7, 0.7, 0.5], "expert": [0.8, 0.8, 0.5]}) == "expert"
    assert pick({"personal": [0.5, 0.5], "global": [0.5, 0.5]}) == "personal"  # a tie keeps the default


def test_the_final_choice_personalises_out_of_fold_and_scores_every_candidate():
    """With several validation cases each fold's gate is personalised on the others (a gate that trains needs its
    gradients: a choice that silently failed would fall back to the default and hide it)."""
    from mome.client.choice import CANDIDATES, choose_final

    batches = blob_cases(4, 16, seed=5)
    cases = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(2)]
    cfg = CFG.replace(gate_pool=4)
    experts = [build_expert(cfg, F, n_out=2, seed=s) for s in (0, 1)]
    gate = build_gate(cfg, F, n_experts=2)
    before = [p.detach().clone() for p in gate.parameters()]
    choice, means = choose_final(experts, gate, cases, cfg, "regions", steps=3, own=1)
    assert choice in CANDIDATES and set(means) == set(CANDIDATES)
    assert all(0.0 <= v <= 1.0 for v in means.values())
    assert all(torch.equal(a, p) for a, p in zip(before, gate.parameters())), "the global gate is untouched"
