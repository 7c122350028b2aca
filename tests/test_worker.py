"""The site worker (`mome site serve`) and the relay ClientApp: the relay only forwards; the worker holds the data,
runs the site's guard, and refuses what its protocol does not have."""

from __future__ import annotations

import json
import subprocess
import sys
from uuid import uuid4

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from mome.client.policy import SitePolicy
from mome.client.relay import forward
from mome.client.worker import SERVICE, Worker, code_hash, new_token
from mome.common.schema import ERROR_REASON, Sizes, violations
from mome.common.signing import verify
from mome.common.wire import Key, config_record
from tests.conftest import TINY_RUN
from tests.test_coordinator_units import serverapp_identity  # noqa: F401  (autouse: Messages outside a run)


@pytest.fixture
def served(two_sites, tmp_path):
    """A worker for the first site on a Unix socket, and the node config a relay gets."""
    token_file = tmp_path / "worker.token"
    worker = Worker(two_sites[0], "site-a", tmp_path / "out", new_token(token_file))
    address = f"unix://{tmp_path / 'worker.sock'}"
    server = worker.serve(address)
    yield worker, {"worker": address, "worker-token-file": str(token_file)}, tmp_path
    server.stop(None)


def _request(message_type: str, content: RecordDict | None = None) -> Message:
    msg = Message(content or RecordDict({Key.CONFIG: config_record(TINY_RUN.to_run_config())}), dst_node_id=1,
                  message_type=message_type)
    msg.metadata.__dict__["_message_id"] = str(uuid4())
    return msg


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_the_relay_gets_the_workers_reply_and_the_worker_audits_it(served):
    worker, node_config, tmp_path = served
    reply = forward(_request("query.describe"), _context(node_config))
    assert not reply.has_error()
    assert reply.content["site"]["site-id"] == "site-a" and reply.content[Key.METRICS]["n_train"] > 0
    assert reply.content["site"]["worker"].endswith(f"{SERVICE} sha256:{code_hash()}")  # what the hospital approved
    entries = [json.loads(line) for line in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert [e["action"] for e in entries] == ["query.describe"] and entries[0]["site"] == "site-a"


def test_the_worker_refuses_a_wrong_token_and_a_request_outside_its_protocol(served):
    worker, node_config, tmp_path = served
    (tmp_path / "guess").write_text("guessed")
    with pytest.raises(grpc.RpcError) as refused:
        forward(_request("query.describe"), _context({**node_config, "worker-token-file": str(tmp_path / "guess")}))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reply = forward(_request("query.images"), _context(node_config))
    assert reply.has_error() and "does not do 'query.images'" in reply.error.reason and SERVICE in reply.error.reason
    refusal = json.loads((tmp_path / "out" / "audit.jsonl").read_text().splitlines()[-1])
    assert refusal["action"] == "query.images" and refusal["error"]["reason"].startswith("policy")


def test_a_config_outside_the_site_policy_is_refused_by_the_worker(served):
    _, node_config, tmp_path = served
    content = RecordDict({Key.CONFIG: config_record(TINY_RUN.replace(gate_steps=10**6).to_run_config()),
                          "phase": ConfigRecord({"name": "warmup"})})
    reply = forward(_request("train.shared", content), _context(node_config))
    assert reply.has_error() and reply.error.reason.startswith("policy")
    assert "train.shared" in (tmp_path / "out" / "audit.jsonl").read_text()


def test_the_relay_imports_neither_torch_nor_monai_and_the_code_hash_is_stable():
    code = "import sys, mome.client.relay; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert code_hash() == code_hash() != empty and len(code_hash()) == 64


def test_the_worker_signs_each_reply_and_the_relay_passes_the_signature_on(two_sites, tmp_path):
    key = Ed25519PrivateKey.generate()
    token_file = tmp_path / "worker.token"
    worker = Worker(two_sites[0], "site-a", tmp_path / "out", new_token(token_file), signing_key=key)
    address = f"unix://{tmp_path / 'worker.sock'}"
    server = worker.serve(address)
    try:
        request = _request("query.describe")
        reply = forward(request, _context({"worker": address, "worker-token-file": str(token_file)}))
    finally:
        server.stop(None)
    assert reply.metadata.reply_to_message_id == request.metadata.message_id
    assert verify(reply, key.public_key())  # what the coordinator checks against the enrolled key
    assert not verify(reply, Ed25519PrivateKey.generate().public_key())


def test_a_hostile_app_at_the_site_gets_only_refusals_and_schema_replies(two_sites, tmp_path):
    """The coordinator's app replaced by a hostile one (it runs where the relay runs, with the relay's node config):
    it asks the worker for raw images, per-case values, a metric from fewer cases than the site's floor, a config
    beyond the site's policy, another protocol version, and tries to rewrite the audit log. Each is refused and
    audited; everything it could pass on to the SuperLink is a coded error or a reply inside the schema."""
    policy = SitePolicy(min_cases=2)  # TINY_RUN's min-cases is 1: the site's floor says 2
    token_file = tmp_path / "worker.token"
    worker = Worker(two_sites[0], "site-a", tmp_path / "out", new_token(token_file), policy)
    address = f"unix://{tmp_path / 'worker.sock'}"
    server = worker.serve(address)
    node = {"worker": address, "worker-token-file": str(token_file)}
    honest = TINY_RUN.replace(min_cases=2).to_run_config()

    def ask(kind: str, **config) -> Message:
        return _request(kind, RecordDict({Key.CONFIG: config_record({**honest, **config})}))

    attempts = {
        "raw images": ask("query.images"),
        "per-case values": ask("query.describe", **{"per-case-dice": True}),
        "a metric from fewer cases": ask("query.describe", **{"min-cases": 1}),
        "beyond the policy": ask("train.gate", **{"gate-steps": 10**6}),
        "rewrite the audit log": ask("query.audit", **{"out-dir": str(tmp_path / "elsewhere")}),
        "a config path for the audit": ask("query.describe", **{"out-dir": str(tmp_path / "elsewhere")}),
    }
    sent_on = {what: forward(msg, _context(node)) for what, msg in attempts.items()}
    with grpc.insecure_channel(address) as channel:  # another protocol version, with the right token
        with pytest.raises(grpc.RpcError) as other_version:
            channel.unary_unary("/mome.site.Worker/v2/Handle")(b"", metadata=(("mome-worker-token",
                                                                                 token_file.read_text()),))
    control = forward(ask("query.describe"), _context(node))
    server.stop(None)
    assert other_version.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for what, reply in sent_on.items():
        assert reply.has_error() and reply.error.reason.startswith("policy: "), what
        assert ERROR_REASON.fullmatch(reply.error.reason) and str(tmp_path) not in reply.error.reason, what
    assert not control.has_error()  # the honest request still works, and its reply is inside the schema
    assert violations("query.describe", control.content, attempts["raw images"].content, Sizes(4, 3, 0)) == []
    entries = [json.loads(line) for line in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert [e["action"] for e in entries] == [m.metadata.message_type for m in attempts.values()] + [
        "rpc /mome.site.Worker/v2/Handle", "query.describe"]
    assert all(e["error"]["reason"].startswith("policy") for e in entries[:-1])
    assert not (tmp_path / "elsewhere").exists()
