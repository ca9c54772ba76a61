"""A real single-process server whose --weights-dir is on a small tmpfs mounted for the test: the
disk fills up during a push, then the store turns read-only while the server serves. Each push is
refused with the file named, leaves nothing behind, the old version serves on, and once there is
room again (remounted larger, or read-write) the next push commits.

Read-only: Linux refuses to remount a filesystem read-only while a file on it is open for writing,
and the server holds its store's LOCK so (fcntl.lockf needs it); a read-only bind mount of the
store directory over itself is what the server then sees as a store turned read-only (every new
write fails with EROFS), and unmounting it makes the store writable again.

Needs root and mount (the tests skip saying so where they are missing)."""

from __future__ import annotations

import subprocess

import pytest

from tests.weights.conftest import greedy, perturb, start_server

pytestmark = pytest.mark.engine

DISK = "10m"  # the tiny model's bf16 weights take 6.8 MB: one version fits, two do not


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the weight store here ({done.stderr.strip()}): the real disk-full and "
                    "read-only store tests need root and mount")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def disk_server(request, tiny_model, tmp_path_factory, small_disk):
    store = small_disk / "weights"
    return start_server(request, tiny_model, tmp_path_factory, "small-disk", "--weights-dir", str(store)), store


def leftovers(store, version: int) -> list[str]:
    return [p.name for p in (store / "incoming").iterdir()] + [p.name for p in store.glob(f"v{version:06d}*")]


@pytest.mark.reliability("fault")
def test_a_full_disk_refuses_the_push_naming_the_file_and_the_version_stays(disk_server, small_disk, weights0, record_property):
    """The weight store's filesystem fills up while a push is written (ENOSPC): the push is
    refused RESOURCE_EXHAUSTED naming the file, nothing of it is left, the old version serves on;
    once the filesystem is larger, the same push commits."""
    from rollout_client import ResourceExhaustedError, RolloutClient

    server, store = disk_server
    with RolloutClient(server.grpc_address, timeout=120) as client:
        assert client.push_weights(perturb(weights0, 31), progress=False).version == 1
        before = greedy(client)
        with pytest.raises(ResourceExhaustedError) as refused:
            client.push_weights(perturb(weights0, 32), progress=False)
        assert f"no space left on the disk of the weight store ({store}/incoming/push-" in str(refused.value)
        assert leftovers(store, 2) == []
        assert client.status().weight_version == 1 and greedy(client) == before
        mount("-o", "remount,size=64m", str(small_disk))
        assert client.push_weights(perturb(weights0, 32), progress=False).version == 2
        assert greedy(client) != before
    record_property("push on a full disk", "refused RESOURCE_EXHAUSTED naming the file, nothing left, version kept")
    record_property("data lost", "none")


@pytest.mark.reliability("fault")
def test_a_read_only_store_refuses_the_push_naming_the_file_and_the_version_stays(disk_server, small_disk, weights0, record_property):
    """The weight store turns read-only under the running server: a push is refused UNAVAILABLE
    naming the directory it could not write, the old version serves on; writable again, the next
    push commits."""
    from rollout_client import RolloutClient, UnavailableError

    server, store = disk_server
    with RolloutClient(server.grpc_address, timeout=120) as client:
        version, before = client.status().weight_version, greedy(client)
        mount("--bind", str(store), str(store))
        try:
            mount("-o", "remount,bind,ro", str(store))
            with pytest.raises(UnavailableError) as refused:
                client.push_weights(perturb(weights0, 33), progress=False)
        finally:
            subprocess.run(["umount", str(store)], check=True)
        message = str(refused.value)
        # The push's first write (its fencing token, before anything is received) names the file.
        assert f"the weight store cannot be written ({store}/" in message and "Read-only file system" in message
        assert leftovers(store, version + 1) == []
        assert client.status().weight_version == version and greedy(client) == before
        assert client.push_weights(perturb(weights0, 33), progress=False).version == version + 1
    record_property("push onto a read-only store", "refused UNAVAILABLE naming the directory, nothing left, version kept")
    record_property("data lost", "none")
