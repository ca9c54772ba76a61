"""The environment of a local Ray node that the service starts: where it listens, its token, and
the time it gets to come up. Applied to this process's environment before `ray.init`, so that the
GCS, raylet, agents and workers Ray starts from here inherit it.

Anyone who can attach to a Ray cluster as a driver runs code as the service (reads the keys file,
calls replica methods) past the API keys. So:

- **Loopback.** With a loopback `--host`, every Ray process listens on 127.0.0.1. Ray (2.60) turns
  a loopback node address given to `ray.init(_node_ip_address=...)` or `ray start
  --node-ip-address` into the machine's outward address (`resolve_ip_for_localhost`,
  ray/_private/services.py); the one switch that keeps a node on 127.0.0.1 is
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (`ENABLE_RAY_CLUSTER`, ray/_private/ray_constants.py), the
  single-machine mode of macOS and Windows, under which `get_node_ip_address` answers 127.0.0.1.
  Given that address, the GCS, raylet, object manager and workers' gRPC servers bind it alone
  (their C++ servers listen on all interfaces for any other node address), and the dashboard
  agent, runtime-env agent and the two metrics servers follow the node address
  (ray/dashboard/agent.py, ray/dashboard/head.py, ray/autoscaler/_private/monitor.py). Serve's
  replica gRPC servers do not (a literal `[::]:0`): serve/worker_setup.py binds them.
- **Token.** Beyond loopback those servers listen on every interface, so the cluster requires
  Ray's token (`RAY_AUTH_MODE=token`): the GCS, raylet and workers' gRPC servers (C++), the
  agents' gRPC and HTTP servers and Serve's replica gRPC servers (ray/_private/authentication/,
  ray/_private/grpc_utils.py) refuse a caller without it. The
  token is the operator's (`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`) or one generated into
  <cache_dir>/ray/auth_token (0600, directory 0700), never Ray's default ~/.ray/auth_token, which
  Ray writes with the umask's mode. A loopback node uses it too: loopback keeps other machines
  out, the token other users of this one.
  Not covered by the token (Ray serves them without it): the metrics export ports (Prometheus,
  read-only) and the dashboard agent's two health paths.
- **Time.** Ray waits `RAY_gcs_server_port_wait_time_s` (default 30 s) for the GCS to write its
  port file (ray/_private/node.py, `start_gcs_server`); a loaded 2-core machine has missed it.
  The raylet's 30 s to register with the GCS is a literal in `Node.__init__`, not a setting.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

import ray._private.ray_constants as ray_constants
from ray._raylet import AuthenticationTokenLoader, Config

from rollout_service.config import is_loopback
from rollout_service.errors import ConfigError

log = logging.getLogger("rollout_service")

# Room for the GCS to come up on a loaded 2-core machine: Ray's own figure for a RocksDB-backed
# GCS (ray/_private/node.py), four times its in-memory default.
GCS_PORT_WAIT_S = 120
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
GCS_PORT_WAIT = "RAY_gcs_server_port_wait_time_s"
WORKER_SETUP = "rollout_service.serve.worker_setup.bind_on_node_address"


def prepare(host: str, private_dir: Path) -> None:
    """Set this process's environment for a local node serving `host` (the service's bind
    address); `private_dir` holds the generated token."""
    os.environ.setdefault(GCS_PORT_WAIT, str(GCS_PORT_WAIT_S))
    loopback = is_loopback(host)
    os.environ[SINGLE_MACHINE] = "0" if loopback else "1"
    # Ray read the variable when it was imported, before this; its child processes read it anew.
    ray_constants.ENABLE_RAY_CLUSTER = not loopback
    _require_token(host, loopback, private_dir)


def runtime_env(host: str, given: dict | None) -> dict | None:
    """The job's runtime env: `given` plus, on a loopback node, the worker setup hook that keeps
    Serve's replica gRPC servers on loopback (serve/worker_setup.py); Ray passes a job's runtime env
    on to the actors it starts, Serve's controller and replicas included."""
    if not is_loopback(host):
        return given
    env = dict(given or {})
    if "worker_process_setup_hook" in env:
        raise ConfigError(
            f"runtime_env sets worker_process_setup_hook={env['worker_process_setup_hook']!r}, but a loopback node "
            f"started here needs its own ({WORKER_SETUP!r}): call it from yours, or start Ray yourself and pass its address"
        )
    env["worker_process_setup_hook"] = WORKER_SETUP
    return env


def _require_token(host: str, loopback: bool, private_dir: Path) -> None:
    mode = os.environ.get(AUTH_MODE)
    if mode is not None and mode.lower() != "token":
        if not loopback:
            raise ConfigError(
                f"{AUTH_MODE}={mode!r} turns Ray's token authentication off, but host={host!r} is not a loopback "
                f"address, so Ray's node would listen beyond it and anyone reaching it could run code as the "
                f"service: unset {AUTH_MODE} (a token is then required), or run your own cluster and pass --ray-address"
            )
        log.warning("%s=%s: Ray's local node runs without token authentication (it listens on loopback only)", AUTH_MODE, mode)
        return
    if AUTH_TOKEN not in os.environ and AUTH_TOKEN_PATH not in os.environ:
        os.environ[AUTH_TOKEN_PATH] = str(token_file(private_dir))
    os.environ[AUTH_MODE] = "token"
    # This process's RayConfig and token cache were read from the environment before it changed
    # (as ray/_private/authentication/authentication_token_setup.py refreshes them itself).
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def token_file(private_dir: Path) -> Path:
    """<private_dir>/ray/auth_token: made once with a new 256-bit token, readable by this user only;
    kept across starts, so services sharing the directory share one token."""
    folder = private_dir / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / "auth_token"
    if not path.exists():
        # Written aside and linked into place: a concurrent start sees no file or a whole one.
        aside = folder / f".auth_token.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # as ray/_private/authentication/authentication_token_generator.py
                f.flush()
                os.fsync(f.fileno())
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            aside.unlink()
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(
            f"Ray's token file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}): "
            f"delete it (a new token is made at the next start) or `chmod 600` it if no one else could have read it"
        )
    if not path.read_text().strip():
        raise ConfigError(f"Ray's token file {path} is empty: delete it, and a new token is made at the next start")
    return path
