"""What the Ray cluster that `rollout-service serve` starts exposes, seen from outside: the real
command (Ray Serve backend, a real vLLM replica), the sockets of every process it runs, and a
second driver trying to attach to it.

Anyone who can attach to a Ray cluster as a driver runs code as the service (reads the keys file,
calls replica methods), past the API keys; so the cluster listens on loopback only, and where it
must listen beyond (a non-loopback --host), it requires Ray's token."""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from rollout_service.launcher import ServerProcess
from tests.conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.engine

# Settings a test process may have inherited from an earlier Ray start in the same session
# (start_ray sets them in os.environ): each test here starts `serve` as an operator would.
RAY_START_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                 "RAY_gcs_server_port_wait_time_s", "RAY_ADDRESS")


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # Ray's gRPC servers bind ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def process_tree(server: ServerProcess) -> list[psutil.Process]:
    """The serve process, its descendants, and every process in its session (ServerProcess starts
    it as a session leader): Ray's processes stay in it even when re-parented."""
    found = {server.proc.pid: psutil.Process(server.proc.pid)}
    for p in found[server.proc.pid].children(recursive=True):
        found[p.pid] = p
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == server.proc.pid:
                found[p.pid] = p
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return list(found.values())


def listening(server: ServerProcess) -> list[tuple[str, int, str, str, int]]:
    """(process name, pid, TCP/UDP, ip, port) of every listening TCP socket and bound,
    unconnected UDP socket of the tree."""
    out = []
    for p in process_tree(server):
        try:
            name, connections = p.name(), p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in connections:
            tcp = c.type == socket.SOCK_STREAM
            if (tcp and c.status == psutil.CONN_LISTEN) or (not tcp and not c.raddr):
                out.append((name, p.pid, "TCP" if tcp else "UDP", c.laddr.ip, c.laddr.port))
    return sorted(out)


def own_address() -> str | None:
    """A non-loopback IPv4 address of this machine, or None."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def start(tiny_model: Path, folder: Path, *args: str) -> ServerProcess:
    return ServerProcess.start(
        tiny_model, folder / "serve.log", "--max-model-len", str(MAX_MODEL_LEN), "--cache-dir", str(folder / "cache"),
        *args,
    )


@pytest.fixture
def operator_env(monkeypatch):
    for name in RAY_START_ENV:
        monkeypatch.delenv(name, raising=False)


def test_serve_with_defaults_listens_on_loopback_only(tiny_model, tmp_path, operator_env):
    server = start(tiny_model, tmp_path)
    try:
        sockets = listening(server)
    finally:
        assert server.stop() == 0
    names = {name for name, *_ in sockets}
    # Not vacuous: Ray's node and the service's own ports are among them.
    assert {"gcs_server", "raylet"} <= names, sockets
    grpc_port = int(server.grpc_address.rsplit(":", 1)[1])
    assert grpc_port in {port for *_, port in sockets}, sockets
    beyond = [s for s in sockets if not is_loopback(s[3])]
    assert not beyond, "listening beyond loopback:\n" + "\n".join(map(str, beyond)) + "\nall:\n" + "\n".join(map(str, sockets))


def attach(gcs_address: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess:
    """A second driver, with no token of its own unless `env` gives one: HOME has no ~/.ray."""
    code = (
        "import ray\n"
        f"ray.init(address={gcs_address!r}, logging_level='ERROR')\n"
        "print('attached to', len(ray.nodes()), 'node(s)')\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Ray retries a refused connection this many times, about a second each (ray/_private/node.py).
    clean.update(HOME=str(home), RAY_gcs_server_port_wait_time_s="5", **env)
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # 4 min: make test-all and make reliability (the loopback test stays in make test)
def test_beyond_loopback_the_cluster_requires_the_token_kept_private(tiny_model, tmp_path, operator_env):
    ip = own_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to bind the service to")
    keys = tmp_path / "api-keys"
    keys.write_text("admin:exposure-test-admin-key-0123456789\n")
    server = start(tiny_model, tmp_path, "--host", ip, "--api-keys", str(keys))
    try:
        sockets = listening(server)
        (gcs_port,) = {port for name, _, kind, _, port in sockets if name == "gcs_server" and kind == "TCP"}
        gcs = f"{ip}:{gcs_port}"
        token = tmp_path / "cache" / "ray" / "auth_token"
        assert token.is_file(), f"no token in the service's private directory ({token})"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
        assert token.read_text().strip() not in server.log_path.read_text(), "the token is in the log"
        home = tmp_path / "home"
        home.mkdir()
        refused = attach(gcs, {}, home)
        assert refused.returncode != 0 and "attached" not in refused.stdout, refused.stdout + refused.stderr[-2000:]
        wrong = attach(gcs, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, home)
        assert wrong.returncode != 0 and "attached" not in wrong.stdout, wrong.stdout + wrong.stderr[-2000:]
        # The same driver with the token attaches: the refusals above were the token's, not the network's.
        accepted = attach(gcs, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}, home)
        assert accepted.returncode == 0 and "attached to 1 node(s)" in accepted.stdout, accepted.stderr[-2000:]
        # The runtime-env agent installs packages on request (code execution by another door).
        (agent_port,) = {port for name, _, kind, _, port in sockets if name == "ray::RuntimeEnvAgent" and kind == "TCP"}
        for headers, status in (({}, 401), ({"authorization": "Bearer " + "0" * 64}, 403)):
            reply = httpx.post(f"http://{ip}:{agent_port}/get_or_create_runtime_env", headers=headers, content=b"", timeout=30)
            assert reply.status_code == status, (reply.status_code, reply.text)
    finally:
        assert server.stop() == 0
