"""Run in every worker process of a loopback Ray node the service starts (Ray's
`worker_process_setup_hook`, set by `serve/local_ray.py`); imports nothing heavy, since idle
workers run it too.

Ray Serve (2.60) starts an inter-deployment gRPC server in every replica bound to `[::]:0`, a
literal in `ReplicaBase._on_initialized` (ray/serve/_private/replica.py) with no setting, whatever
the node's address; the handles that call it use the node's address and the port it reports
(ray/serve/_private/deployment_state.py). On a node whose address is loopback, that server is the one
socket that would listen beyond it (it checks Ray's token when token authentication is on, but a
loopback node should need no token to stay closed).
"""

from __future__ import annotations

import ipaddress

import ray
import ray._common.tls_utils as tls_utils

WILDCARDS = ("[::]", "0.0.0.0", "[0.0.0.0]", "")


def bind_on_node_address() -> None:
    """Make Ray's gRPC port helper bind a wildcard address to the node's (loopback) address, in
    this worker. Serve's replica module imports the helper by name when it is first imported, which
    is after this hook runs, so it takes the wrapped one."""
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:
        return  # a node beyond loopback listens on every interface anyway, behind Ray's token
    original = tls_utils.add_port_to_grpc_server
    if getattr(original, "rollout_service_wrapped", False):
        return

    def add_port_to_grpc_server(server, address: str):
        host, _, port = address.rpartition(":")
        if host in WILDCARDS:
            address = f"{node_ip}:{port}"
        return original(server, address)

    add_port_to_grpc_server.rollout_service_wrapped = True
    tls_utils.add_port_to_grpc_server = add_port_to_grpc_server
