"""Liveness probes of a deployment's processes: the gRPC health service (`mome health`) and open TCP ports."""

from __future__ import annotations

import socket


def check_health(address: str, timeout: float = 3.0) -> bool:
    """True when the gRPC health service at address answers SERVING (liveness of a SuperLink/SuperNode)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
