"""`mome adapt`: a hospital that took no part in the federation fits the model it was given to its own few labelled
cases, then segments its new ones. A mixture keeps its experts frozen and fits all of its gate to the cases (a
member of the federation fits only its gate's prior: its cases already trained the routing); a single shared model
is fine-tuned on them (as `fedavg-ft` does). The adapted bundle is saved first, then scored on labelled held-out
cases (where there are any) and the unlabelled ones are segmented: `Site.finalise`, as at the end of a federation."""

from __future__ import annotations

import math
from pathlib import Path

from mome.client.site import Site
from mome.common.bundle import Bundle, load_bundle
from mome.common.metrics import evaluate, expert_predictor, mixture_predictor
from mome.common.patches import PatchLoader
from mome.common.state import state_to_numpy
from mome.common.train import personalise_gate, train_expert


def adapt(bundle_dir: Path, site_dir: Path, out_dir: Path, passes: int | None = None) -> dict:
    """Adapt the bundle at bundle_dir to the labelled training cases of site_dir; the adapted bundle goes to
    out_dir/model, predictions of unlabelled held-out cases to out_dir/predictions. `passes` over the cases (default:
    the bundle's personalise-epochs). Returns the site's counts, held-out scores before and after, and the outcome."""
    given = load_bundle(bundle_dir)
    if not given.cfg.planned:
        raise ValueError(f"{bundle_dir}: the bundle carries no plan (target-spacing, patch-size); it cannot be adapted")
    # min-cases guards what leaves a site; here nothing does, and a hospital sees its own scores however few
    site = Site.open(Path(site_dir), given.cfg.replace(min_cases=1), out_dir=Path(out_dir))
    cases = site.train_cases + site.val_cases  # with 3-5 cases every one of them is needed to fit
    if not cases:
        raise ValueError(f"{site_dir}: no usable labelled training case (imagesTr/ + labelsTr/) to adapt on")
    passes = given.cfg.personalise_epochs if passes is None else passes
    models = [site.expert(state) for state in given.experts.values()]
    if given.gate is not None:
        gate = site.gate(len(models), given.gate)
        steps = passes * math.ceil(len(cases) / given.cfg.batch_size)
        # the whole gate: a member's held-out cases trained the gate's per-case routing in the gate rounds, so its
        # personalisation sets only its trust in each expert (`personalise`); a late site's never did
        whole = given.cfg.replace(personalise="gate")
        adapted_gate = personalise_gate(gate, models, site.batches(cases), whole, site.kind, steps)
        before = mixture_predictor(models, gate, site.kind, site.window)
        after = mixture_predictor(models, adapted_gate, site.kind, site.window)
        bundle = Bundle(given.cfg, given.label_spec, given.experts, state_to_numpy(adapted_gate), given.strategy,
                        site.site_id)
    else:
        before = expert_predictor(site.expert(next(iter(given.experts.values()))), site.kind, site.window)
        model = models[0]
        train_expert(model, PatchLoader(cases, given.cfg, given.label_spec, given.cfg.seed), [], given.cfg, site.kind,
                     epochs=passes, progress=False)
        after = expert_predictor(model, site.kind, site.window)
        bundle = Bundle(given.cfg, given.label_spec, {"shared": state_to_numpy(model)}, None, given.strategy,
                        site.site_id)

    def scores() -> dict:
        test = site.test_batches
        return {"given": evaluate(before, test, site.kind), "adapted": evaluate(after, test, site.kind)}

    metrics, outcome = site.finalise(bundle, after, scores)
    return {"site": site.site_id, "cases": len(cases), "passes": passes, **metrics, **outcome}
