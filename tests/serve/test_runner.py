"""start_ray: a local Ray node that misses one of its fixed startup windows (the raylet's 30 s
registration, the GCS's port file) is started once more, and a second failure says why.
Ray itself is replaced by a test double here (the real start is covered by test_cluster.py)."""

from __future__ import annotations

import pytest

from rollout_service.errors import ConfigError
from rollout_service.serve import runner

TIMED_OUT = Exception("The current node timed out during startup. This could happen because ...")


class RayInitDouble:
    """Stands in for `ray.init` / `ray.shutdown`: fails the first `failures` starts."""

    def __init__(self, failures: int, error: Exception = TIMED_OUT):
        self.failures, self.error, self.calls, self.shutdowns = failures, error, 0, 0

    def init(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error

    def shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def ray_double(monkeypatch):
    def make(failures: int, error: Exception = TIMED_OUT) -> RayInitDouble:
        double = RayInitDouble(failures, error)
        monkeypatch.setattr(runner.ray, "init", double.init)
        monkeypatch.setattr(runner.ray, "shutdown", double.shutdown)
        return double

    return make


def test_a_node_that_misses_its_startup_window_is_started_again(ray_double):
    double = ray_double(failures=1)
    runner.start_ray(num_cpus=2)
    assert (double.calls, double.shutdowns) == (2, 1)


def test_a_gcs_that_misses_its_port_file_window_is_started_again(ray_double):
    # As seen in CI on a loaded 2-core machine.
    double = ray_double(failures=1, error=RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_d924"))
    runner.start_ray(num_cpus=2)
    assert (double.calls, double.shutdowns) == (2, 1)


def test_a_second_miss_is_a_config_error_with_memory_and_ray_logs(ray_double):
    ray_double(failures=2)
    with pytest.raises(ConfigError, match=r"failed to start twice: The current node timed out.*memory available .* GiB; log files in"):
        runner.start_ray(num_cpus=2)


def test_other_errors_and_joining_a_cluster_are_not_retried(ray_double):
    double = ray_double(failures=1, error=RuntimeError("bad argument"))
    with pytest.raises(RuntimeError, match="bad argument"):
        runner.start_ray(num_cpus=2)
    double = ray_double(failures=1)
    with pytest.raises(Exception, match="timed out during startup"):
        runner.start_ray(address="10.0.0.1:6379")
    assert double.calls == 1
