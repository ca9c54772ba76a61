"""The weight store: every committed version on disk, the source late replicas load from.

    <weights-dir>/CURRENT                 the current version number (replaced atomically)
    <weights-dir>/v000003/manifest.json   version, label, time, fencing token, and every tensor
                                          pushed since the base checkpoint: name -> file, dtype, shape, CRC-32
    <weights-dir>/v000003-push-*/part-*.safetensors   the tensors pushed in version 3 (a store
                                          written before fencing keeps them in v000003/)
    <weights-dir>/incoming/push-*/        a push being received (deleted if it fails)
    <weights-dir>/FENCE                   the newest fencing token issued to a push (Serve)
    <weights-dir>/BASE.json               the checkpoint the versions were pushed onto (identity)
    <weights-dir>/LOCK                    locked while a server uses the store: alone by a
                                          single-process server, shared by a Serve deployment's processes

A version's manifest lists the tensors of every push so far (a push may carry any subset), each
pointing at the version directory that holds its newest bytes; tensors never pushed come from the
checkpoint the service started from. The last `keep` versions are kept, with every directory their
manifests point into; older ones are deleted. A version directory without a manifest is a push
that never committed. Writing the manifest, then CURRENT, is the commit point.

A commit is compare-and-set, under a lock on the store: version N+1 commits only onto N, and (in a
Serve deployment) only with the newest fencing token: each push records the token of its push lock
in FENCE as it begins (`raise_fence`), and a commit under an older token is refused. So a push whose
lock lapsed while it ran (paused, cut off from Redis) commits nothing once another push has begun,
even when it reaches the commit after its last lock check; and each push's tensors go into a
directory of its own, which only `clean` (run when no push can be running) and a commit of a later
version delete, so no push can overwrite or delete another's.

A store belongs to one base checkpoint: its versions overlay that checkpoint's tensors, so it is
refused to a server loading another (`bind`); the default directory is one per checkpoint.

Durability (weights/durable.py): each shard is synced as it is written (on the push's conversion
thread, `spool`); the commit syncs the shards' directories, the manifest and the store's directory,
then renames CURRENT (the commit point) and syncs the directory again; only then are old versions
deleted, each one's manifest before its files, so a crash part-way leaves no manifest naming
deleted shards. Nothing after the commit point undoes it: an error there is logged, the version
stands. A store that a power loss left torn (an empty or truncated CURRENT, manifest or shard) is
refused at start (`open_store`) with the file named; `rollout-service store verify` and
`store repair` (weights/repair.py) check it and roll it back to its newest complete version.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
import typing
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors
import torch

from rollout_service import faults
from rollout_service.errors import ConfigError, Conflict, DataLoss, StorageFull, StorageUnavailable
from rollout_service.weights import durable, staging
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.store import safetensors_header

if typing.TYPE_CHECKING:
    from rollout_service.config import ServerConfig

log = logging.getLogger(__name__)

# Bytes per element of safetensors' dtypes (the store's sizes; progress of a verify).
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

# Bytes read from the start and the end of each shard's tensor data for a checkpoint's identity.
IDENTITY_SAMPLE = 1 << 16


@dataclass(frozen=True)
class StoredTensor:
    file: str  # relative to the store root
    dtype: str  # safetensors' name
    shape: list[int]
    crc32: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 1)


@dataclass(frozen=True)
class Manifest:
    version: int
    label: str
    created: float
    tensors: dict[str, StoredTensor]
    # The fencing token of the push lock it was committed under; a commit without one (the store's
    # own tools) carries the last one on (0 before any).
    fence: int = 0

    def files(self, root: Path) -> dict[str, Path]:
        return {name: root / t.file for name, t in self.tensors.items()}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "tensors": {n: asdict(t) for n, t in self.tensors.items()}}, indent=1)


def crc32_of(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


@contextlib.contextmanager
def storage_errors():
    """A push's disk writes failing for want of space or of write access (the weight store on a
    full or read-only disk) as the typed errors a client is told: the push is refused."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"no space left on the disk of the weight store{where}: the push is refused") from exc
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
            raise StorageUnavailable(f"the weight store cannot be written{where}: {exc.strerror}; the push is refused") from exc
        raise


def base_identity(model: Path) -> str:
    """What ties a weight store to the checkpoint its versions overlay: config.json, every shard's
    header (names, dtypes, shapes) and size, and a sample of its bytes at both ends (two fine-tunes
    of one architecture differ there). Not paths or mtimes: a copied checkpoint is the same base."""
    h = hashlib.sha256((model / "config.json").read_bytes())
    for shard in sorted(model.glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as fh:
            (header_bytes,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(header_bytes))
            data = 8 + header_bytes
            h.update(fh.read(IDENTITY_SAMPLE))
            fh.seek(max(data, size - IDENTITY_SAMPLE))
            h.update(fh.read(IDENTITY_SAMPLE))
        h.update(f"{shard.name}:{size}".encode())
    return h.hexdigest()[:16]


def store_root(config: ServerConfig, identity: str | None = None) -> Path | str:
    """`weights_dir` (a directory, or an object store's URL), or by default one directory per base
    checkpoint under <cache_dir>/weights."""
    if config.weights_dir is not None:
        return config.weights_dir if is_url(config.weights_dir) else Path(config.weights_dir)
    identity = identity or base_identity(config.model)
    return config.cache_dir / "weights" / f"{config.model.resolve().name}-{identity}"


def is_url(weights_dir: str | Path) -> bool:
    """Whether a weights_dir names an object store (s3://bucket/prefix) rather than a directory."""
    return "://" in str(weights_dir)


def open_store(config: ServerConfig, *, shared: bool) -> VersionStore:
    """The weight store of `config`, bound to its model's checkpoint, locked (`shared` by the
    processes of a Serve deployment, else held alone) and checked whole (`check`): a torn store
    is refused with ConfigError naming the file and how to repair it."""
    identity = base_identity(config.model)
    root = store_root(config, identity)
    if isinstance(root, str):
        from rollout_service.weights.object_store import ObjectVersionStore  # s3fs only where a URL is given

        store: VersionStore = ObjectVersionStore(root, config.keep_versions, config.staging_root)
    else:
        store = VersionStore(root, config.keep_versions)
    try:
        store.bind(identity, config.model)
        store.lock(shared=shared)
        store.check()
    except DataLoss as exc:
        store.close()
        if isinstance(root, str):  # objects are written whole: only a hand outside the service tears them
            raise ConfigError(
                f"{exc}. The object store's current version is damaged (an object deleted or changed outside the "
                f"service): restore it, or give another --weights-dir (or delete {root}) to start from the checkpoint"
            ) from None
        raise ConfigError(
            f"{exc}. A crash or power loss left the weight store torn: run `rollout-service store verify {store.root}` "
            f"to see what is damaged, then (with every server on it stopped) `rollout-service store repair "
            f"{store.root}` to roll it back to its newest complete version"
        ) from None
    except BaseException:
        store.close()
        raise
    return store


class VersionStore:
    """The store in a local directory (see the module docstring). Where the bytes live and what
    makes the commit atomic are its storage primitives (the methods under "storage" below);
    weights/object_store.py overrides them for an object store, everything else is shared."""

    # Whether a manifest after CURRENT may be a commit in progress (else only a crash's left-over).
    _manifests_in_flight = False

    def __init__(self, root: Path, keep: int, temporary: bool = False):
        self.root = root
        self.keep = keep
        self.temporary = temporary  # deleted by close()
        # A temporary store is deleted at stop: nothing in it has to survive a power loss, so its
        # writes are not synced (a push to a single-process server without --weights-dir).
        self.durable = not temporary
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        # lockf excludes other processes, not this one's threads: one lock per store directory.
        self._commit_lock = _COMMIT_LOCKS.setdefault(root.resolve(), threading.Lock())

    def bind(self, identity: str, model: Path) -> None:
        """Record the base checkpoint of a new store; refuse one whose versions overlay another."""
        try:
            recorded = self.base()
        except FileNotFoundError:
            if self.current_version():
                log.warning("weights_dir %s holds versions but no record of their checkpoint: taking them as %s's", self.root, model)
            self._write_record("BASE.json", json.dumps({"identity": identity, "model": str(model.resolve())}))
            return
        if recorded["identity"] != identity:
            raise ConfigError(
                f"weights_dir {self.root}: its versions were pushed onto {recorded['model']} (identity "
                f"{recorded['identity']}), not onto {model} (identity {identity}); give another --weights-dir, "
                f"or delete {self.root} to start from the checkpoint"
            )

    def base(self) -> dict:
        """BASE.json: the checkpoint's identity and path (FileNotFoundError before `bind`)."""
        text = self._read("BASE.json")
        try:
            recorded = json.loads(text)
            recorded["identity"], recorded["model"]
        except (ValueError, TypeError, KeyError):
            raise DataLoss(f"weight store {self._where('BASE.json')}: {_shown(text)} is not the record of a checkpoint") from None
        return recorded

    def lock(self, shared: bool = False) -> None:
        """Lock the store while this process lives: alone (a single-process server: a second
        server on it would number its pushes over the first's) or `shared` (a Serve deployment's
        ingress and replicas, whose pushes the coordinator's push lock orders)."""
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # lockf, not flock: a POSIX lock is this process's own, so vLLM's engine process, forked
            # from it, does not inherit it and cannot hold it after this process was killed.
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. a filesystem without locks
                log.warning("weights_dir %s cannot be locked (%s): a second server on it is not detected", self.root, exc)
                return
            holder = "a single-process server, which holds it alone" if shared else "another running server"
            raise ConfigError(f"weights_dir {self.root} is in use by {holder}; give each server its own --weights-dir") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock; delete a temporary store."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def _dir(self, version: int) -> Path:
        return self.root / version_name(version)

    def current_version(self) -> int:
        """The committed version CURRENT names (0: none yet, the base checkpoint); DataLoss if a
        crash left CURRENT torn (empty, or not a number)."""
        try:
            text = self._read("CURRENT")
        except FileNotFoundError:
            return 0
        if not text.strip().isdigit():
            raise DataLoss(f"weight store {self._where('CURRENT')}: {_shown(text)} is not a version number")
        return int(text)

    def manifest(self, version: int) -> Manifest | None:
        """Version `version`'s manifest (None for 0, the base checkpoint); FileNotFoundError for a
        version not kept, DataLoss for a manifest a crash left torn (empty, truncated)."""
        if version == 0:
            return None
        name = f"{version_name(version)}/manifest.json"
        text = self._read(name)
        try:
            raw = json.loads(text)
            raw["tensors"] = {n: StoredTensor(**t) for n, t in raw["tensors"].items()}
            manifest = Manifest(**raw)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise DataLoss(f"weight store {self._where(name)}: not a complete manifest ({len(text)} bytes: {_shown(text)})") from None
        if manifest.version != version:
            raise DataLoss(f"weight store {self._where(name)}: it names version {manifest.version}, not {version}")
        return manifest

    def current(self) -> Manifest | None:
        return self.manifest(self.current_version())

    def manifest_path(self, version: int) -> str:
        return self._where(f"{version_name(version)}/manifest.json") if version else ""

    def spool(self) -> ShardWriter:
        """Where a push's shards are written as it is received: in incoming/, each shard synced to
        the disk as it is written (on the conversion thread, off the receive path), so that the
        commit waits for the sync of the last one only."""
        return ShardWriter(self.incoming, staging.PART_BYTES, durable=self.durable)

    def adopt(self, staged: Path, files: dict[str, Path], version: int) -> dict[str, Path]:
        """Move a received push's directory (a `spool`'s) into the store as a candidate for
        `version`, under a name of its own (`v000003-push-<id>`); it is part of the store once
        committed (which syncs the rename)."""
        target = self.root / f"{self._dir(version).name}-{staged.name}"
        os.replace(staged, target)
        faults.fault_point("store.commit.after_adopt")
        return {name: target / path.name for name, path in files.items()}

    def commit(
        self, version: int, files: dict[str, Path], crc32: dict[str, int], label: str, fence: int | None = None,
        warnings: list[str] | None = None, delete_old: bool = True, base: int | None = None,
    ) -> Manifest:
        """Make `version` (tensors `files`, adopted from a `spool`, over those of version `base`,
        by default the current one: weights/rollback.py names an older one) the current one, if the current
        one is still `version - 1` and `fence` (the push lock's token; None: a caller that holds the
        store alone, as the store's own tools do) is the newest issued (`raise_fence`); else
        Conflict, and nothing is written. Raises only before its commit point (CURRENT renamed):
        whatever fails after it is logged and appended to `warnings` (the push reports them), and
        the version stands. Then the versions beyond `keep` are deleted, unless `delete_old` is
        False (a push does it after its apply: `delete_old_versions`)."""
        with self._committing():
            manifest = self._next(version, files, crc32, label, fence, base)
            self._write_manifest(manifest, files)
            faults.fault_point("store.commit.after_manifest")
            self._point_current(version, manifest.fence)
            try:
                self._sync_commit()
                faults.fault_point("store.commit.after_current")
                if delete_old:
                    self._collect()
            except Exception as exc:  # reported, not raised: a caller would take it as "nothing committed"
                self._after_commit_failed(version, exc, warnings)
        return manifest

    def delete_old_versions(self, version: int, warnings: list[str] | None = None) -> None:
        """After committed `version` was applied: delete the versions beyond `keep` and what only
        they refer to. A failure is logged and appended to `warnings`, never raised (the version
        stands)."""
        with self._committing():
            try:
                self._collect()
            except Exception as exc:
                self._after_commit_failed(version, exc, warnings)

    def _after_commit_failed(self, version: int, exc: Exception, warnings: list[str] | None) -> None:
        log.error(
            "weight store %s: version %d is committed (CURRENT names it), but what follows the commit "
            "failed; the version stands. Check the store with `rollout-service store verify %s`",
            self.root, version, self.root, exc_info=exc,
        )
        if warnings is not None:
            warnings.append(
                f"version {version} is committed, but the weight store failed after the commit ({exc}): it may not "
                f"survive a power loss, and older versions may be left; check it with `rollout-service store verify "
                f"{self.root}`"
            )

    def _next(
        self, version: int, files: dict[str, Path], crc32: dict[str, int], label: str, fence: int | None, base: int | None,
    ) -> Manifest:
        """The manifest of `version`: the tensors of `base` (None: the current one) overlaid with
        `files` (see `commit`)."""
        current = self.current_version()
        if current != version - 1:
            raise Conflict(
                f"weight store {self.root}: version {current} was committed while this push ran (it was to "
                f"be version {version}, onto {version - 1}); nothing was committed: push again"
            )
        previous = self.manifest(current)
        last_fence = previous.fence if previous else 0
        if fence is not None and fence < (newest := self.fence_mark()):
            raise Conflict(
                f"weight store {self.root}: this push's lock (fencing token {fence}) lapsed while it ran and "
                f"a newer push (token {newest}) has begun; nothing was committed: push again"
            )
        under = previous if base is None else self.manifest(base)
        tensors = dict(under.tensors) if under else {}
        headers = {path: safetensors_header(path) for path in set(files.values())}
        for name, path in files.items():
            info = headers[path][name]
            tensors[name] = StoredTensor(self._rel(path), info["dtype"], info["shape"], crc32[name])
        return Manifest(version, label, time.time(), tensors, last_fence if fence is None else fence)

    def _point_current(self, version: int, fence: int) -> None:
        """Rename a synced CURRENT naming `version` into place: the commit point. Failing before
        the rename, it removes the version's manifest (never committed)."""
        pointer = self.root / "CURRENT"
        tmp = durable.temp_name(pointer)
        try:
            durable.write_synced(tmp, str(version), self.durable)
            os.replace(tmp, pointer)
        except BaseException:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(self._dir(version), ignore_errors=True)
            raise

    def _write_manifest(self, manifest: Manifest, files: dict[str, Path]) -> None:
        """Everything `manifest`'s version is made of, on the disk before CURRENT may name it: its
        shards (synced as their spool wrote them) and their directories' entries, the manifest,
        and the store directory's entries (the adopted directories, the version's directory).
        Whatever fails here leaves no manifest behind: the version was never committed."""
        directory = self._dir(manifest.version)
        directory.mkdir(exist_ok=True)
        try:
            for shards in sorted({path.parent for path in files.values()}):
                durable.fsync_dir(shards, self.durable)
            durable.write_durably(directory / "manifest.json", manifest.to_json(), self.durable)
            durable.fsync_dir(self.root, self.durable)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def holds(self, version: int, files: dict[str, Path]) -> bool:
        """Whether `version` is committed with the tensors in `files` (a push's own): for a push
        whose commit raised, to tell "nothing committed" (its files may go) from a version that
        stands. Raises when the store cannot be read: then nobody knows, and nothing may go."""
        if self.current_version() < version:
            return False
        try:
            manifest = self.manifest(version)
        except FileNotFoundError:
            return False
        ours = {self._rel(path) for path in files.values()}
        return any(t.file in ours for t in manifest.tensors.values())

    def fence_mark(self) -> int:
        """The newest fencing token a push began under (0 before any)."""
        try:
            text = self._read("FENCE")
        except FileNotFoundError:
            current = self.current()  # a store written before FENCE existed
            return current.fence if current else 0
        if not text.strip().isdigit():
            raise DataLoss(f"weight store {self._where('FENCE')}: {_shown(text)} is not a fencing token")
        return int(text)

    def raise_fence(self, token: int) -> None:
        """Record that a push holds the lock with fencing token `token`: from now on a push under an
        older token commits nothing."""
        with self._committing():
            if token > self.fence_mark():
                self._write_record("FENCE", str(token))

    @contextlib.contextmanager
    def _committing(self):
        with self._commit_lock, open(self.root / "COMMIT.lock", "a") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            yield

    def discard(self, files: dict[str, Path]) -> None:
        """Delete an adopted push that did not commit."""
        for d in {path.parent for path in files.values()}:
            shutil.rmtree(d, ignore_errors=True)

    def verify(self, manifest: Manifest, progress: Callable[[int], None] | None = None) -> None:
        """Raise DataLoss naming the first stored tensor that is missing or whose bytes do not
        match its CRC-32; `progress` is given the bytes of each tensor checked."""
        for name, t in manifest.tensors.items():
            problem = self.tensor_problem(name, t)
            if problem is not None:
                raise DataLoss(f"weight store {self._where(t.file)}: {problem} (a tensor of version {manifest.version})")
            if progress is not None:
                progress(t.nbytes)

    def tensor_problem(self, name: str, t: StoredTensor, path: Path | None = None) -> str | None:
        """What is wrong with stored tensor `name` (in the store, or in its copy at `path`): it
        cannot be read, or its bytes do not match its CRC-32; None when it is whole."""
        try:
            with safetensors.safe_open(str(path or self.root / t.file), "pt") as f:
                tensor = f.get_tensor(name)
        except Exception as exc:  # missing, truncated, not safetensors: safetensors' own errors
            return f"{name} cannot be read ({exc})"
        crc = crc32_of(tensor)
        if crc != t.crc32:
            return f"{name} has CRC-32 {crc:#010x}, the manifest says {t.crc32:#010x}"
        return None

    def check(self) -> None:
        """What a server checks as it opens the store: CURRENT, FENCE and BASE.json readable, the
        current version's manifest complete, and each of its shards whole (its header and every
        tensor's bytes present, dtype and shape as the manifest says: what a power loss tears);
        DataLoss naming the first file that is not. (The bytes' CRC-32s are checked as the version
        loads.) Versions a push may commit meanwhile (a Serve deployment) are read again."""
        for _ in range(3):
            version = self.current_version()
            try:
                self.check_files(self.manifest(version))
                break
            except (FileNotFoundError, DataLoss) as exc:
                if self.current_version() != version:  # a commit moved CURRENT on meanwhile: look again
                    continue
                if isinstance(exc, FileNotFoundError):
                    raise DataLoss(f"weight store {exc.filename}: missing, and CURRENT names version {version}") from None
                raise
        self.fence_mark()
        with contextlib.suppress(FileNotFoundError):
            self.base()

    def check_files(self, manifest: Manifest | None) -> None:
        """Each shard `manifest` names is whole (see `check`); DataLoss naming the first that is not."""
        if manifest is None:
            return
        by_file: dict[str, dict[str, StoredTensor]] = {}
        for name, t in manifest.tensors.items():
            by_file.setdefault(t.file, {})[name] = t
        for file, tensors in by_file.items():
            try:
                with self._open_shard(file) as (fh, size):
                    problem = _shard_problem(fh, size, tensors)
            except FileNotFoundError:
                problem = "missing"
            if problem:
                raise DataLoss(f"weight store {self._where(file)}: {problem} (a shard of version {manifest.version})")

    def clean(self) -> None:
        """Drop what no committed version refers to: interrupted pushes and uncommitted versions.
        Only while no push can be running (a single-process server starting; an ingress holding
        the push lock): a running push's files would go too."""
        for d in self.incoming.iterdir():
            shutil.rmtree(d, ignore_errors=True)
        for tmp in [*self.root.glob(".CURRENT.*.tmp"), *self.root.glob(".FENCE.*.tmp")]:  # written by pushes only
            with contextlib.suppress(OSError):  # best effort: a read-only store still opens
                tmp.unlink()  # a writer killed before its rename
        self._collect(running=False)

    def _window(self, current: int) -> range:
        """The versions the store keeps when `current` is committed, newest first (0, the
        checkpoint, is not one)."""
        return range(current, max(0, current - self.keep), -1)

    def kept(self) -> list[Manifest]:
        """The manifests of the committed versions this store keeps, newest first; a version of the
        window deleted while the store kept fewer is skipped."""
        manifests = []
        for version in self._window(self.current_version()):
            with contextlib.suppress(FileNotFoundError):
                manifests.append(self.manifest(version))
        return manifests

    def _collect(self, running: bool = True) -> None:
        """Delete the versions older than the last `keep` and what only they refer to; with
        `running`, keep the candidates of later versions (a push in flight may be preparing them).
        Versions of the window already deleted (kept under a smaller `keep` before) are skipped; if
        a manifest in the window cannot be read, nothing is deleted (what it refers to is unknown)."""
        current = self.current_version()
        live = set()
        for v in self._window(current):
            try:
                m = self.manifest(v)
            except FileNotFoundError:
                continue
            except DataLoss as exc:
                log.error("%s: deleting no old version until it is repaired (`rollout-service store repair %s`)", exc, self.root)
                return
            live |= {version_name(v)} | {t.file.split("/")[0] for t in m.tensors.values()}
        doomed = []
        for d in self._version_dirs():
            # v000004-push-*: adopted, maybe not committed yet; and on an object store v000004/ too (a
            # manifest is created before CURRENT is swapped, with no lock held).
            candidate = "-" in d or self._manifests_in_flight
            if running and candidate and int(d[1:7]) > current:
                continue
            if d not in live:
                doomed.append(d)
        # Manifests first, each removal synced: a crash (or a power loss) part-way must not leave
        # a manifest naming shards that are gone.
        for d in doomed:
            self._remove_manifest(d)
        for d in doomed:
            self._remove_dir(d)
            faults.fault_point("store.collect")

    # ---- reading a version on this machine ------------------------------------------------------

    def shard(self, file: str, scratch: Path) -> Path:
        """A path on this machine holding stored shard `file` (relative to the store): here, the
        store's own (`scratch` is for stores elsewhere, which copy it there)."""
        return self.root / file

    def local_files(self, manifest: Manifest, scratch: Path) -> dict[str, Path]:
        """Version `manifest`'s tensors (name -> a file on this machine), each checked against its
        CRC-32 (DataLoss naming the first that is not whole): here, the store's own shards, checked
        in place; a store elsewhere copies them into `scratch` (the caller deletes it)."""
        self.verify(manifest)
        return manifest.files(self.root)

    # ---- storage: where the bytes live, what makes a commit atomic (overridden for object stores) --

    def _where(self, name: str) -> str:
        """Where stored object `name` (relative to the store) lives, for messages."""
        return str(self.root / name)

    def _rel(self, path: Path) -> str:
        """The name in the store of an adopted file (`adopt`'s)."""
        return str(path.relative_to(self.root))

    def _read(self, name: str) -> str:
        """Stored object `name`'s text; FileNotFoundError (its filename the path) when absent."""
        return (self.root / name).read_text()

    def _write_record(self, name: str, text: str) -> None:
        """Replace a small record (BASE.json, FENCE) whole."""
        durable.write_durably(self.root / name, text, self.durable)

    @contextlib.contextmanager
    def _open_shard(self, file: str):
        """A stored shard opened for reading, and its size; FileNotFoundError when absent."""
        path = self.root / file
        with open(path, "rb") as fh:
            yield fh, os.fstat(fh.fileno()).st_size

    def _sync_commit(self) -> None:
        """After the commit point: the store directory's entries on the disk."""
        durable.fsync_dir(self.root, self.durable)

    def _version_dirs(self) -> list[str]:
        """The names of the version and push directories (v000003, v000003-push-*), sorted."""
        return [d.name for d in sorted(self.root.glob("v*")) if d.is_dir()]

    def _remove_manifest(self, d: str) -> None:
        manifest = self.root / d / "manifest.json"
        if manifest.exists():
            manifest.unlink()
            durable.fsync_dir(manifest.parent, self.durable)

    def _remove_dir(self, d: str) -> None:
        shutil.rmtree(self.root / d, ignore_errors=True)


_COMMIT_LOCKS: dict[Path, threading.Lock] = {}


def _shown(text: str) -> str:
    """A file's content in an error message: short, and saying so when empty."""
    return "empty" if not text else repr(text[:40] + ("..." if len(text) > 40 else ""))


def version_name(version: int) -> str:
    """The directory (or key prefix) of a version: v000003."""
    return f"v{version:06d}"


def _shard_problem(fh: typing.BinaryIO, size: int, tensors: dict[str, StoredTensor]) -> str | None:
    """What makes the safetensors file open as `fh` (`size` bytes) unable to hold `tensors` whole, or None."""
    try:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, not even a header)"
        (header_bytes,) = struct.unpack("<Q", head)
        if 8 + header_bytes > size:
            return f"truncated ({size} bytes, its header alone takes {8 + header_bytes})"
        header = json.loads(fh.read(header_bytes))
    except (ValueError, UnicodeDecodeError):
        return "its header is not safetensors JSON"
    for name, t in tensors.items():
        info = header.get(name)
        if not isinstance(info, dict):
            return f"{name} is not in it"
        if info.get("dtype") != t.dtype or info.get("shape") != t.shape:
            return f"{name} is {info.get('dtype')} {info.get('shape')} in it, the manifest says {t.dtype} {t.shape}"
        end = 8 + header_bytes + info["data_offsets"][1]
        if end > size:
            return f"truncated ({size} bytes; {name} ends at byte {end})"
    return None
