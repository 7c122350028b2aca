"""`mome site serve`: the site worker, the long-running process a hospital installs and starts itself. It alone opens
the data folder and the site's output folder, and runs every site-side step with the site's own guard (policy, schema,
coded errors, audit log): the coordinator's app (the relay in client/relay.py) only hands it each message over a
local gRPC channel. torch, MONAI, the loaded cases and the cache stay in memory between messages."""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.util
import logging
import os
import secrets
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

from mome.client import audit
from mome.client.client_app import make_client_app
from mome.client.guard import coded_error
from mome.client.policy import SitePolicy
from mome.common.config import package_version
from mome.common.signing import sign
from mome.common.wire import Action, check_site_id

log = logging.getLogger("mome.worker")

SERVICE = "mome.site.Worker/v1"  # the worker protocol's name and version: a relay of another version is refused
TOKEN_HEADER = "mome-worker-token"
KINDS = frozenset({"query.describe", *(str(a) for a in Action)})  # what the worker accepts
LAYERS = ("common", "client", "server", "sim", "deploy", "cli")
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]


def code_hash() -> str:
    """SHA-256 over the installed mome package's Python files (path and content): what a hospital approves."""
    digest = hashlib.sha256()
    for layer in LAYERS:  # mome is a namespace package mapped from the layer folders: ask each where it lies
        spec = importlib.util.find_spec(f"mome.{layer}")
        for root in sorted(Path(p) for p in (spec.submodule_search_locations or [])):
            for path in sorted(root.rglob("*.py")):
                digest.update(f"{layer}/{path.relative_to(root)}".encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class Worker:
    """One site's steps behind a local gRPC endpoint: every message goes through the same ClientApp (guard and
    handlers) the simulation runs, inside this process, with this site's own node config."""

    def __init__(self, data_dir: Path, site_id: str, out_dir: Path, token: str, policy: SitePolicy | None = None,
                 signing_key=None):
        self.token, self.signing_key = token, signing_key  # the key signs every reply (an Ed25519PrivateKey)
        located = (Path(data_dir), check_site_id(site_id), Path(out_dir))
        self.app = make_client_app(lambda context: located, policy_of=lambda context: policy or SitePolicy(),
                                   worker=f"{package_version()} {SERVICE} sha256:{code_hash()}")
        self.context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.site_id, self.out_dir = site_id, Path(out_dir)
        self.one_at_a_time = threading.Lock()  # steps run in turn; the second thread answers health probes

    def _check_token(self, context: grpc.ServicerContext) -> None:
        sent = dict(context.invocation_metadata()).get(TOKEN_HEADER, "")
        if not hmac.compare_digest(sent.encode(), self.token.encode()):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong worker token")

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """A serialised Flower Message in, the serialised reply Message out (content, or a coded error)."""
        self._check_token(context)
        msg = message_from_proto(ProtoMessage.FromString(request))
        if msg.metadata.message_type not in KINDS:
            log.warning("site %s: refused a %r request", self.site_id, msg.metadata.message_type[:60])
            reply = coded_error(msg, "policy", f"the site worker ({SERVICE}) does not do "
                                               f"{msg.metadata.message_type[:60]!r}")
            audit.append(self.out_dir, audit.entry(msg, reply, self.site_id))
        else:
            with self.one_at_a_time:
                started = time.perf_counter()
                reply = self.app(msg, self.context)
                log.info("site %s: %s answered in %.2f s", self.site_id, msg.metadata.message_type,
                         time.perf_counter() - started)
        if self.signing_key is not None:
            sign(reply, self.signing_key)
        return message_to_proto(reply).SerializeToString()

    def refuse_method(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """A call to another protocol version (or any method but Handle): audited, then refused."""
        self._check_token(context)
        reason = f"policy: this worker speaks {SERVICE} only"
        log.warning("site %s: refused a call to %r", self.site_id, method[:80])
        audit.append(self.out_dir, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "site": self.site_id,
                                    "action": f"rpc {method[:80]}", "error": {"code": 0, "reason": reason},
                                    "bytes": 0})
        context.abort(grpc.StatusCode.UNIMPLEMENTED, reason)

    def serve(self, address: str) -> grpc.Server:
        """Start serving on `address` (unix:///path or localhost:port); returns the started server."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((_Routes(self),))
        probe = health.HealthServicer()  # liveness for deploy-local and compose (`mome health`); carries no data
        probe.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(probe, server)
        if not server.add_insecure_port(address):
            raise OSError(f"cannot listen on {address}")
        server.start()
        if address.startswith("unix:"):  # the relay runs as the SuperNode's user: group, never others
            os.chmod(address.split(":", 1)[1].removeprefix("//"), 0o660)
        return server


class _Routes(grpc.GenericRpcHandler):
    """Handle for this protocol version; any other method of the worker's service name, another version included,
    is audited and refused; everything else (the health service) is left to its own handler."""

    def __init__(self, worker: Worker):
        self.handle = grpc.unary_unary_rpc_method_handler(worker.handle)
        self.worker = worker

    def service(self, details):
        if details.method == f"/{SERVICE}/Handle":
            return self.handle
        if details.method.startswith(f"/{SERVICE.split('/')[0]}"):
            return grpc.unary_unary_rpc_method_handler(functools.partial(self.worker.refuse_method, details.method))
        return None


def new_token(path: Path) -> str:
    """A fresh token for this worker, written 0600 to `path` (the SuperNode's node config passes it on)."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    return token

