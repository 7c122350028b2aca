"""The Flower ServerApp: runs the chosen strategy, then saves the mixture and the strategy's metrics.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mome.common.atomic import write_json
from mome.common.bundle import Bundle, save_bundle
from mome.common.config import (COORDINATOR_KEYS, LABELS_KEY, OUT_DIR_KEY, SITE_KEYS_KEY, Config, Strategy,
                                config_from_mapping, selector_config)
from mome.common.labels import LabelSpec, contract_labels
from mome.common.logs import show_progress
from mome.common.signing import enrolled_keys
from mome.server.checkpoint import ResumeRefused, ServerState
from mome.server.protocol import Coordinator, QuorumLost
from mome.server.results import final_sites, headline, strategy_metrics

log = logging.getLogger("mome.server")


def run_strategy(grid: Grid, cfg: Config, out_dir: Path, site_keys: dict | None = None,
                 labels: dict | None = None) -> dict:
    """Run one federated strategy end to end; write <out_dir>/metrics.json and the final model bundle. With
    site_keys ({site id: enrolled public key}) every reply must be signed by its site's key; with labels (a spec,
    the coordinator's contract) a site that declares others is refused."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.json")
    coordinator = None
    try:
        coordinator = Coordinator(grid, cfg, out_dir, site_keys, labels)
        state = coordinator.run()
    except (QuorumLost, ResumeRefused) as exc:  # stop with the reason on record, never a hollow success
        state = coordinator.state if coordinator else ServerState()
        write_json(out_dir / "metrics.json", strategy_metrics(
            cfg, [], {}, time.perf_counter() - start, error=str(exc), dropped=state.dropped, identity=state.identity))
        log.error("%s stopped: %s", cfg.strategy, exc)
        raise
    cfg = coordinator.cfg  # with the plan the sites' geometry gave
    cfg.save(out_dir / "config.json")
    spec = LabelSpec.from_dict(state.labels)
    mixes = Strategy(cfg.strategy).mixes
    experts = coordinator.mixture_experts() if mixes else {"shared": state.base}
    save_bundle(Bundle(selector_config(cfg), spec, experts, state.gate if mixes else None, cfg.strategy),
                out_dir / "model")
    metrics = strategy_metrics(cfg, spec.metric_names, final_sites(state, cfg.strategy),
                               time.perf_counter() - start, experts=list(experts), rounds=state.history,
                               dropped=state.dropped, traffic=state.traffic, bindings=state.bindings,
                               identity=state.identity, plan=state.plan)
    write_json(out_dir / "metrics.json", metrics)
    log.info("%s: %s", cfg.strategy, headline(metrics))
    return metrics


def make_server_app(cfg: Config | None = None, out_dir: Path | None = None) -> ServerApp:
    """Simulation passes cfg and out_dir directly; deployment reads them from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        show_progress()
        run_config = dict(context.run_config)
        own = {key: str(run_config.pop(key, default)) for key, default in COORDINATOR_KEYS.items()}
        target = out_dir or Path(own[OUT_DIR_KEY])
        resolved = cfg or config_from_mapping(run_config)
        run_strategy(grid, resolved, target / resolved.strategy if cfg is None else target,
                     enrolled_keys(own[SITE_KEYS_KEY]), contract_labels(own[LABELS_KEY]) if own[LABELS_KEY] else None)

    return app


app = make_server_app()
