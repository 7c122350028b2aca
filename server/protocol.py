"""The MoME protocol and its FedAvg baselines as checkpointed steps over a Flower Grid."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.config import Config, Strategy
from common.labels import LabelSpec
from common.model import load_expert, load_gate
from common.state import state_to_numpy
from common.wire import NUM_EXAMPLES, SITE_ID, Action, Key, Status, config_record, from_record, record_bytes, to_record
from server.aggregate import aggregate
from server.checkpoint import load_latest, save_checkpoint
from server.validation import RejectedUpdate, check_update

log = logging.getLogger("mome.server")


@dataclass
class Reply:
    site_id: str
    metrics: dict
    state: dict[str, np.ndarray] | None
    outcome: dict[str, str] | None = None  # the final step's status and reason

    def record(self) -> dict:
        """What the run's history keeps of this reply: its metrics and, for the final step, its outcome."""
        return {**self.metrics, **(self.outcome or {})}


def _sender(sent: list[Message], reply: Message) -> int:
    """The node a reply answers for: error replies made by the SuperLink carry its own id as source."""
    for msg in sent:
        if msg.metadata.message_id == reply.metadata.reply_to_message_id:
            return msg.metadata.dst_node_id
    return reply.metadata.src_node_id


def _error_kind(reason: str) -> str:
    """What the coordinator keeps of a site's error reply: the exception type. Flower's reason also carries the
    exception's text, which can hold site paths or case ids."""
    found = re.search(r"<class '([\w.]+)'>", reason)
    return f"{found.group(1).rsplit('.', 1)[-1]} raised at the site" if found else "the site's app failed"


def _outcome(record: ConfigRecord) -> dict[str, str]:
    """A final-step outcome as the server keeps it: a known status (anything else counts as failed) and a short
    reason."""
    values = {k: str(v)[:300] for k, v in record.items() if k in ("status", "reason", "segmentation")}
    if values.get("status") not in {str(s) for s in Status}:
        values = {"status": str(Status.FAILED), "reason": "unknown final-step status from the site"}
    return values


def shared_rounds(cfg: Config) -> int:
    """FedAvg rounds (of warmup_epochs each) that give a site at least MoME's local epochs."""
    return -(-cfg.local_epochs // max(cfg.warmup_epochs, 1))


def plan(cfg: Config) -> list[tuple[str, int]]:
    """The steps of a run: (phase, round index). Baselines get the same local training epochs."""
    strategy = Strategy.parse(cfg.strategy)
    if strategy == Strategy.MOME:
        return ([("warmup", r) for r in range(cfg.warmup_rounds)] + [("expert", r) for r in range(cfg.expert_rounds)]
                + [("gate", r) for r in range(cfg.gate_rounds)] + [("evaluate", 0)])
    if strategy.federated:
        return [("shared", r) for r in range(shared_rounds(cfg))] + [("evaluate", 0)]
    raise ValueError(f"{strategy} is not a federated strategy")


class Coordinator:
    """Holds the server state (base model, experts by site id, gate) and runs the plan with resume."""

    def __init__(self, grid: Grid, cfg: Config, out_dir: Path):
        self.grid, self.cfg, self.out_dir = grid, cfg, out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.nodes: dict[int, str] = {}
        self.traffic: dict[str, dict[str, int]] = {}
        self.state = load_latest(self.ckpt_dir) or {
            "step": 0, "base": None, "experts": {}, "gate": None, "history": [], "dropped": [],
            "traffic": {}, "labels": None}
        if self.state["step"]:
            log.info("resuming %s from checkpoint after step %d", cfg.strategy, self.state["step"])
        self.traffic = self.state["traffic"]

    # -- messaging ---------------------------------------------------------------------------
    def _exchange(self, contents: dict[int, RecordDict], message_type: str, step: int) -> list[Reply]:
        """Send one message per node, wait for replies, account bytes, log failures and timeouts."""
        messages = [Message(c, dst_node_id=n, message_type=message_type, group_id=str(step))
                    for n, c in contents.items()]
        for n, c in contents.items():
            self._count(self.nodes.get(n, f"node-{n}"), "down", record_bytes(c))
        replies, answered = [], set()
        for msg in self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout):
            node = _sender(messages, msg)
            answered.add(node)
            if msg.has_error():
                self._drop(step, self.nodes.get(node, f"node-{node}"), f"site failed: {_error_kind(msg.error.reason)}")
                continue
            site = str(msg.content["site"][SITE_ID])
            self.nodes[node] = site
            self._count(site, "up", record_bytes(msg.content))
            metrics = {k: (list(v) if isinstance(v, list) else v) for k, v in msg.content[Key.METRICS].items()}
            state = from_record(msg.content[Key.MODEL]) if Key.MODEL in msg.content else None
            outcome = _outcome(msg.content[Key.OUTCOME]) if Key.OUTCOME in msg.content else None
            replies.append(Reply(site, metrics, state, outcome))
        for node in set(contents) - answered:
            self._drop(step, self.nodes.get(node, f"node-{node}"), "no reply before the round timeout")
        return replies

    def _count(self, site: str, direction: str, n: int) -> None:
        entry = self.traffic.setdefault(site, {"up": 0, "down": 0})
        entry[direction] += n

    def _drop(self, step: int, site: str, reason: str) -> None:
        log.warning("step %d: dropped %s: %s", step, site, reason)
        self.state["dropped"].append({"step": step, "site": site, "reason": reason})

    def _content(self, phase: str, **arrays) -> RecordDict:
        content = RecordDict({Key.CONFIG: config_record(self.cfg.to_run_config()),
                              "phase": ConfigRecord({"name": phase, "strategy": self.cfg.strategy,
                                                     "epochs": self._epochs(phase),
                                                     "finetune-epochs": self._finetune_epochs()})})
        for name, state in arrays.items():
            content[name] = to_record(state)
        return content

    def _epochs(self, phase: str) -> int:
        return self.cfg.expert_epochs if phase == "expert" else self.cfg.warmup_epochs

    def _finetune_epochs(self) -> int:
        return self.cfg.personalise_epochs if self.cfg.strategy == Strategy.FEDAVG_FT else 0

    # -- steps -------------------------------------------------------------------------------
    def describe(self) -> LabelSpec:
        """Ask every site what it holds (no data): label spec must agree across the federation."""
        nodes = self._wait_for_sites()
        content = RecordDict({Key.CONFIG: config_record(self.cfg.to_run_config())})
        specs = {}
        messages = [Message(content, dst_node_id=n, message_type="query.describe") for n in nodes]
        for msg in self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout):
            if msg.has_error():
                log.warning("node %s could not describe itself: %s", _sender(messages, msg), msg.error.reason)
                continue
            site = str(msg.content["site"][SITE_ID])
            self.nodes[_sender(messages, msg)] = site
            specs[site] = json.loads(str(msg.content["site"]["labels"]))
        if not specs:
            raise RuntimeError("no site answered; is every SuperNode's data folder valid?")
        first = next(iter(specs.values()))
        for site, spec in specs.items():
            if spec != first:
                raise RuntimeError(f"site {site} declares different labels than the others: {spec} vs {first}")
        log.info("federation: %d sites (%s)", len(specs), ", ".join(sorted(specs)))
        self.state["labels"] = first
        return LabelSpec.from_dict(first)

    def run(self) -> dict:
        spec = self.describe()
        if self.state["base"] is None:
            self.state["base"] = state_to_numpy(load_expert(self.cfg, spec.n_out))
        steps = plan(self.cfg)
        for index, (phase, rnd) in enumerate(steps):
            if index < self.state["step"]:
                continue
            start = time.perf_counter()
            log.info("step %d/%d: %s round %d", index + 1, len(steps), phase, rnd + 1)
            replies = getattr(self, f"_step_{phase}")(index)
            self.state["history"].append({
                "step": index, "phase": phase, "round": rnd, "seconds": time.perf_counter() - start,
                "sites": {r.site_id: r.record() for r in replies}})
            self.state["step"] = index + 1
            self.state["traffic"] = self.traffic
            save_checkpoint(self.ckpt_dir, index + 1, self.state)
        return self.state

    def _wait_for_sites(self) -> list[int]:
        """Sites connect when they are ready; start once cfg.min_sites are there (or fail clearly)."""
        deadline = time.monotonic() + self.cfg.connect_timeout
        while len(nodes := list(self.grid.get_node_ids())) < self.cfg.min_sites:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.cfg.min_sites} sites connected "
                                   f"within {self.cfg.connect_timeout:.0f} s")
            time.sleep(0.5)
        return nodes

    def _live_nodes(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def _train_shared(self, step: int, phase: str, key: str) -> list[Reply]:
        sent = self.state[key]
        replies = self._exchange({n: self._content(phase, **{Key.MODEL: sent}) for n in self._live_nodes()},
                                 str(Action.TRAIN_SHARED), step)
        good = self._checked(step, replies, lambda r: sent)
        if good:
            self.state[key] = aggregate([r.state for r in good], [r.metrics[NUM_EXAMPLES] for r in good],
                                        [r.metrics["train_loss"] for r in good])
        return replies

    def _step_warmup(self, step: int) -> list[Reply]:
        return self._train_shared(step, "warmup", "base")

    def _step_shared(self, step: int) -> list[Reply]:
        return self._train_shared(step, "shared", "base")

    def _step_expert(self, step: int) -> list[Reply]:
        experts, base = self.state["experts"], self.state["base"]
        contents = {n: self._content("expert", **{Key.MODEL: experts.get(self.nodes.get(n), base)})
                    for n in self._live_nodes()}
        replies = self._exchange(contents, str(Action.TRAIN_EXPERT), step)
        for r in self._checked(step, replies, lambda r: experts.get(r.site_id, base)):
            experts[r.site_id] = r.state  # one expert per site id, never averaged
        return replies

    def _expert_records(self) -> dict[str, dict]:
        return {f"{Key.EXPERT_PREFIX}{s}": self.state["experts"][s] for s in sorted(self.state["experts"])}

    def _step_gate(self, step: int) -> list[Reply]:
        if not self.state["experts"]:
            raise RuntimeError("no expert survived the expert rounds; cannot train a gate")
        if self.state.get("gate_sites") != sorted(self.state["experts"]):
            self.state["gate"] = state_to_numpy(load_gate(self.cfg, len(self.state["experts"])))
            self.state["gate_sites"] = sorted(self.state["experts"])
        sent = self.state["gate"]
        replies = self._exchange({n: self._content("gate", **{Key.GATE: sent}, **self._expert_records())
                                  for n in self._live_nodes()}, str(Action.TRAIN_GATE), step)
        good = self._checked(step, replies, lambda r: sent)
        if good:
            self.state["gate"] = aggregate([r.state for r in good], [r.metrics[NUM_EXAMPLES] for r in good],
                                           [r.metrics["train_loss"] for r in good], self.cfg.gate_aggregation,
                                           self.cfg.dro_temperature)
        return replies

    def _step_evaluate(self, step: int) -> list[Reply]:
        if self.cfg.strategy == Strategy.MOME:
            arrays = {Key.GATE: self.state["gate"], **self._expert_records()}
        else:
            arrays = {Key.MODEL: self.state["base"]}
        return self._exchange({n: self._content("evaluate", **arrays) for n in self._live_nodes()},
                              str(Action.EVALUATE), step)

    def _checked(self, step: int, replies: list[Reply], sent_for) -> list[Reply]:
        """The replies that pass the update checks, in site-id order: replies arrive in any order, and a weighted
        sum taken in arrival order differs in the last bits from run to run, which training then amplifies."""
        good = []
        for r in replies:
            try:
                if r.state is None:
                    raise RejectedUpdate("reply carries no weights")
                check_update(r.state, sent_for(r), self.cfg.max_update_norm)
                good.append(r)
            except RejectedUpdate as exc:
                self._drop(step, r.site_id, f"update rejected: {exc}")
        return sorted(good, key=lambda r: r.site_id)
