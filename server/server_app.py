"""The Flower ServerApp: runs the chosen strategy, then saves the mixture and the strategy's metrics.json."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.bundle import Bundle, save_bundle
from common.atomic import write_json
from common.config import Config, config_from_mapping
from common.labels import LabelSpec
from common.summary import HEADLINE, headline, site_entry, strategy_status, summarise
from common.wire import Status
from server.protocol import Coordinator

log = logging.getLogger("mome.server")
OUT_KEY = "out-dir"  # run-config key for where the coordinator writes; not a training setting


def run_strategy(grid: Grid, cfg: Config, out_dir: Path) -> dict:
    """Run one federated strategy end to end; write <out_dir>/metrics.json and the final model bundle."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.json")
    state = Coordinator(grid, cfg, out_dir).run()
    spec = LabelSpec.from_dict(state["labels"])
    sites = final_sites(state, HEADLINE[cfg.strategy])
    for site, entry in sites.items():
        entry.update(bytes_up=state["traffic"].get(site, {}).get("up", 0),
                     bytes_down=state["traffic"].get(site, {}).get("down", 0))
    experts = state["experts"] if cfg.strategy == "mome" else {"shared": state["base"]}
    save_bundle(Bundle(cfg, spec, experts, state["gate"] if cfg.strategy == "mome" else None, cfg.strategy),
                out_dir / "model")
    metrics = {
        "strategy": cfg.strategy, "regions": list(spec.metric_names), "modalities": list(cfg.modality_names),
        **strategy_status(sites), "experts": sorted(experts), "sites": sites, "summary": summarise(sites),
        "rounds": [{k: v for k, v in h.items()} for h in state["history"]],
        "dropped": state["dropped"], "traffic": state["traffic"],
        "wall_time_s": time.perf_counter() - start, "config": cfg.to_dict(),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("%s: %s", cfg.strategy, headline(metrics))
    return metrics


def final_sites(state: dict, headline_variant: str) -> dict[str, dict]:
    """Per-site entries of the final step: each replying site's metrics and outcome, and every site dropped at
    that step as failed with its reason."""
    last = state["history"][-1] if state["history"] else None
    if last is None or last["phase"] != "evaluate":
        return {}
    sites = {s: site_entry(m, headline_variant) for s, m in sorted(last["sites"].items())}
    for drop in state["dropped"]:
        if drop["step"] == last["step"] and drop["site"] not in sites:
            sites[drop["site"]] = {"status": str(Status.FAILED), "reason": drop["reason"], "model_saved": 0}
    return dict(sorted(sites.items()))


def _show_progress() -> None:
    """Flower streams the ServerApp's stderr to `flwr run --stream`: send our INFO lines there."""
    logger = logging.getLogger("mome")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)


def make_server_app(cfg: Config | None = None, out_dir: Path | None = None) -> ServerApp:
    """Simulation passes cfg and out_dir directly; deployment reads them from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _show_progress()
        run_config = dict(context.run_config)
        target = out_dir or Path(str(run_config.pop(OUT_KEY, "runs/coordinator")))
        run_config.pop(OUT_KEY, None)
        resolved = cfg or config_from_mapping(run_config)
        run_strategy(grid, resolved, target / resolved.strategy if cfg is None else target)

    return app


app = make_server_app()
