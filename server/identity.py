"""Which node speaks for which site: a site id is bound to one node when the site identifies itself, and every
later reply must come from that node under that id. Where the coordinator enrolled signing keys, every reply must
also carry a valid signature by its site's key: the id belongs to the key, not to the first node that claims it.
Each site's declared case counts live here too: they, not what a reply says, weigh its updates."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import Message

from mome.common.signing import verify
from mome.common.wire import SITE_ID_PATTERN

log = logging.getLogger("mome.server")

COUNT_KEYS = ("n_train", "n_val", "n_gate")  # declared at describe: cases behind shared/expert and gate updates


class Refused(ValueError):
    """A claim or reply the binding rules reject; the message is the logged reason. A lasting refusal is remembered
    (the node is not asked again); a passing one (the id's node may yet go) is asked again at the next step."""

    def __init__(self, reason: str, lasting: bool = True):
        super().__init__(reason)
        self.lasting = lasting


@dataclass
class Registry:
    """Node id <-> site id bindings, the sites' declared counts (capped), and every binding event for metrics.json."""

    max_cases: int
    site_of: dict[int, str] = field(default_factory=dict)
    node_of: dict[str, int] = field(default_factory=dict)
    declared: dict[str, dict[str, int]] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)  # node -> why it was not bound (asked once per node)
    events: list[dict] = field(default_factory=list)  # kept in the server state, so it survives a resume
    keys: dict = field(default_factory=dict)  # site id -> enrolled Ed25519 public key (empty: replies unsigned)
    resumed: dict[str, int] = field(default_factory=dict)  # site id -> node id in the checkpoint a run resumed from

    def authenticate(self, msg: Message, site: str) -> bool:
        """True when the reply is signed by the key enrolled for `site`; False when this federation enrolled no
        keys. Raises Refused for an id without an enrolled key and for a missing or wrong signature."""
        if not self.keys:
            return False
        if site not in self.keys:
            raise Refused(f"no signing key is enrolled for {site[:70]!r}")
        if not verify(msg, self.keys[site]):
            raise Refused(f"the reply is not signed by the key enrolled for {site}")
        return True

    def claims(self, replies: list[tuple[int, str, Message]], step: int) -> list[tuple[str | None, bool]]:
        """Each describe reply's claimed id ("" for none) and whether its signature proves it. A claim without the
        id's enrolled signature is refused here (None), before it can compete for the id."""
        out: list[tuple[str | None, bool]] = []
        for node, site, msg in replies:
            try:
                out.append((site, self.authenticate(msg, site) if site else False))
            except Refused as exc:
                self.refuse(node, str(exc), step)
                out.append((None, False))
        return out

    def bind(self, node: int, site: str, counts: dict, alive: set[int], step: int, signed: bool = False) -> None:
        """Bind a node that identified itself (describe, or a late join). Refuses ids outside the pattern, a node
        re-binding to another id, an id held by another node that is still connected (unless the claim is signed
        by the site's key: the site itself, back under a new node), and bad counts."""
        try:
            if not SITE_ID_PATTERN.fullmatch(site):
                raise Refused(f"site id {site[:70]!r} is not of the form {SITE_ID_PATTERN.pattern}")
            previous = self.site_of.get(node) or next((s for s, n in self.resumed.items() if n == node), site)
            if previous != site:
                raise Refused(f"node {node} is bound to {previous}, now claims {site!r}")
            holder = self.node_of.get(site, self.resumed.get(site))  # a resumed run keeps the bindings it had
            if holder is not None and holder != node and holder in alive and not signed:
                raise Refused(f"{site} is bound to node {holder}, which is still connected", lasting=False)
            declared = self._counts(counts)
        except Refused as exc:
            self.refuse(node, str(exc), step, exc.lasting)
            raise
        if holder is not None and holder != node:
            self.site_of.pop(holder, None)
            self.events.append({"step": step, "node": node, "site": site, "event": "rebound",
                                "reason": f"node {holder} is gone; {site} rejoined"})
        elif site not in self.node_of:
            worker = {"worker": counts["worker"]} if "worker" in counts else {}  # what the site runs, as it says
            self.events.append({"step": step, "node": node, "site": site, "event": "bound", **worker})
        capped = sorted(k for k in COUNT_KEYS if counts[k] > declared[k])
        if capped:
            self.events.append({"step": step, "node": node, "site": site, "event": "counts capped",
                                "reason": f"declared {', '.join(capped)} above max-site-cases {self.max_cases}"})
            log.warning("%s declared %s above max-site-cases %d: capped", site, ", ".join(capped), self.max_cases)
        self.site_of[node], self.node_of[site], self.declared[site] = site, node, declared

    def refuse(self, node: int, reason: str, step: int, lasting: bool = True) -> None:
        """Record that a node was not bound (or is unbound), and why."""
        site = self.site_of.pop(node, None)
        if site is not None:
            self.node_of.pop(site, None)
            self.declared.pop(site, None)
        if lasting:
            self.refused[node] = reason
        self.events.append({"step": step, "node": node, "event": "refused", "reason": reason,
                            **({"site": site} if site else {})})
        log.warning("node %s refused: %s", node, reason)

    def check(self, node: int, claimed: str) -> str:
        """The site a reply comes from: its node's binding, which the reply's own id must match."""
        bound = self.site_of.get(node)
        if bound is None:
            raise Refused(f"node {node} never identified itself")
        if claimed != bound:
            raise Refused(f"reply claims site id {claimed[:70]!r}, but its node is bound to {bound}")
        return bound

    def _counts(self, counts: dict) -> dict[str, int]:
        out = {}
        for key in COUNT_KEYS:
            value = counts.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise Refused(f"declared {key} {value!r} is not a non-negative integer")
            out[key] = min(value, self.max_cases)
        return out

    def bindings(self) -> dict[str, int]:
        return dict(sorted(self.node_of.items()))
