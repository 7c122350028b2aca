"""The MoME protocol and its FedAvg baselines as checkpointed steps over a Flower Grid."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from mome.common.atomic import write_json
from mome.common.config import Config, GateAggregation, Strategy
from mome.common.gate import load_gate
from mome.common.labels import LabelSpec, label_summary
from mome.common.model import load_expert
from mome.common.state import state_to_numpy
from mome.common.wire import SHARED_EXPERT, Action, Key, config_record, pack, record_bytes, spec_of
from mome.server.aggregate import AggregationError, aggregate
from mome.server.checkpoint import (ResumeRefused, ServerState, check_resumable, load_latest, recipe,
                                   save_checkpoint)
from mome.server.identity import Refused, Registry
from mome.server.plan import make_plan, planned_config, site_geometry
from mome.server.replies import (BadReply, Reply, claim, claimed_site, description, error_kind, list_lengths,
                                 parse_reply, send_and_receive, sender)
from mome.server.schedule import schedule
from mome.server.validation import RejectedUpdate, check_update, dp_allowance

log = logging.getLogger("mome.server")


class QuorumLost(RuntimeError):
    """Fewer than min-sites good replies after every retry: the run stops rather than report a hollow success."""


class Coordinator:
    """Holds the server state (base model, experts by site id, gate), binds nodes to site ids, and runs the plan
    step by step: each step checked reply by reply, retried below quorum, checkpointed, resumable."""

    def __init__(self, grid: Grid, cfg: Config, out_dir: Path, site_keys: dict | None = None,
                 labels: dict | None = None):
        self.grid, self.cfg, self.out_dir = grid, cfg, out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.steps = schedule(cfg)
        self.recipe = recipe(cfg.training, self.steps)
        saved = load_latest(self.ckpt_dir)
        if saved and saved.step:
            if cfg.force_resume:
                log.warning("force-resume: resuming from step %d whatever config made it", saved.step)
            else:
                check_resumable(saved.recipe, self.recipe, saved.step)
            log.info("resuming %s from checkpoint after step %d", cfg.strategy, saved.step)
        self.state = saved if saved and saved.step else ServerState()
        self.state.recipe = self.recipe
        if labels is not None:
            if self.state.labels not in (None, labels):
                raise ResumeRefused(f"the checkpoint's labels {label_summary(self.state.labels)} are not the run "
                                    f"config's {label_summary(labels)}")
            self.state.labels = labels
        self.registry = Registry(cfg.max_site_cases, events=self.state.identity, keys=dict(site_keys or {}),
                                 resumed=dict(self.state.bindings))
        self.geometry: dict[str, dict | None] = {}  # site -> what it reported for the plan

    # -- messaging ---------------------------------------------------------------------------
    def _exchange(self, contents: dict[int, RecordDict], message_type: str, step: int,
                  expected: dict[int, dict | None]) -> list[Reply]:
        """Send one message per node and read each reply on its own: an error reply, a reply from the wrong site
        id, or a malformed one is dropped with its reason; nothing a site sends raises out of here."""
        messages = [Message(c, dst_node_id=n, message_type=message_type, group_id=str(step))
                    for n, c in contents.items()]
        for n, c in contents.items():
            self._count(self._name(n), "down", record_bytes(c))
        replies, answered = [], set()
        for msg in send_and_receive(self.grid, messages, self.cfg.round_timeout):
            node = sender(messages, msg)
            answered.add(node)
            if msg.has_error():
                self._drop(step, self._name(node), f"site failed: {error_kind(msg.error.reason)}")
                continue
            try:
                site = self.registry.check(node, claimed_site(msg))
                self.registry.authenticate(msg, site)
                lengths = list_lengths(self.cfg, self.state.labels, len(self.mixture_experts()))
                replies.append(parse_reply(msg, spec_of(expected[node]) if expected[node] else None, site, lengths))
                self._count(site, "up", record_bytes(msg.content))
            except (BadReply, Refused) as exc:
                self._drop(step, self._name(node), f"reply rejected: {exc}")
            except Exception as exc:  # whatever else a crafted reply trips, it is that reply's problem only
                self._drop(step, self._name(node), f"reply rejected: unreadable ({type(exc).__name__})")
        for node in set(contents) - answered:
            self._drop(step, self._name(node), "no reply before the round timeout")
        return replies

    def _name(self, node: int) -> str:
        return self.registry.site_of.get(node, f"node-{node}")

    def _count(self, site: str, direction: str, n: int) -> None:
        entry = self.state.traffic.setdefault(site, {"up": 0, "down": 0})
        entry[direction] += n

    def _drop(self, step: int, site: str, reason: str) -> None:
        log.warning("step %d: dropped %s: %s", step, site, reason)
        self.state.dropped.append({"step": step, "site": site, "reason": reason})

    def _content(self, phase: str, **arrays) -> RecordDict:
        content = RecordDict({Key.CONFIG: config_record(self.cfg.to_run_config()),
                              "phase": ConfigRecord({"name": phase, "strategy": self.cfg.strategy,
                                                     "epochs": self._epochs(phase),
                                                     "finetune-epochs": self._finetune_epochs()})})
        for name, state in arrays.items():
            content[name] = pack(state)
        return content

    def _epochs(self, phase: str) -> int:
        return self.cfg.expert_epochs if phase == "expert" else self.cfg.warmup_epochs

    def _finetune_epochs(self) -> int:
        return self.cfg.personalise_epochs if self.cfg.strategy == Strategy.FEDAVG_FT else 0

    # -- who takes part -----------------------------------------------------------------------
    def _identify(self, nodes: list[int], step: int) -> dict[str, dict]:
        """Ask nodes what they hold (no data) and bind each to the site id it reports. Returns site -> labels."""
        content = RecordDict({Key.CONFIG: config_record(self.cfg.to_run_config())})
        messages = [Message(content, dst_node_id=n, message_type="query.describe") for n in nodes]
        alive = set(self.grid.get_node_ids())
        specs = {}
        replies = list(send_and_receive(self.grid, messages, self.cfg.round_timeout))
        checked = self.registry.claims([(sender(messages, msg), claim(msg), msg) for msg in replies], step)
        claims = Counter(site_id for site_id, _ in checked)
        for msg, (site_id, authentic) in zip(replies, checked):
            node = sender(messages, msg)
            if site_id is None:
                continue
            if site_id and claims[site_id] > 1:  # first come must not win: neither is bound this round
                self.registry.refuse(node, f"{site_id[:70]!r} claimed by {claims[site_id]} nodes at once", step,
                                     lasting=False)
                continue
            try:
                if msg.has_error():
                    raise Refused(f"could not describe itself: {error_kind(msg.error.reason)}")
                site, spec, counts = description(msg)
                if self.state.labels is not None and spec != self.state.labels:
                    raise Refused(f"{site[:70]!r} declares labels {label_summary(spec)}; the federation's are "
                                  f"{label_summary(self.state.labels)}")
            except Exception as exc:
                reason = str(exc) if isinstance(exc, (Refused, BadReply)) else type(exc).__name__
                self.registry.refuse(node, f"unusable description: {reason}", step)
                continue
            try:
                self.registry.bind(node, site, counts, alive, step, authentic)  # records its own refusals
                specs[site] = spec
                self.geometry[site] = site_geometry(counts)
            except Refused:
                pass
        return specs

    def describe(self) -> LabelSpec:
        """Bind every connected site. The federation's labels are the coordinator's (`labels`: its dataset.json),
        and a site that declares others is refused naming both; without them every site must declare the same, or
        the run stops: no vote, so no group of sites decides what the others' labels mean."""
        specs = self._identify(self._wait_for_sites(), 0)
        if self.state.labels is None and specs:
            if len({json.dumps(s, sort_keys=True) for s in specs.values()}) > 1:
                raise QuorumLost("the sites declare different labels (" + "; ".join(
                    f"{site}: {label_summary(spec)}" for site, spec in sorted(specs.items())) + "); set the "
                    "federation's with the run-config key labels=<the coordinator's dataset.json>")
            self.state.labels = next(iter(specs.values()))
        if len(self.registry.node_of) < max(self.cfg.min_sites, 1):
            raise QuorumLost(f"{len(self.registry.node_of)} site(s) identified themselves, fewer than min-sites "
                             f"{self.cfg.min_sites}; is every SuperNode's data folder valid?")
        log.info("federation: %d sites (%s)", len(self.registry.node_of), ", ".join(self.registry.bindings()))
        self._plan()
        return LabelSpec.from_dict(self.state.labels)

    def _plan(self) -> None:
        """The federation's geometry from the bound sites' aggregate geometry, made once (a resumed run keeps
        it); every later message carries it in the run config, and every bundle in its config."""
        if self.state.plan is None:
            usable = {s: g for s, g in sorted(self.geometry.items()) if g is not None and s in self.registry.node_of}
            self.state.plan = {**make_plan(list(usable.values()), self.cfg), "from_sites": sorted(usable)}
            write_json(self.out_dir / "plan.json", self.state.plan)
        self.cfg = planned_config(self.cfg, self.state.plan)
        log.info("plan: target spacing %s mm, patch %s voxels", self.cfg.target_spacing, self.cfg.patch_size)

    def _wait_for_sites(self) -> list[int]:
        """Sites connect when they are ready; start once start-sites (or min-sites) are there, or fail clearly."""
        wanted = self.cfg.start_sites or self.cfg.min_sites
        deadline = time.monotonic() + self.cfg.connect_timeout
        while len(nodes := list(self.grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise QuorumLost(f"only {len(nodes)} of {wanted} sites connected within "
                                 f"{self.cfg.connect_timeout:.0f} s")
            time.sleep(0.5)
        return nodes

    def _live_nodes(self, step: int) -> list[int]:
        """Connected nodes bound to a site; a node not seen before identifies itself first (a late join, or a site
        back under a new node id, which then gets its own expert again)."""
        alive = list(self.grid.get_node_ids())
        new = [n for n in alive if n not in self.registry.site_of and n not in self.registry.refused]
        if new:
            self._identify(new, step)
        return sorted(n for n in alive if n in self.registry.site_of)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> ServerState:
        spec = self.describe()
        if self.state.base is None:
            self.state.base = state_to_numpy(load_expert(self.cfg, spec.n_out))
        for index, (phase, rnd) in enumerate(self.steps):
            if index < self.state.step:
                continue
            start = time.perf_counter()
            log.info("step %d/%d: %s round %d", index + 1, len(self.steps), phase, rnd + 1)
            good, extra = self._run_step(index, phase)
            self.state.history.append({
                "step": index, "phase": phase, "round": rnd, "seconds": time.perf_counter() - start,
                "sites": {r.site_id: r.record() for r in good}, **extra})
            self.state.step = index + 1
            self.state.bindings = self.registry.bindings()
            save_checkpoint(self.ckpt_dir, self.state)
        return self.state

    def _run_step(self, index: int, phase: str) -> tuple[list[Reply], dict]:
        """One step, sent again (step-retries times) while fewer than min-sites sites send a usable update; a
        training step's result is applied only once quorum is met. The final step is never a reason to stop: each
        site's outcome (saved model, metrics or failure) is its own, and the strategy fails if no site ends well."""
        if phase == "evaluate":  # sent once: a site's final outcome is its own, and finalising twice gains nothing
            good, commit = self._step_evaluate(index)
            return good, commit()
        send = {"warmup": lambda i: self._train_shared(i, "warmup"), "expert": self._step_expert,
                "shared": lambda i: self._train_shared(i, "shared"), "gate": self._step_gate}[phase]
        for attempt in range(self.cfg.step_retries + 1):
            if attempt:
                log.warning("step %d: %d sites sent an update, fewer than min-sites %d: retry %d of %d", index + 1,
                            updates, self.cfg.min_sites, attempt, self.cfg.step_retries)
            good, commit = send(index)
            updates = sum(r.state is not None for r in good)  # a site withholding its update (min-cases) adds none
            if updates >= max(self.cfg.min_sites, 1):
                return good, commit()
        raise QuorumLost(f"step {index + 1} ({phase}): {updates} sites sent a usable update, fewer than min-sites "
                         f"{self.cfg.min_sites}, after {self.cfg.step_retries} retries; "
                         "see 'dropped' in metrics.json for each site's reason")

    Step = tuple[list[Reply], Callable[[], dict]]  # good replies, and how to apply them once quorum is met

    def _train_shared(self, step: int, phase: str) -> Step:
        sent = self.state.base
        nodes = self._live_nodes(step)
        replies = self._exchange({n: self._content(phase, **{Key.MODEL: sent}) for n in nodes},
                                 str(Action.TRAIN_SHARED), step, dict.fromkeys(nodes, sent))
        good = self._checked(step, replies, lambda r: sent)
        return good, lambda: self._aggregate(step, "base", good, "n_train", GateAggregation.FEDAVG, sent)

    def _step_expert(self, step: int) -> Step:
        experts, base = self.state.experts, self.state.base
        sent = {n: experts.get(self.registry.site_of[n], base) for n in self._live_nodes(step)}
        replies = self._exchange({n: self._content("expert", **{Key.MODEL: s}) for n, s in sent.items()},
                                 str(Action.TRAIN_EXPERT), step, sent)
        good = self._checked(step, replies, lambda r: experts.get(r.site_id, base))

        fresh = [r for r in good if r.site_id not in experts]  # trained from the shared model this round

        def commit() -> dict:
            experts.update({r.site_id: r.state for r in good if r.state is not None})  # never averaged
            if self.cfg.experts_update_shared and fresh:  # the same round, read as FedAvg: the shared model moves on
                return self._aggregate(step, "base", fresh, "n_train", GateAggregation.FEDAVG, base)
            return {}
        return good, commit

    def mixture_experts(self) -> dict[str, dict]:
        """The experts the gate mixes: every site's, plus the federation's shared warm-up model (`shared-expert`),
        a generalist for cases no single site's expert serves well."""
        experts = {s: self.state.experts[s] for s in sorted(self.state.experts)}
        if self.cfg.shared_expert and experts and self.state.base is not None:
            experts[SHARED_EXPERT] = self.state.base
        return experts

    def _expert_records(self) -> dict[str, dict]:
        return {f"{Key.EXPERT_PREFIX}{s}": state for s, state in self.mixture_experts().items()}

    def _step_gate(self, step: int) -> Step:
        if not self.state.experts:
            raise RuntimeError("no expert survived the expert rounds; cannot train a gate")
        names = list(self.mixture_experts())
        if self.state.gate_sites != names:
            self.state.gate = state_to_numpy(load_gate(self.cfg, len(names)))
            self.state.gate_sites = names
        sent = self.state.gate
        nodes = self._live_nodes(step)
        replies = self._exchange({n: self._content("gate", **{Key.GATE: sent}, **self._expert_records())
                                  for n in nodes}, str(Action.TRAIN_GATE), step, dict.fromkeys(nodes, sent))
        good = self._checked(step, replies, lambda r: sent)
        return good, lambda: self._aggregate(step, "gate", good, "n_gate", self.cfg.gate_aggregation, sent)

    def _step_evaluate(self, step: int) -> Step:
        if Strategy(self.cfg.strategy).mixes:
            arrays = {Key.GATE: self.state.gate, **self._expert_records()}
        else:
            arrays = {Key.MODEL: self.state.base}
        nodes = self._live_nodes(step)
        good = self._exchange({n: self._content("evaluate", **arrays) for n in nodes}, str(Action.EVALUATE), step,
                              dict.fromkeys(nodes))
        return good, dict

    def _checked(self, step: int, replies: list[Reply], sent_for) -> list[Reply]:
        """The replies whose update is finite and within the bounds, in site-id order: replies arrive in any order,
        and a weighted sum taken in arrival order differs in the last bits from run to run."""
        good = []
        for r in replies:
            if r.state is None:  # withheld under the site's min-cases: it took part, but there is nothing to add
                log.info("step %d: %s sent no update (fewer than min-cases cases)", step, r.site_id)
                good.append(r)
                continue
            try:
                sent = sent_for(r)
                r.metrics["update_ratio"] = check_update(
                    r.state, sent, self.cfg.max_update_ratio, self.cfg.max_update_norm,
                    dp_allowance(sent, self.cfg.dp_clip, self.cfg.dp_noise_multiplier))
                good.append(r)
            except RejectedUpdate as exc:
                self._drop(step, r.site_id, f"update rejected: {exc}")
        return sorted(good, key=lambda r: r.site_id)

    def _aggregate(self, step: int, key: str, good: list[Reply], count: str, mode: str, sent: dict) -> dict:
        """Replace the state's `key` (base or gate) with the aggregate of the good replies (`sent`: what they were
        sent). MoME's and FedSM's changes are clipped relative to the median site's (update-clip); the baselines
        aggregate as their papers define them."""
        cfg, good = self.cfg, [r for r in good if r.state is not None]
        clip = cfg.update_clip if Strategy(cfg.strategy).mixes else 0.0
        if not good:
            return {"aggregation": "no site sent an update; the previous weights are kept"}
        try:
            result, weights = aggregate(
                [r.state for r in good], [self.registry.declared[r.site_id][count] for r in good],
                [float(r.metrics.get("train_loss", 0.0)) for r in good], mode, cfg.dro_temperature,
                cfg.max_site_weight, cfg.dro_max_loss, cfg.gate_trim_fraction, sent, clip)
        except AggregationError as exc:
            self._drop(step, "aggregate", str(exc))
            return {"aggregation": str(exc)}
        setattr(self.state, key, result)
        return {"weights": {r.site_id: w for r, w in zip(good, weights)}}
