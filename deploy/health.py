"""Liveness probes of a deployment's processes: the gRPC health service (`mome health`) and open TCP ports."""

from __future__ import annotations

import socket
from pathlib import Path


def health_status(address: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, what was found) for the gRPC health service at address: "SERVING", the status it reported, or why
    nothing answered (no such socket, nothing listening, no answer in time, not a health service)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if address.startswith("unix://") and not Path(address.removeprefix("unix://")).exists():
        return False, f"no socket at {address.removeprefix('unix://')} (is the worker started?)"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            why = {grpc.StatusCode.UNAVAILABLE: "nothing answers there (not started, wrong address or port, or a "
                                                "firewall)",
                   grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {timeout:g} s (starting, or overloaded)",
                   grpc.StatusCode.UNIMPLEMENTED: "something answers, but not a gRPC health service (the health "
                                                  "port is another)"}.get(code, f"gRPC error {code}")
            return False, why
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def check_health(address: str, timeout: float = 3.0) -> bool:
    """True when the gRPC health service at address answers SERVING (liveness of a SuperLink/SuperNode/worker)."""
    return health_status(address, timeout)[0]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
