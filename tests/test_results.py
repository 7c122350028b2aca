"""metrics.json from what sites reply: who failed and why, which strategies failed, summaries without NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from mome.client.site import Site
from mome.common.bundle import load_bundle
from mome.common.state import state_to_numpy
from mome.server.checkpoint import ServerState
from mome.server.replies import error_kind as _error_kind
from mome.server.replies import _outcome
from mome.server.results import final_sites, strategy_status, summarise
from tests.conftest import TINY_RUN


def _state(last_sites: dict, dropped: list | None = None, experts=("site-a", "site-b", "site-c")) -> ServerState:
    history = [{"step": 0, "phase": "expert", "round": 0, "sites": {s: {"train_loss": 1.0} for s in experts}},
               {"step": 1, "phase": "evaluate", "round": 0, "sites": last_sites}]
    return ServerState(history=history, dropped=dropped or [], experts=dict.fromkeys(experts))


def test_every_site_of_the_federation_has_an_entry_at_the_end():
    state = _state({"site-a": {"status": "evaluated", "model_saved": 1, "mixture.dice_mean": 0.5}},
                   dropped=[{"step": 1, "site": "site-b", "reason": "site failed: KeyError raised at the site"}])
    sites = final_sites(state, "mome")
    assert sites["site-a"]["status"] == "evaluated" and sites["site-a"]["dice_mean"] == 0.5
    assert sites["site-b"] == {"status": "failed", "reason": "site failed: KeyError raised at the site",
                               "model_saved": 0, "bytes_up": 0, "bytes_down": 0}
    assert sites["site-c"]["status"] == "failed" and "not connected" in sites["site-c"]["reason"]


@pytest.mark.parametrize("entries, status", [
    ({"a": {"status": "evaluated", "model_saved": 1}}, "ok"),
    ({"a": {"status": "no-held-out-labels", "model_saved": 1}, "b": {"status": "failed"}}, "ok"),
    ({"a": {"status": "evaluation-failed", "model_saved": 1}, "b": {"status": "evaluation-failed", "model_saved": 1}},
     "failed"),
    ({"a": {"status": "evaluated", "model_saved": 0}}, "failed"),
    ({}, "failed"),
])
def test_a_strategy_fails_when_no_site_ends_with_its_model_and_metrics(entries, status):
    assert strategy_status(entries)["status"] == status


def test_summary_never_averages_a_missing_or_non_finite_dice():
    summary = summarise({"a": {"dice_mean": 0.6, "hd95": 3.0, "model_saved": 1},
                         "b": {"dice_mean": math.nan, "hd95": 9.0, "model_saved": 1},
                         "c": {"status": "no-held-out-labels", "model_saved": 1}})
    assert summary == {"n_sites": 3, "n_evaluated": 1, "n_models_saved": 3, "dice_mean": 0.6, "worst_site": "a",
                       "worst_dice": 0.6, "hd95_mean": 3.0}


def test_the_server_keeps_only_known_statuses_and_no_exception_text():
    assert _outcome(ConfigRecord({"status": "evaluated", "reason": ""}))["status"] == "evaluated"
    assert _outcome(ConfigRecord({"status": "pwned", "reason": "x"})) == {
        "status": "failed", "reason": "unknown final-step status from the site"}
    assert len(_outcome(ConfigRecord({"status": "evaluated", "reason": "x" * 5000}))["reason"]) == 300
    flower_reason = "<class 'FileNotFoundError'>:<'[Errno 2] No such file: /data/site-a/imagesTs/p042_0000.nii.gz'>"
    assert _error_kind(flower_reason) == "FileNotFoundError raised at the site"
    assert _error_kind("Error: ClientApp crashed") == "the site's app failed"


def test_failed_fine_tuning_still_saves_the_shared_model(tiny_federation, tmp_path, monkeypatch):
    import mome.client.site as site_module

    site = Site.open(tiny_federation[0], TINY_RUN.replace(target_spacing="1,1,1", patch_size="24,24,24"),
                     out_dir=tmp_path)
    sent = state_to_numpy(site.expert())

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(site_module, "train_expert", broken)
    metrics, outcome = site.finalise_shared(sent, 2, "fedavg-ft")
    assert metrics["model_saved"] == 1 and outcome["status"] == "evaluated"
    saved = load_bundle(tmp_path / "model").experts["shared"]
    assert all(np.array_equal(saved[k], sent[k]) for k in sent)


def test_a_report_without_labelled_held_out_cases_draws_no_empty_plot(tmp_path):
    from mome.common.config import Config
    from mome.server.report import write_report
    from mome.server.results import strategy_metrics

    unlabelled = {"status": "no-held-out-labels", "reason": "no labelled held-out case", "model_saved": 1}
    metrics = strategy_metrics(Config(), ("lesion",), {"site-a": dict(unlabelled), "site-b": dict(unlabelled)}, 1.0)
    text = write_report(tmp_path, {"mome": metrics}).read_text()
    assert not (tmp_path / "dice_per_site.png").exists() and "nothing to plot" in text
    assert "is not a failure" in text and "model saved" in text
