"""The weight store alone under random sequences of pushes, commits, crashes, restarts with
another --keep-versions, and cleans (a hypothesis state machine).

A crash is the process dying at the k-th sync or fault point of an operation (weights/durable.py's
helpers and faults.fault_point are wrapped to raise SimulatedCrash there, which no code of the
store catches): the store object is dropped as it stands, nothing is cleaned up, and the next step
is a restart (a new VersionStore, checked and cleaned as a server's start does). A power loss is a
crash after which every file whose bytes were not synced since last written reads back empty, as
a file renamed before its data reached the disk does on ext4 or xfs. Invariants, after every step:
CURRENT names a complete version whose every CRC-32 verifies, holding the tensors last committed
to it; a commit that returned is never lost (CURRENT names it or a later version); a restart
leaves nothing of uncommitted pushes. FUZZ_EXAMPLES sets the number of sequences (`make
reliability`: many more than `make test`)."""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from rollout_service import faults
from rollout_service.weights import durable
from rollout_service.weights.versions import VersionStore, crc32_of

NAMES = ("a.weight", "b.weight", "c.weight")
# `make test`: 100 sequences (about 10 s); `make reliability` (FUZZ_EXAMPLES=10000): 2,000.
EXAMPLES = max(100, int(os.environ.get("FUZZ_EXAMPLES", "0")) // 5)


class SimulatedCrash(BaseException):
    """The process died here (what SIGKILL or a power loss does to it; no code catches it)."""


def tensor(value: int) -> torch.Tensor:
    return torch.full((4, 3), float(value), dtype=torch.bfloat16)


class StoreMachine(RuleBasedStateMachine):
    seen: collections.Counter = collections.Counter()  # over every sequence: the test's figures

    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="store-machine-"))
        self.keep = 2
        self.store: VersionStore | None = VersionStore(self.root, self.keep)
        self.reported = 0  # the newest version a commit returned
        self.attempted: int | None = None  # a commit the process died in: it may have landed
        self.values: dict[int, dict[str, int]] = {0: {}}  # version -> tensor name -> value stored
        self.pending: tuple[int, dict, dict, dict[str, int]] | None = None  # adopted, not committed
        self.synced: dict[int, tuple[int, int]] = {}  # inode -> (mtime, size) when last synced
        self.crash_in: int | None = None  # syncs / fault points left before the process dies
        self.power_loss = False
        self.counter = 0  # a new value for every push
        self._real = (durable.fsync_file, durable.fsync_dir, faults.fault_point)
        durable.fsync_file, durable.fsync_dir, faults.fault_point = self._fsync_file, self._step, self._step

    def teardown(self):
        durable.fsync_file, durable.fsync_dir, faults.fault_point = self._real
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- the sync helpers and fault points, wrapped ------------------------------------------

    def _step(self, path=None, sync=True) -> None:
        """A sync of a directory or a fault point: where the process may die. (The real syncs
        are not run: what is tested is the order, which the model of a power loss follows.)"""
        if self.crash_in is not None:
            self.crash_in -= 1
            if self.crash_in < 0:
                self.crash_in = None
                raise SimulatedCrash()

    def _fsync_file(self, path, sync=True) -> None:
        self._step()
        st_ = os.stat(path)
        self.synced[st_.st_ino] = (st_.st_mtime_ns, st_.st_size)

    def _lose_unsynced_bytes(self) -> None:
        for path in self.root.rglob("*"):
            if path.is_file() and path.name not in ("LOCK", "COMMIT.lock"):
                st_ = path.stat()
                if self.synced.get(st_.st_ino) != (st_.st_mtime_ns, st_.st_size):
                    path.write_bytes(b"")

    def _dies(self, operation) -> bool:
        """Run `operation`; True if the process died in it (then it is gone until `restart`)."""
        try:
            operation()
            return False
        except SimulatedCrash:
            self.store, self.pending = None, None
            self.seen["power losses" if self.power_loss else "kills"] += 1
            if self.power_loss:
                self._lose_unsynced_bytes()
            return True
        finally:
            self.crash_in = None

    def _arm(self, crash_in: int | None, power_loss: bool) -> None:
        self.crash_in, self.power_loss = crash_in, power_loss

    # ---- steps --------------------------------------------------------------------------------

    @initialize()
    def started(self):
        self.store.clean()

    # Where the process dies: at the k-th sync or fault point of the step (a step has up to 12);
    # a power loss also empties the files whose bytes were not synced.
    dies_at = st.integers(0, 12)

    def _receive(self, names: set[str]) -> None:
        """A push received and adopted as the next version (as a push's commit does first)."""
        self.counter += 1
        value = self.counter
        version = self.store.current_version() + 1
        spool = self.store.spool()
        spool.add({n: tensor(value) for n in sorted(names)})
        spool.flush()
        files = self.store.adopt(spool.dir, spool.files, version)
        self.pending = (version, files, {n: crc32_of(tensor(value)) for n in names}, {n: value for n in names})

    def _commit(self) -> None:
        version, files, crc, pushed = self.pending
        self.values[version] = {**self.values[version - 1], **pushed}
        self.attempted = version
        self.store.commit(version, files, crc, f"step {version}")
        self.reported, self.attempted, self.pending = version, None, None
        self.seen["commits reported"] += 1

    @precondition(lambda self: self.store is not None and self.pending is None)
    @rule(names=st.sets(st.sampled_from(NAMES), min_size=1))
    def receive(self, names):
        self._receive(names)

    @precondition(lambda self: self.store is not None and self.pending is None)
    @rule(names=st.sets(st.sampled_from(NAMES), min_size=1), at=dies_at, power_loss=st.booleans())
    def receive_and_die(self, names, at, power_loss):
        self._arm(at, power_loss)
        self._dies(lambda: self._receive(names))

    @precondition(lambda self: self.store is not None and self.pending is not None)
    @rule()
    def commit(self):
        self._commit()

    @precondition(lambda self: self.store is not None and self.pending is not None)
    @rule(at=dies_at, power_loss=st.booleans())
    def commit_and_die(self, at, power_loss):
        self._arm(at, power_loss)
        self._dies(self._commit)

    @precondition(lambda self: self.store is not None and self.pending is not None)
    @rule()
    def fail_before_commit(self):
        """A push that failed before its commit (refused, cut off): its files are discarded."""
        self.store.discard(self.pending[1])
        self.pending = None

    @precondition(lambda self: self.store is not None and self.pending is None)
    @rule()
    def clean(self):
        """What an ingress does once no push runs."""
        self.store.clean()

    @precondition(lambda self: self.store is not None and self.pending is None)
    @rule(at=dies_at, power_loss=st.booleans())
    def clean_and_die(self, at, power_loss):
        self._arm(at, power_loss)
        self._dies(self.store.clean)

    @rule(keep=st.integers(2, 5))
    def restart(self, keep):
        """The server started again (after a crash, or stopped), maybe with another keep."""
        self.store, self.pending, self.keep = VersionStore(self.root, keep), None, keep
        self.store.check()  # what open_store refuses a torn store with
        self.store.clean()
        current = self.store.current_version()
        self.seen["restarts"] += 1
        if self.attempted is not None and current == self.attempted:
            self.reported = current  # the commit the process died in had passed its commit point
            self.seen["commits cut off after their commit point, kept"] += 1
        self.attempted = None
        assert not any(self.store.incoming.iterdir())
        assert not [d for d in self.root.glob("v*") if int(d.name[1:7]) > current]

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def current_is_complete_and_nothing_reported_is_lost(self):
        store = VersionStore(self.root, self.keep)  # the disk as a restart finds it
        store.check()
        current = store.current_version()
        assert current in {self.reported, self.attempted}, (current, self.reported, self.attempted)
        manifest = store.current()
        if manifest is not None:
            store.verify(manifest)
            assert {n: t.crc32 for n, t in manifest.tensors.items()} == {n: crc32_of(tensor(v)) for n, v in self.values[current].items()}

    @invariant()
    def the_kept_versions_verify(self):
        store = VersionStore(self.root, self.keep)
        current = store.current_version()
        for version in range(max(1, current - self.keep + 1), current):
            try:
                store.verify(store.manifest(version))
            except FileNotFoundError:  # deleted under a smaller keep before: skipped
                pass


@pytest.mark.reliability("fuzz")
def test_the_store_keeps_every_reported_commit_through_crashes_and_restarts(record_property):
    """Random sequences of pushes, commits, kills and power losses at any sync or fault point,
    restarts with another keep and cleans on the weight store alone: CURRENT always names a
    complete version that verifies, and no reported commit is lost."""
    StoreMachine.seen.clear()
    run_state_machine_as_test(StoreMachine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    ))
    record_property("sequences", EXAMPLES)
    for what, n in sorted(StoreMachine.seen.items()):
        record_property(what, n)
    assert StoreMachine.seen["kills"] and StoreMachine.seen["power losses"]  # it crashed, both ways
