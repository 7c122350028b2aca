"""The Flower ClientApp: one handler per protocol action; replies carry only weights and scalars."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import psutil
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from mome.client.guard import guard
from mome.client.policy import SitePolicy
from mome.client.site import Site
from mome.common.config import Config, request_config
from mome.common.logs import show_progress
from mome.common.schema import DESCRIBE, GEOMETRY  # declared once: the counts weigh updates, the geometry plans
from mome.common.wire import NUM_EXAMPLES, SITE_ID, Key, check_site_id, metric_record, pack, site_id_from_name, unpack

log = logging.getLogger("mome.client")
# the settings a site's loaded, split and batched data depend on
DATA_SETTINGS = ("modalities", "clinical_fields", "val_fraction", "seed", "max_voxels", "gate_pool")
SiteLocator = Callable[[Context], tuple[Path, str, Path | None]]


def node_config_locator(context: Context) -> tuple[Path, str, Path | None]:
    """Deployment: each SuperNode is told its data folder and site id in --node-config."""
    show_progress()  # a deployed ClientApp's lines go to its SuperNode's log
    node = context.node_config
    if "data-dir" not in node:
        raise ValueError("node config needs data-dir (and site-id): --node-config 'site-id=\"a\" data-dir=\"...\"'")
    data_dir = Path(str(node["data-dir"]))
    site_id = check_site_id(str(node["site-id"])) if "site-id" in node else site_id_from_name(data_dir.name)
    if node.get("out-dir"):
        return data_dir, site_id, Path(str(node["out-dir"]))
    # a site's final model is never dropped for want of a folder: beside the data folder, not in the app's cwd
    out_dir = data_dir.resolve().parent / "mome-out" / site_id
    log.warning("no out-dir in the node config: site %s writes its model under %s", site_id, out_dir.resolve())
    return data_dir, site_id, out_dir


def process_age() -> float:
    """Seconds since this process started."""
    return time.time() - psutil.Process().create_time()


def node_policy(context: Context) -> SitePolicy:
    """Deployment: the site's limits come from its own node config (or the policy file it names)."""
    return SitePolicy.from_node_config(context.node_config)


def make_client_app(locate: SiteLocator = node_config_locator, mods: list | None = None,
                    policy_of: Callable[[Context], SitePolicy] = node_policy, worker: str = "") -> ClientApp:
    """A ClientApp whose sites are found by `locate` (node config, or a simulation's partition map). Every handler
    runs inside the site's guard (policy, schema, coded errors, audit log); `mods` wrap around it (tests play a
    misbehaving site with them). `worker`: the site worker's version and code hash, told at describe."""
    app = ClientApp(mods=[*(mods or []), guard(locate, policy_of)])
    opened: dict[tuple, tuple[tuple, Site]] = {}  # per site: the one loaded copy of its data, and what it was for

    def site_for(msg: Message, context: Context) -> tuple[Site, Config]:
        cfg = request_config(msg.content[Key.CONFIG])
        data_dir, site_id, out_dir = locate(context)
        site_key = (str(data_dir), site_id, str(out_dir))
        # surveyed (before the plan) or preprocessed on the plan's grid: a change of either reloads
        data_key = (*(getattr(cfg, k) for k in DATA_SETTINGS), cfg.spacing if cfg.planned else None)
        loaded_for, site = opened.get(site_key, (None, None))
        if not opened:  # in deployment every message is a fresh process: what it spent before its work began
            log.info("site %s: %s starts %.1f s after its process", site_id, msg.metadata.message_type,
                     process_age())
        if loaded_for != data_key:  # another config's copy is replaced, never kept beside this one
            opened.pop(site_key, None)
            start = time.perf_counter()
            site = Site.open(data_dir, cfg, site_id, out_dir)
            log.info("site %s: loaded %s in %.1f s", site_id, data_dir, time.perf_counter() - start)
        elif site.cfg != cfg:
            site = dataclasses.replace(site, cfg=cfg)
        opened[site_key] = (data_key, site)
        return site, cfg

    def reply(msg: Message, site: Site, metrics: dict, state: dict | None = None,
              n_examples: int = 0, outcome: dict | None = None) -> Message:
        content = RecordDict({Key.METRICS: metric_record({**metrics, NUM_EXAMPLES: n_examples}),
                              "site": ConfigRecord({SITE_ID: site.site_id})})
        if state is not None:
            content[Key.MODEL] = pack(state)
        if outcome is not None:
            content[Key.OUTCOME] = ConfigRecord({k: str(v) for k, v in outcome.items()})
        return Message(content, reply_to=msg)

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        site, _ = site_for(msg, context)
        facts = site.describe()
        told = {SITE_ID: site.site_id, "labels": json.dumps(facts["labels"]),
                "modalities": ",".join(facts["modalities"]), **({"worker": worker} if worker else {})}
        content = RecordDict({"site": ConfigRecord(told),
                              Key.METRICS: metric_record({k: facts[k] for k in (*DESCRIBE, *GEOMETRY)
                                                                         if k in facts})})
        return Message(content, reply_to=msg)

    @app.train("shared")
    def train_shared(msg: Message, context: Context) -> Message:
        site, cfg = site_for(msg, context)
        state, metrics = site.train_model(unpack(msg.content[Key.MODEL]), int(_phase(msg)["epochs"]),
                                          msg.metadata.group_id)
        return reply(msg, site, metrics, state, metrics["n_train"])

    @app.train("expert")
    def train_expert(msg: Message, context: Context) -> Message:
        return train_shared(msg, context)

    @app.train("gate")
    def train_gate(msg: Message, context: Context) -> Message:
        site, cfg = site_for(msg, context)
        experts = _experts(msg)
        state, metrics = site.train_gate(list(experts.values()), unpack(msg.content[Key.GATE]),
                                         step=msg.metadata.group_id, names=list(experts))
        return reply(msg, site, metrics, state, metrics["n_gate"])

    @app.evaluate()
    def finalise(msg: Message, context: Context) -> Message:
        """The last step: the site's final model is saved first, then evaluated where labels exist."""
        site, cfg = site_for(msg, context)
        phase = _phase(msg)
        if Key.GATE in msg.content:
            metrics, outcome = site.finalise_mixture(_experts(msg), unpack(msg.content[Key.GATE]))
        else:
            metrics, outcome = site.finalise_shared(unpack(msg.content[Key.MODEL]),
                                                    int(phase["finetune-epochs"]), str(phase["strategy"]))
        return reply(msg, site, metrics, None, metrics["n_test"], outcome)

    return app


def _phase(msg: Message) -> ConfigRecord:
    return msg.content["phase"]


def _experts(msg: Message) -> dict[str, dict]:
    prefix = str(Key.EXPERT_PREFIX)
    return {name[len(prefix):]: unpack(rec) for name, rec in msg.content.array_records.items()
            if name.startswith(prefix)}


app = make_client_app()
