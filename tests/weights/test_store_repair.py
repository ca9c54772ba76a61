"""`rollout-service store verify DIR` and `store repair DIR` (tools/store_cli.py, weights/repair.py)
on stores torn as a crash or a power loss leaves them, through the command line (typer's runner)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from rollout_service.cli import app
from rollout_service.weights.versions import VersionStore
from tests.weights.test_versions import push, t

runner = CliRunner()


def store_of(tmp_path, versions: int = 3) -> VersionStore:
    """Versions 1..`versions`: v1 pushes a and b, each later one a only (b stays v1's)."""
    store = VersionStore(tmp_path / "store", keep=5)
    push(store, {"a.weight": t(1), "b.weight": t(1)}, "step 1")
    for v in range(2, versions + 1):
        push(store, {"a.weight": t(v)}, f"step {v}")
    return store


def cli(*args: str):
    return runner.invoke(app, ["store", *args], catch_exceptions=False)


def shard(store: VersionStore, version: int, name: str = "a.weight"):
    return store.root / store.manifest(version).tensors[name].file


def test_verify_passes_a_whole_store_and_names_each_version(tmp_path):
    store = store_of(tmp_path)
    done = cli("verify", str(store.root))
    assert done.exit_code == 0, done.output
    assert f"weight store {store.root}: CURRENT 3" in done.output
    for v in (1, 2, 3):
        assert f"version      {v}  ok" in done.output
    assert "whole: version 3 and every kept version verify" in done.output


def test_verify_fails_a_changed_byte_naming_the_file_tensor_and_crc(tmp_path):
    store = store_of(tmp_path)
    path = shard(store, 1, "b.weight")  # shared by every version
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    done = cli("verify", str(store.root))
    assert done.exit_code == 1
    assert done.output.count(f"{path}: b.weight has CRC-32") == 3  # each version that holds it
    assert "rolls it back to version 0" in done.output


def test_repair_rolls_back_past_a_torn_newest_version_and_deletes_it(tmp_path):
    store = store_of(tmp_path)
    torn = shard(store, 3)
    torn.write_bytes(torn.read_bytes()[:-3])  # a power loss: the last bytes never reached the disk
    assert cli("verify", str(store.root)).exit_code == 1
    done = cli("repair", str(store.root))
    assert done.exit_code == 0, done.output
    assert "rolled CURRENT back from version 3 to version 2, the newest that verifies whole" in done.output
    assert "the next push is numbered 3" in done.output and "repaired: the store serves version 2" in done.output
    assert store.current_version() == 2 and not torn.exists() and not (store.root / "v000003").exists()
    assert cli("verify", str(store.root)).exit_code == 0
    assert push(store, {"a.weight": t(9)}).version == 3  # pushes go on from there
    assert cli("verify", str(store.root)).exit_code == 0


def test_repair_of_a_torn_current_takes_the_newest_whole_version(tmp_path):
    """CURRENT empty (renamed before its bytes reached the disk): the newest version that verifies
    whole is the one it named, and repair writes it back."""
    store = store_of(tmp_path)
    (store.root / "CURRENT").write_text("")
    verified = cli("verify", str(store.root))
    assert verified.exit_code == 1 and "CURRENT torn" in verified.output and "empty is not a version number" in verified.output
    done = cli("repair", str(store.root))
    assert "rolled CURRENT back from torn to version 3" in done.output
    assert store.current_version() == 3 and cli("verify", str(store.root)).exit_code == 0


def test_repair_deletes_torn_older_manifests_and_leftovers_and_keeps_shared_shards(tmp_path):
    store = store_of(tmp_path, versions=4)
    (store.root / "v000002" / "manifest.json").write_text("{")  # torn
    spool = store.spool()  # a push cut off while received, and one cut off after its adopt
    spool.add({"a.weight": t(8)})
    spool.flush()
    store.adopt(spool.dir, spool.files, 5)
    cut = store.spool()
    before = cli("verify", str(store.root))
    assert before.exit_code == 1 and "v000002/manifest.json: not a complete manifest" in before.output
    assert "v000005-push-" in before.output and str(cut.dir) in before.output  # reported, not damage
    dry = cli("repair", "--dry-run", str(store.root))
    assert "would have deleted the manifest of version 2" in dry.output and (store.root / "v000002" / "manifest.json").exists()
    done = cli("repair", str(store.root))
    assert "deleted the manifest of version 2, which does not verify" in done.output
    assert store.current_version() == 4 and not (store.root / "v000002").exists()
    assert not list(store.root.glob("v000005*")) and not cut.dir.exists()
    assert shard(store, 4, "b.weight").exists()  # v1's shard: v4 still holds it
    after = cli("verify", str(store.root))
    assert after.exit_code == 0 and "version      1  ok" in after.output and "version      2" not in after.output


def test_repair_of_a_whole_store_does_nothing(tmp_path):
    store = store_of(tmp_path)
    done = cli("repair", str(store.root))
    assert done.exit_code == 0 and "nothing to repair: the store serves version 3" in done.output
    assert store.current_version() == 3


def test_repair_is_refused_while_a_server_holds_the_store(tmp_path):
    store = store_of(tmp_path)
    (store.root / "CURRENT").write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from rollout_service.weights.versions import VersionStore; "
         "VersionStore(Path(sys.argv[1]), 2).lock(shared=True); print('locked', flush=True); time.sleep(120)", str(store.root)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = cli("repair", str(store.root))
        assert done.exit_code == 1 and f"weights_dir {store.root} is in use by a running server: stop every server on it" in done.output
        assert (store.root / "CURRENT").read_text() == ""  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert "rolled CURRENT back from torn to version 3" in cli("repair", str(store.root)).output


def test_verify_of_a_directory_that_is_not_there_says_so(tmp_path):
    done = cli("verify", str(tmp_path / "nowhere"))
    assert done.exit_code == 1 and "is not a directory: give the --weights-dir of a server" in done.output


def test_the_command_runs_as_users_run_it(tmp_path):
    store = store_of(tmp_path, versions=1)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rollout_service.cli", "store", "verify", str(store.root)], capture_output=True, text=True)
    assert done.returncode == 0 and "whole: version 1" in done.stdout, done.stderr
    assert time.monotonic() - started < 120
