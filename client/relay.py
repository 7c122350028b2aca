"""The ClientApp a coordinator's app bundle may carry at a site: a relay. It hands each message to the site's own
worker (`mome site serve`, client/worker.py) over a local gRPC channel and returns the worker's reply; it imports
neither torch nor MONAI and opens no site file. Its SuperNode's node config names the worker:
`worker="unix:///run/mome/worker.sock" worker-token-file="/run/mome/worker.token"`."""

from __future__ import annotations

from pathlib import Path

import grpc
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

# the worker's side of the contract, repeated here so that this module imports nothing of the site's code
SERVICE = "mome.site.Worker/v1"
TOKEN_HEADER = "mome-worker-token"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
TIMEOUT_S = 3600.0


def forward(msg: Message, context: Context) -> Message:
    """The worker's reply to msg, as this process's reply (content or error)."""
    node = context.node_config
    if "worker" not in node:
        raise ValueError('node config needs worker="unix:///path/to/worker.sock" (and worker-token-file)')
    token = Path(str(node["worker-token-file"])).read_text().strip() if "worker-token-file" in node else ""
    with grpc.insecure_channel(str(node["worker"]), options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Handle")
        data = call(message_to_proto(msg).SerializeToString(), metadata=((TOKEN_HEADER, token),), timeout=TIMEOUT_S)
    reply = message_from_proto(ProtoMessage.FromString(data))
    return Message(reply.error, reply_to=msg) if reply.has_error() else Message(reply.content, reply_to=msg)


def make_relay_app() -> ClientApp:
    app = ClientApp()
    app.query("describe")(forward)
    for action in ("shared", "expert", "gate"):
        app.train(action)(forward)
    app.evaluate()(forward)
    return app


app = make_relay_app()
