"""start_ray: a local Ray node that misses one of its startup windows (the raylet's 30 s
registration, the GCS's port file) is started once more, and a second failure says why; a local
node starts with the environment serve/local_ray.py sets (loopback, token, 120 s for the GCS), a
joined cluster with none of it. Ray itself is replaced by a test double here (the real start is
covered by test_cluster.py and test_ray_exposure.py)."""

from __future__ import annotations

import os

import pytest
import ray._private.ray_constants as ray_constants

from rollout_service.errors import ConfigError
from rollout_service.serve import local_ray, runner

RAY_START_ENV = (local_ray.AUTH_MODE, local_ray.AUTH_TOKEN, local_ray.AUTH_TOKEN_PATH, local_ray.SINGLE_MACHINE,
                 local_ray.GCS_PORT_WAIT, "RAY_ADDRESS")

TIMED_OUT = Exception("The current node timed out during startup. This could happen because ...")


class RayInitDouble:
    """Stands in for `ray.init` / `ray.shutdown`: fails the first `failures` starts."""

    def __init__(self, failures: int, error: Exception = TIMED_OUT):
        self.failures, self.error, self.calls, self.shutdowns = failures, error, 0, 0
        self.kwargs: dict = {}
        self.env: dict[str, str] = {}  # the environment each start saw (Ray's processes inherit it)
        self.single_machine: bool | None = None

    def init(self, **kwargs):
        self.calls += 1
        self.kwargs, self.env = kwargs, dict(os.environ)
        self.single_machine = not ray_constants.ENABLE_RAY_CLUSTER
        if self.calls <= self.failures:
            raise self.error

    def shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def ray_env(monkeypatch):
    """The operator's environment without Ray settings; restored afterwards, this process's Ray
    config and token cache with it."""
    from ray._raylet import AuthenticationTokenLoader, Config

    for name in RAY_START_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    yield monkeypatch
    monkeypatch.undo()
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def ray_double(ray_env):
    monkeypatch = ray_env

    def make(failures: int, error: Exception = TIMED_OUT) -> RayInitDouble:
        double = RayInitDouble(failures, error)
        monkeypatch.setattr(runner.ray, "init", double.init)
        monkeypatch.setattr(runner.ray, "shutdown", double.shutdown)
        return double

    return make


def test_a_node_that_misses_its_startup_window_is_started_again(ray_double, tmp_path):
    double = ray_double(failures=1)
    runner.start_ray(num_cpus=2, private_dir=tmp_path)
    assert (double.calls, double.shutdowns) == (2, 1)


def test_a_gcs_that_misses_its_port_file_window_is_started_again(ray_double, tmp_path):
    # As seen in CI on a loaded 2-core machine.
    double = ray_double(failures=1, error=RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_d924"))
    runner.start_ray(num_cpus=2, private_dir=tmp_path)
    assert (double.calls, double.shutdowns) == (2, 1)


def test_a_second_miss_is_a_config_error_with_memory_and_ray_logs(ray_double, tmp_path):
    ray_double(failures=2)
    with pytest.raises(ConfigError, match=r"failed to start twice: The current node timed out.*memory available .* GiB; log files in"):
        runner.start_ray(num_cpus=2, private_dir=tmp_path)


def test_other_errors_and_joining_a_cluster_are_not_retried(ray_double, tmp_path):
    double = ray_double(failures=1, error=RuntimeError("bad argument"))
    with pytest.raises(RuntimeError, match="bad argument"):
        runner.start_ray(num_cpus=2, private_dir=tmp_path)
    double = ray_double(failures=1)
    with pytest.raises(Exception, match="timed out during startup"):
        runner.start_ray(address="10.0.0.1:6379")
    assert double.calls == 1


def test_a_local_start_gives_the_gcs_120_s_unless_the_operator_set_a_time(ray_double, ray_env, tmp_path):
    # The fresh-clone run lost a test to Ray's 30 s default on a loaded 2-core machine, twice.
    double = ray_double(failures=0)
    runner.start_ray(num_cpus=2, private_dir=tmp_path)
    assert double.env["RAY_gcs_server_port_wait_time_s"] == "120"
    ray_env.setenv("RAY_gcs_server_port_wait_time_s", "300")
    runner.start_ray(num_cpus=2, private_dir=tmp_path)
    assert double.env["RAY_gcs_server_port_wait_time_s"] == "300"


def test_a_local_start_never_joins_a_cluster_another_program_started_on_this_host(ray_double, ray_env, tmp_path):
    """Given no address ray.init joins the cluster in /tmp/ray/ray_current_cluster (a trainer's
    `ray start --head`); `serve` starts its own node ("local") unless told to join one."""
    double = ray_double(failures=0)
    runner.start_ray(num_cpus=2, private_dir=tmp_path)
    assert double.kwargs["address"] == "local"
    runner.start_ray("10.0.0.1:6379", private_dir=tmp_path)
    assert double.kwargs["address"] == "10.0.0.1:6379"
    ray_env.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    runner.start_ray(private_dir=tmp_path)
    assert double.kwargs["address"] is None  # ray.init joins RAY_ADDRESS itself


def test_a_loopback_start_keeps_ray_on_loopback_and_requires_its_token(ray_double, tmp_path):
    double = ray_double(failures=0)
    runner.start_ray(num_cpus=2, host="127.0.0.1", private_dir=tmp_path)
    assert double.env[local_ray.SINGLE_MACHINE] == "0" and double.single_machine
    assert double.kwargs["runtime_env"] == {"worker_process_setup_hook": local_ray.WORKER_SETUP}
    assert double.env[local_ray.AUTH_MODE] == "token"
    assert double.env[local_ray.AUTH_TOKEN_PATH] == str(tmp_path / "ray" / "auth_token")


def test_a_start_beyond_loopback_listens_as_ray_does_and_requires_its_token(ray_double, tmp_path):
    double = ray_double(failures=0)
    runner.start_ray(num_cpus=2, host="0.0.0.0", private_dir=tmp_path, runtime_env={"env_vars": {"A": "1"}})
    assert double.env[local_ray.SINGLE_MACHINE] == "1" and not double.single_machine
    assert double.kwargs["runtime_env"] == {"env_vars": {"A": "1"}}  # no hook: every interface anyway
    assert double.env[local_ray.AUTH_MODE] == "token"
    assert double.env[local_ray.AUTH_TOKEN_PATH] == str(tmp_path / "ray" / "auth_token")


def test_the_callers_runtime_env_keeps_its_fields_beside_the_hook(ray_double, tmp_path):
    double = ray_double(failures=0)
    runner.start_ray(num_cpus=2, private_dir=tmp_path, runtime_env={"env_vars": {"A": "1"}})
    assert double.kwargs["runtime_env"] == {"env_vars": {"A": "1"}, "worker_process_setup_hook": local_ray.WORKER_SETUP}
    with pytest.raises(ConfigError, match="worker_process_setup_hook='my.hook'.*needs its own"):
        runner.start_ray(num_cpus=2, private_dir=tmp_path, runtime_env={"worker_process_setup_hook": "my.hook"})


def test_the_operators_token_is_used_as_given(ray_double, ray_env, tmp_path):
    double = ray_double(failures=0)
    ray_env.setenv(local_ray.AUTH_TOKEN_PATH, "/run/secrets/ray-token")
    runner.start_ray(num_cpus=2, host="0.0.0.0", private_dir=tmp_path)
    assert double.env[local_ray.AUTH_TOKEN_PATH] == "/run/secrets/ray-token"
    ray_env.delenv(local_ray.AUTH_TOKEN_PATH)
    ray_env.setenv(local_ray.AUTH_TOKEN, "f" * 64)
    runner.start_ray(num_cpus=2, host="0.0.0.0", private_dir=tmp_path)
    assert local_ray.AUTH_TOKEN_PATH not in double.env and double.env[local_ray.AUTH_MODE] == "token"
    assert not (tmp_path / "ray").exists()


def test_token_auth_turned_off_is_refused_beyond_loopback_and_kept_on_loopback(ray_double, ray_env, tmp_path):
    double = ray_double(failures=0)
    ray_env.setenv(local_ray.AUTH_MODE, "disabled")
    with pytest.raises(ConfigError, match=r"RAY_AUTH_MODE='disabled'.*host='0.0.0.0' is not a loopback address.*unset RAY_AUTH_MODE"):
        runner.start_ray(num_cpus=2, host="0.0.0.0", private_dir=tmp_path)
    assert double.calls == 0
    runner.start_ray(num_cpus=2, host="127.0.0.1", private_dir=tmp_path)
    assert double.env[local_ray.AUTH_MODE] == "disabled" and double.env[local_ray.SINGLE_MACHINE] == "0"


def test_joining_a_cluster_leaves_the_environment_as_it_is(ray_double, ray_env, tmp_path):
    double = ray_double(failures=0)
    runner.start_ray("10.0.0.1:6379", private_dir=tmp_path)
    assert not set(RAY_START_ENV) & set(double.env)
    assert "runtime_env" not in double.kwargs
    # RAY_ADDRESS is what ray.init joins when it is given no address.
    ray_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    runner.start_ray(private_dir=tmp_path)
    assert local_ray.AUTH_MODE not in double.env and not (tmp_path / "ray").exists()


def test_the_token_file_is_made_once_readable_by_this_user_only(tmp_path):
    path = local_ray.token_file(tmp_path)
    assert path == tmp_path / "ray" / "auth_token"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, hex, as Ray makes its own
    assert local_ray.token_file(tmp_path).read_text() == token  # kept: services sharing the directory share it
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"]


def test_a_token_file_others_could_read_or_an_empty_one_is_refused(tmp_path):
    path = local_ray.token_file(tmp_path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"{path} is readable by others \(mode 644.*delete it"):
        local_ray.token_file(tmp_path)
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=rf"{path} is empty"):
        local_ray.token_file(tmp_path)


def test_the_worker_hook_binds_rays_wildcard_grpc_ports_to_a_loopback_node():
    """What the hook does in a worker of a loopback node, in a fresh interpreter: Serve's replica
    module, imported after it, binds its inter-deployment server to 127.0.0.1 (a real gRPC server)."""
    import subprocess
    import sys

    code = (
        "import grpc, psutil, ray._private.ray_constants as c\n"
        "c.ENABLE_RAY_CLUSTER = False  # as on a node local_ray.prepare set up for loopback\n"
        "from rollout_service.serve.worker_setup import bind_on_node_address\n"
        "bind_on_node_address()\n"
        "from ray.serve._private import replica\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "server = grpc.server(ThreadPoolExecutor(1))\n"
        "port = replica.add_port_to_grpc_server(server, '[::]:0')\n"
        "server.start()\n"
        "print([c.laddr.ip for c in psutil.Process().net_connections('inet') if c.laddr.port == port])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in RAY_START_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # gRPC binds IPv4 through a dual-stack socket: ::ffff:127.0.0.1 is 127.0.0.1.
    assert out.stdout.strip().splitlines()[-1] in ("['127.0.0.1']", "['::ffff:127.0.0.1']"), out.stdout


class ServeShutdownDouble:
    """Stands in for the Serve calls `run` makes around a deployment that fails at once."""

    def __init__(self):
        self.shutdowns = 0

    def shutdown(self):
        self.shutdowns += 1


@pytest.mark.parametrize("joined", ["--ray-address", "RAY_ADDRESS", None])
def test_stopping_shuts_down_only_a_cluster_serve_started_itself(ray_double, ray_env, tmp_path, tiny_model, joined):
    """A cluster joined by --ray-address or RAY_ADDRESS is the operator's: `serve` deletes its
    application and disconnects, but leaves Serve running there."""
    from rollout_service.config import ServerConfig

    ray_double(failures=0)
    served = ServeShutdownDouble()
    ray_env.setattr(runner.serve, "delete", lambda name: None)
    ray_env.setattr(runner.serve, "shutdown", served.shutdown)
    ray_env.setattr(runner, "deploy", lambda config: (_ for _ in ()).throw(RuntimeError("deploy failed")))
    ray_env.setattr(runner, "check_ports_free", lambda config: None)
    ray_env.setattr(runner, "resolve_model", lambda config: config.model)
    if joined == "RAY_ADDRESS":
        ray_env.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    address = "10.0.0.1:6379" if joined == "--ray-address" else None
    config = ServerConfig(model=tiny_model, ray_address=address, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="deploy failed"):
        runner.run(config)
    assert served.shutdowns == (0 if joined else 1)
