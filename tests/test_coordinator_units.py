"""The coordinator's integrity pieces on their own: node <-> site binding across a reconnect (a scripted Grid, since
the simulation engine cannot drop and re-add a node), capped and robust aggregation, reading a reply's arrays
without trusting its header, resume recipes, and bundles after a crashed save."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from mome.common.bundle import Bundle, load_bundle, save_bundle
from mome.common.labels import label_spec_from_dataset_json
from mome.common.model import load_expert
from mome.common.state import state_to_numpy
from mome.common.signing import sign, verify
from mome.common.wire import PACKED_DATA, PACKED_LAYOUT, Key, metric_record, pack, unpack
from mome.server.aggregate import AggregationError, aggregate, cap_weights, clip_to_median, site_weights
from mome.server.checkpoint import ResumeRefused, check_resumable, recipe, save_checkpoint
from mome.server.protocol import Coordinator, QuorumLost
from mome.server.replies import BadReply, decode
from tests.conftest import TINY_RUN


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Messages are made inside a Flower run; outside one, give this process the identity a ServerApp has."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class ScriptedGrid:
    """A Grid whose sites answer from a script: describe with their id and counts; training returns the weights
    sent plus a site-specific step. Records what each node was sent."""

    def __init__(self, nodes: dict[int, str], labels: dict, site_labels: dict[str, dict] | None = None):
        self.nodes, self.labels, self.sent = dict(nodes), labels, []
        self.site_labels = site_labels or {}  # a site that declares other labels than `labels`

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        self.replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(msg)
            self.replies.append(Message(self._answer(msg, self.nodes[msg.metadata.dst_node_id]), reply_to=msg))
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids):
        return [reply for reply in self.replies if reply.metadata.reply_to_message_id in message_ids]

    def _answer(self, msg: Message, site: str) -> RecordDict:
        counts = {"n_train": 4, "n_val": 1, "n_gate": 1, "num-examples": 4}
        spec = self.site_labels.get(site, self.labels)
        content = RecordDict({"site": ConfigRecord({"site-id": site, "labels": json.dumps(spec)}),
                              Key.METRICS: metric_record({**counts, "train_loss": 0.5})})
        sent = [n for n in (Key.MODEL, Key.GATE) if n in msg.content.array_records]
        if msg.metadata.message_type.startswith("train") and sent:
            step = 1e-3 * (1 + ord(site[-1]) - ord("a"))
            content[Key.MODEL] = pack({k: (v + step).astype(v.dtype) if v.dtype.kind == "f" else v
                                       for k, v in unpack(msg.content[sent[0]]).items()})
        return content

    def sent_to(self, node: int, message_type: str) -> list[Message]:
        return [m for m in self.sent if m.metadata.dst_node_id == node and m.metadata.message_type == message_type]


@pytest.fixture
def labels(two_sites) -> dict:
    return label_spec_from_dataset_json(json.loads((two_sites[0] / "dataset.json").read_text())).to_dict()


def test_a_site_back_under_a_new_node_gets_its_own_expert_and_an_impostor_does_not(labels, tmp_path):
    cfg = TINY_RUN.replace(warmup_rounds=1, expert_rounds=2, gate_rounds=1)  # warmup 0, expert 1-2, gate 3, eval 4
    grid = ScriptedGrid({1: "site-a", 2: "site-b"}, labels)
    coordinator = Coordinator(grid, cfg, tmp_path)
    coordinator.describe()
    coordinator.state.base = {"w": np.ones(3, np.float32)}
    for index, (phase, _) in enumerate(coordinator.steps[:2]):
        coordinator._run_step(index, phase)
    expert_b = coordinator.state.experts["site-b"]["w"]
    del grid.nodes[2]  # site-b's SuperNode restarts under a new node id...
    grid.nodes[3] = "site-b"
    grid.nodes[4] = "site-a"  # ...and a node claims site-a while site-a's node is still connected
    coordinator._run_step(2, "expert")
    (to_new,) = grid.sent_to(3, "train.expert")
    assert np.array_equal(unpack(to_new.content[Key.MODEL])["w"], expert_b), "not the base: its own expert"
    assert grid.sent_to(4, "train.expert") == []
    assert coordinator.registry.bindings() == {"site-a": 1, "site-b": 3}
    events = {(e["node"], e["event"]) for e in coordinator.state.identity}
    assert {(1, "bound"), (2, "bound"), (3, "rebound"), (4, "refused")} <= events
    assert np.allclose(coordinator.state.experts["site-b"]["w"], expert_b + 2e-3)


LESION = label_spec_from_dataset_json({"labels": {"background": 0, "lesion": 1}}).to_dict()


def test_the_coordinators_labels_decide_and_a_site_declaring_others_is_refused_naming_both(labels, tmp_path):
    """Two sites, two label specs: a tie that no vote can settle. The coordinator's contract decides; without one
    the run stops naming both, rather than picking either."""
    grid = ScriptedGrid({1: "site-a", 2: "site-b"}, labels, {"site-b": LESION})
    coordinator = Coordinator(grid, TINY_RUN, tmp_path / "contract", labels=labels)
    assert coordinator.describe().to_dict() == labels and coordinator.registry.bindings() == {"site-a": 1}
    (refusal,) = [e["reason"] for e in coordinator.state.identity if e["event"] == "refused"]
    assert "declares labels classes background=[0], lesion=[1]" in refusal, refusal
    assert "the federation's are regions whole_tumor=[1, 2, 3]" in refusal, refusal
    with pytest.raises(QuorumLost, match=r"different labels \(site-a: regions .*; site-b: classes .*labels="):
        Coordinator(grid, TINY_RUN, tmp_path / "no-contract").describe()


def test_a_resumed_run_keeps_its_bindings(labels, tmp_path):
    """After a coordinator restart no node takes a bound site's id while that site's node is connected, and no
    node changes the id it had."""
    grid = ScriptedGrid({1: "site-a", 2: "site-b"}, labels)
    first = Coordinator(grid, TINY_RUN, tmp_path)
    first.describe()
    first.state.step, first.state.bindings = 1, first.registry.bindings()
    save_checkpoint(tmp_path / "checkpoints", first.state)
    grid.nodes = {1: "site-c", 2: "site-b", 3: "site-a"}  # node 1 changes its claim; node 3 claims site-a
    resumed = Coordinator(grid, TINY_RUN, tmp_path)
    resumed.describe()
    assert resumed.registry.bindings() == {"site-b": 2}
    reasons = {e["node"]: e["reason"] for e in resumed.state.identity if e["event"] == "refused"}
    assert reasons[1] == "node 1 is bound to site-a, now claims 'site-c'"
    assert reasons[3] == "site-a is bound to node 1, which is still connected"


def test_weights_are_capped_and_losses_clipped():
    assert np.allclose(cap_weights(np.array([10**12, 3, 4]), 0.4), [0.4, 0.6 * 3 / 7, 0.6 * 4 / 7])
    assert np.allclose(cap_weights(np.array([5, -5]), 0.3), [0.5, 0.5]), "a cap below 1/n gives equal weights"
    assert np.allclose(cap_weights(np.array([0, 0, 0]), 0.5), [1 / 3] * 3)
    dro = site_weights([10, 10, 10], [1e9, 0.5, np.nan], "dro", 1.0, max_weight=1.0, max_loss=10.0)
    assert np.isclose(dro[0], dro[2]) and dro[0] / dro[1] == pytest.approx(np.exp(9.5)), "clipped at 10, NaN at 10"
    assert site_weights([10, 10, 10], [1e9, 0.5, 0.5], "dro", 1.0, max_weight=0.5)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["median", "trimmed-mean"])
def test_robust_gate_aggregation_is_flowers_and_ignores_one_outlier(mode):
    honest = [{"w": np.full(4, v, np.float32), "n": np.array(3)} for v in (1.0, 1.1, 0.9, 1.05, 0.95)]
    poisoned = honest[:4] + [{"w": np.full(4, 1e6, np.float32), "n": np.array(3)}]
    result, weights = aggregate(poisoned, [1] * 5, [0.0] * 5, mode, trim_fraction=0.2)
    assert np.all(np.abs(result["w"] - 1.0) < 0.1) and result["w"].dtype == np.float32 and weights == [0.2] * 5
    assert result["n"] == 3
    if mode == "trimmed-mean":  # a fraction that trims every site is the coordinator's error, not a crash
        with pytest.raises(AggregationError, match="gate-trim-fraction 0.5"):
            aggregate(poisoned, [1] * 5, [0.0] * 5, mode, trim_fraction=0.5)


def test_a_site_pushing_harder_than_the_others_is_clipped_to_the_median_change():
    sent = {"w": np.zeros(4, np.float32), "n": np.array(7)}
    updates = [{"w": np.full(4, v, np.float32), "n": np.array(3)} for v in (0.1, 0.2, 0.15, 50.0)]
    clipped, bound = clip_to_median(updates, sent, 2.0)
    median = np.median([np.linalg.norm(u["w"]) for u in updates])
    assert bound == pytest.approx(2.0 * median)
    assert np.linalg.norm(clipped[3]["w"]) == pytest.approx(bound, rel=1e-5), "the attacker's change, scaled down"
    assert all(np.array_equal(c["w"], u["w"]) for c, u in zip(clipped[:3], updates[:3])), "honest ones untouched"
    assert clip_to_median(updates[:2], sent, 2.0)[1] == np.inf, "two sites: no median to trust, no clipping"
    # the round's own change is held to the same bound, whichever rule combined the clipped changes
    result, _ = aggregate(updates, [1, 1, 1, 10**6], [0.0] * 4, "fedavg", max_weight=1.0, sent=sent, clip=0.5)
    assert np.linalg.norm(result["w"]) <= 0.5 * median * (1 + 1e-5) and result["n"] == 3


def _npy(shape, dtype="|u1", body=b"") -> Array:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return Array(dtype="uint8", shape=(8,), stype="numpy.ndarray", data=buffer.getvalue() + body)


@pytest.mark.parametrize("data, reason", [
    (_npy((10**9, 10**9)), "declared shape"),
    (_npy((8,), "<f8", bytes(64)), "declared dtype"),
    (_npy((8,), "|u1", bytes(4)), "bytes of data"),
    (Array(dtype="uint8", shape=(8,), stype="numpy.ndarray", data=b"not an npy file"), "unreadable array header"),
])
def test_a_reply_array_is_checked_before_anything_is_allocated(data, reason):
    honest = pack({"w": np.ones(2, np.float32)})
    expected = {"w": ((2,), np.dtype(np.float32))}
    with pytest.raises(BadReply, match=reason):
        decode(ArrayRecord({PACKED_LAYOUT: honest[PACKED_LAYOUT], PACKED_DATA: data}), expected)
    with pytest.raises(BadReply, match="layout"):  # another model's tensors, however well formed
        decode(pack({"w": np.ones(3, np.float32)}), expected)
    with pytest.raises(BadReply, match="not a packed"):
        decode(ArrayRecord({"w": honest[PACKED_DATA]}), expected)
    assert decode(honest, expected)["w"].sum() == 2


def test_resume_refusal_names_the_changed_keys():
    steps = [("warmup", 0), ("evaluate", 0)]
    saved = recipe(TINY_RUN.training, steps)
    check_resumable(saved, recipe(TINY_RUN.replace(round_timeout=5.0, min_sites=2).training, steps), 3)
    with pytest.raises(ResumeRefused, match=r"seed \(0 -> 1\)"):
        check_resumable(saved, recipe(TINY_RUN.replace(seed=1).training, steps), 3)
    with pytest.raises(ResumeRefused, match="other steps"):
        check_resumable(saved, recipe(TINY_RUN.training, steps[1:]), 3)


def test_a_bundle_saves_and_loads_after_a_crashed_save(tmp_path):
    spec = label_spec_from_dataset_json({"labels": {"background": 0, "tumour": 1}})
    state = state_to_numpy(load_expert(TINY_RUN, spec.n_out))
    bundle = Bundle(TINY_RUN, spec, {"shared": state})
    folder = save_bundle(bundle, tmp_path / "model")
    shutil.copytree(folder, tmp_path / ".model.old")  # a crash after the first rename of an earlier save...
    (tmp_path / ".model.tmpxyz").mkdir()  # ...and a half-written temporary folder
    save_bundle(bundle, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "model").rename(tmp_path / ".model.old")  # a crash between the two renames: only .old is whole
    loaded = load_bundle(tmp_path / "model").experts["shared"]
    assert all(np.array_equal(loaded[k], v) for k, v in state.items())
    save_bundle(bundle, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_site_policy_floors_cannot_be_lowered_by_the_run_config():
    from mome.client.policy import PolicyRefusal, SitePolicy
    from mome.common.wire import config_record

    def request(cfg) -> Message:
        return Message(RecordDict({Key.CONFIG: config_record(cfg.to_run_config())}), dst_node_id=1,
                       message_type="train.shared")

    policy = SitePolicy.from_node_config({"policy-min-cases": 3, "policy-min-dp-noise-multiplier": 0.5})
    with pytest.raises(PolicyRefusal, match="min-cases 1 below this site's floor 3"):
        policy.check(request(TINY_RUN))
    with pytest.raises(PolicyRefusal, match="dp-noise-multiplier 0 .* below this site's floor 0.5"):
        policy.check(request(TINY_RUN.replace(min_cases=3)))
    policy.check(request(TINY_RUN.replace(min_cases=3, dp_clip=1.0, dp_noise_multiplier=0.5)))


def test_a_bad_site_policy_is_named_as_the_hospital_wrote_it():
    from mome.client.policy import SitePolicy

    with pytest.raises(ValueError, match="unknown site policy key 'policy-max-sise'; known keys: .*policy-max-size"):
        SitePolicy.from_node_config({"policy-max-sise": 96})
    with pytest.raises(ValueError, match="site policy key 'policy-max-size': cannot read 'big' as int"):
        SitePolicy.from_node_config({"policy-max-size": "big"})
    assert SitePolicy.from_node_config({"policy-max-epochs": "20"}).max_epochs == 20


class SigningGrid(ScriptedGrid):
    """A ScriptedGrid whose nodes sign their replies, each with the key it holds (None: unsigned)."""

    def __init__(self, nodes: dict[int, str], labels: dict, keys: dict[int, object]):
        super().__init__(nodes, labels)
        self.keys = keys

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for msg, reply in zip(messages, self.replies):
            key = self.keys.get(msg.metadata.dst_node_id)
            if key is not None:
                sign(reply, key)
        return ids


def test_a_site_id_belongs_to_its_enrolled_signing_key(labels, tmp_path):
    """A forged id (another site's, from a valid node) is refused by its signature, an offline site's id cannot be
    taken, a tampered reply is dropped, and the site itself, back under a new node, keeps its id by its signature."""
    key_a, key_b, key_m = (Ed25519PrivateKey.generate() for _ in range(3))
    enrolled = {"site-a": key_a.public_key(), "site-b": key_b.public_key()}
    cfg = TINY_RUN.replace(warmup_rounds=1, expert_rounds=2, gate_rounds=1)
    # node 3 claims site-a (still connected) and node 4 an id nobody enrolled, each with a key of its own
    grid = SigningGrid({1: "site-a", 2: "site-b", 3: "site-a", 4: "site-m"}, labels, {1: key_a, 2: key_b, 3: key_m,
                                                                                      4: key_m})
    coordinator = Coordinator(grid, cfg, tmp_path, site_keys=enrolled)
    coordinator.describe()
    assert coordinator.registry.bindings() == {"site-a": 1, "site-b": 2}  # not "claimed by 2 nodes": 3 is forged
    reasons = {e["node"]: e["reason"] for e in coordinator.state.identity if e["event"] == "refused"}
    assert reasons[3] == "the reply is not signed by the key enrolled for site-a"
    assert reasons[4] == "no signing key is enrolled for 'site-m'"
    coordinator.state.base = {"w": np.ones(3, np.float32)}
    coordinator._run_step(0, "warmup")
    del grid.nodes[2]  # site-b goes offline; a new node claims its id with another key...
    grid.nodes[5], grid.keys[5] = "site-b", key_m
    coordinator._run_step(1, "expert")
    assert coordinator.registry.bindings()["site-b"] == 2 and 5 in coordinator.registry.refused  # not taken
    grid.nodes[6], grid.keys[6] = "site-b", key_b  # ...then site-b itself returns under a new node
    grid.keys[1] = None  # and site-a's node stops signing (a relay that drops the worker's signature)
    coordinator._run_step(2, "expert")
    assert coordinator.registry.bindings() == {"site-a": 1, "site-b": 6}
    dropped = [d for d in coordinator.state.dropped if d["step"] == 2]
    assert dropped == [{"step": 2, "site": "site-a",
                        "reason": "reply rejected: the reply is not signed by the key enrolled for site-a"}]


def test_a_signature_covers_the_request_and_every_value():
    key = Ed25519PrivateKey.generate()
    request = Message(RecordDict(), dst_node_id=1, message_type="train.expert")
    request.metadata.__dict__["_message_id"] = str(uuid4())
    content = RecordDict({"site": ConfigRecord({"site-id": "site-a"}), Key.METRICS: metric_record({"n_train": 4}),
                          Key.MODEL: pack({"w": np.ones(3, np.float32)})})
    reply = sign(Message(content, reply_to=request), key)
    assert verify(reply, key.public_key()) and not verify(reply, Ed25519PrivateKey.generate().public_key())
    other = Message(RecordDict(), dst_node_id=1, message_type="train.expert")
    other.metadata.__dict__["_message_id"] = str(uuid4())
    moved = Message(reply.content, reply_to=other)  # the same signed content as the answer to another request
    assert not verify(moved, key.public_key())
    reply.content[Key.METRICS]["n_train"] = 400  # inflated on the way
    assert not verify(reply, key.public_key())


@pytest.mark.parametrize("moves", [False, True])
def test_the_expert_round_moves_the_shared_model_only_when_asked(labels, tmp_path, moves):
    """experts-update-shared: the first expert round, read as a FedAvg round, also averages the experts into the
    shared model (the mixture's generalist gets the FedAvg budget); by default the shared model stays as warm-up left
    it. The experts themselves are never averaged."""
    cfg = TINY_RUN.replace(warmup_rounds=1, expert_rounds=1, gate_rounds=1, experts_update_shared=moves)
    coordinator = Coordinator(ScriptedGrid({1: "site-a", 2: "site-b"}, labels), cfg, tmp_path)
    coordinator.describe()
    coordinator.state.base = {"w": np.ones(3, np.float32)}
    coordinator._run_step(0, "warmup")
    warm = coordinator.state.base["w"].copy()
    coordinator._run_step(1, "expert")
    experts = coordinator.state.experts
    assert np.allclose(experts["site-a"]["w"], warm + 1e-3) and np.allclose(experts["site-b"]["w"], warm + 2e-3)
    assert np.allclose(coordinator.state.base["w"], warm + 1.5e-3 if moves else warm)
