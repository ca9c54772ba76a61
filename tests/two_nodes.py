"""A Ray cluster of two nodes on this machine whose worker node sees none of the head's files: the
head started by `ray start --head` as an operator starts one (token authentication on), and a worker
node started by `ray start --address` inside its own mount namespace, with a private tmpfs over the
directories given (the service's store, staging and cache, Ray's temporary directory), so that
nothing the head writes to disk is visible to it. The worker node carries the custom resource
`RESOURCE`, which the engine replicas ask for (`--replica-resource`). Both nodes share this
machine's network namespace: they talk through Ray as two machines would (objects cross between
their object stores), on the machine's address.

The token reaches each node through its environment (`RAY_AUTH_TOKEN`), as from a Kubernetes
Secret; the nodes are killed at `stop`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESOURCE = "rollout_engine"
MULTI_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch (serve/local_ray.py turns it off on loopback)
RAY = str(Path(sys.executable).parent / "ray")


def machine_address() -> str:
    """This machine's outward address (what Ray picks for a node), not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # no packet is sent: only the route is looked up
        return s.getsockname()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class TwoNodes:
    address: str  # the head's GCS, host:port
    token: str
    head_temp: Path
    nodes: list[subprocess.Popen]
    logs: Path

    def env(self) -> dict[str, str]:
        """What a driver (and every node) needs to join: the token, from the environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        """Kill both nodes at once: the cluster is thrown away (a SIGTERM'd node drains for 30 s)."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # `ray start --block` and the node's processes
            node.wait(30)
        # Processes of the nodes that left their process group (each names its session directory).
        subprocess.run(["pkill", "-9", "-f", str(self.head_temp)], check=False)


def start_two_nodes(
    hidden: list[Path], logs: Path, worker_cpus: int = 2, engines: int = 2, env: dict | None = None,
    head_resources: dict | None = None,
) -> TwoNodes:
    """Start the head (no `RESOURCE`: no engines unless `head_resources` names another resource
    replicas may ask for) and the worker node (`engines` units of `RESOURCE`) and wait until both
    are in the cluster. `hidden`: directories of the head the worker must not see (each gets a
    private tmpfs there); `env`: more environment for both nodes (S3's)."""
    logs.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    host, port = machine_address(), free_port()
    address = f"{host}:{port}"
    head_temp = Path(tempfile.mkdtemp(prefix="ray-head-", dir="/tmp"))
    # A loopback node started earlier in this process (the service's own) set single-machine mode,
    # under which `ray start --address` refuses to add a node: these nodes are a cluster.
    base = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, MULTI_NODE: "1"}
    base.pop("RAY_AUTH_TOKEN_PATH", None)
    base.pop("RAY_ADDRESS", None)
    # The head: its temporary directory a fresh one, which the worker node's namespace hides too.
    head = _node(
        [RAY, "start", "--head", f"--port={port}", f"--node-ip-address={host}", "--num-cpus=2",
         f"--resources={json.dumps(head_resources or {})}", f"--temp-dir={head_temp}", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        base, logs / "head.log",
    )
    nodes = TwoNodes(address, token, head_temp, [head], logs)
    try:
        _wait_for_nodes(nodes, 1, head)
        masks = " && ".join(f"mount -t tmpfs rollout-private {shlex.quote(str(d))}" for d in [*hidden, head_temp])
        worker_temp = head_temp / "worker"  # inside the tmpfs over the head's: the worker's own
        command = (
            f"{masks} && mkdir -p {shlex.quote(str(worker_temp))} && exec {shlex.quote(RAY)} start "
            f"--address={address} --node-ip-address={host} --num-cpus={worker_cpus} "
            f"--resources={shlex.quote(json.dumps({RESOURCE: engines}))} --temp-dir={shlex.quote(str(worker_temp))} "
            f"--disable-usage-stats --block"
        )
        worker = _node(["unshare", "--mount", "--propagation", "private", "bash", "-c", command], base, logs / "worker.log")
        nodes.nodes.append(worker)
        _wait_for_nodes(nodes, 2, worker)
    except BaseException:
        nodes.stop()
        raise
    return nodes


def _node(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(nodes: TwoNodes, count: int, started: subprocess.Popen, timeout_s: float = 180) -> None:
    """Until the cluster has `count` live nodes (asked with `ray status` through the token)."""
    deadline = time.monotonic() + timeout_s
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": nodes.token, MULTI_NODE: "1"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    while time.monotonic() < deadline:
        if started.poll() is not None:
            raise RuntimeError(f"a Ray node exited with {started.returncode}: see {nodes.logs}")
        status = subprocess.run([RAY, "status", f"--address={nodes.address}"], env=env, capture_output=True, text=True)
        if status.returncode == 0 and _live_nodes(status.stdout) >= count:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster did not reach {count} node(s) in {timeout_s:.0f} s: see {nodes.logs}")


def _live_nodes(status: str) -> int:
    """Live nodes in `ray status` output: the lines under "Active:" naming a node."""
    active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)
