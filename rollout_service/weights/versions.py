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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import time
import typing
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors
import torch

from rollout_service.errors import ConfigError, Conflict, DataLoss, StorageFull, StorageUnavailable
from rollout_service.weights.store import safetensors_header

if typing.TYPE_CHECKING:
    from rollout_service.config import ServerConfig

log = logging.getLogger(__name__)

# Bytes read from the start and the end of each shard's tensor data for a checkpoint's identity.
IDENTITY_SAMPLE = 1 << 16


@dataclass(frozen=True)
class StoredTensor:
    file: str  # relative to the store root
    dtype: str
    shape: list[int]
    crc32: int


@dataclass(frozen=True)
class Manifest:
    version: int
    label: str
    created: float
    tensors: dict[str, StoredTensor]
    # The fencing token of the push lock it was committed under (Serve); a single-process server's
    # commits carry the last one on (0 before any).
    fence: int = 0

    def files(self, root: Path) -> dict[str, Path]:
        return {name: root / t.file for name, t in self.tensors.items()}


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


def store_root(config: ServerConfig, identity: str | None = None) -> Path:
    """`weights_dir`, or by default one directory per base checkpoint under <cache_dir>/weights."""
    if config.weights_dir is not None:
        return config.weights_dir
    identity = identity or base_identity(config.model)
    return config.cache_dir / "weights" / f"{config.model.resolve().name}-{identity}"


def open_store(config: ServerConfig, *, shared: bool) -> VersionStore:
    """The weight store of `config`, bound to its model's checkpoint and locked (`shared` by the
    processes of a Serve deployment, else held alone)."""
    identity = base_identity(config.model)
    store = VersionStore(store_root(config, identity), config.keep_versions)
    store.bind(identity, config.model)
    store.lock(shared=shared)
    return store


class VersionStore:
    def __init__(self, root: Path, keep: int, temporary: bool = False):
        self.root = root
        self.keep = keep
        self.temporary = temporary  # deleted by close()
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        # lockf excludes other processes, not this one's threads: one lock per store directory.
        self._commit_lock = _COMMIT_LOCKS.setdefault(root.resolve(), threading.Lock())

    def bind(self, identity: str, model: Path) -> None:
        """Record the base checkpoint of a new store; refuse one whose versions overlay another."""
        path = self.root / "BASE.json"
        try:
            recorded = json.loads(path.read_text())
        except FileNotFoundError:
            if self.current_version():
                log.warning("weights_dir %s holds versions but no record of their checkpoint: taking them as %s's", self.root, model)
            _write_atomic(path, json.dumps({"identity": identity, "model": str(model.resolve())}))
            return
        if recorded["identity"] != identity:
            raise ConfigError(
                f"weights_dir {self.root}: its versions were pushed onto {recorded['model']} (identity "
                f"{recorded['identity']}), not onto {model} (identity {identity}); give another --weights-dir, "
                f"or delete {self.root} to start from the checkpoint"
            )

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
        return self.root / f"v{version:06d}"

    def current_version(self) -> int:
        try:
            return int((self.root / "CURRENT").read_text())
        except FileNotFoundError:
            return 0

    def manifest(self, version: int) -> Manifest | None:
        """Version `version`'s manifest (None for 0, the base checkpoint)."""
        if version == 0:
            return None
        raw = json.loads((self._dir(version) / "manifest.json").read_text())
        raw["tensors"] = {n: StoredTensor(**t) for n, t in raw["tensors"].items()}
        return Manifest(**raw)

    def current(self) -> Manifest | None:
        return self.manifest(self.current_version())

    def manifest_path(self, version: int) -> str:
        return str(self._dir(version) / "manifest.json") if version else ""

    def adopt(self, staged: Path, files: dict[str, Path], version: int) -> dict[str, Path]:
        """Move a received push's directory into the store as a candidate for `version`, under a
        name of its own (`v000003-push-<id>`); it is part of the store once committed."""
        target = self.root / f"{self._dir(version).name}-{staged.name}"
        os.replace(staged, target)
        return {name: target / path.name for name, path in files.items()}

    def commit(
        self, version: int, files: dict[str, Path], crc32: dict[str, int], label: str, fence: int | None = None
    ) -> Manifest:
        """Make `version` (tensors `files`, adopted) the current one, if the current one is still
        `version - 1` and `fence` (the push lock's token; None: a single-process server, which holds
        the store alone) is the newest issued (`raise_fence`); else Conflict, and nothing is written."""
        with self._committing():
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
            tensors = dict(previous.tensors) if previous else {}
            headers = {path: safetensors_header(path) for path in set(files.values())}
            for name, path in files.items():
                info = headers[path][name]
                tensors[name] = StoredTensor(str(path.relative_to(self.root)), info["dtype"], info["shape"], crc32[name])
            manifest = Manifest(version, label, time.time(), tensors, last_fence if fence is None else fence)
            body = {**asdict(manifest), "tensors": {n: asdict(t) for n, t in tensors.items()}}
            self._dir(version).mkdir(exist_ok=True)
            _write_atomic(self._dir(version) / "manifest.json", json.dumps(body, indent=1))
            _write_atomic(self.root / "CURRENT", str(version))
            self._collect()
        return manifest

    def fence_mark(self) -> int:
        """The newest fencing token a push began under (0 before any)."""
        try:
            return int((self.root / "FENCE").read_text())
        except FileNotFoundError:
            current = self.current()  # a store written before FENCE existed
            return current.fence if current else 0

    def raise_fence(self, token: int) -> None:
        """Record that a push holds the lock with fencing token `token`: from now on a push under an
        older token commits nothing."""
        with self._committing():
            if token > self.fence_mark():
                _write_atomic(self.root / "FENCE", str(token))

    @contextlib.contextmanager
    def _committing(self):
        with self._commit_lock, open(self.root / "COMMIT.lock", "a") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX)
            yield

    def discard(self, files: dict[str, Path]) -> None:
        """Delete an adopted push that did not commit."""
        for d in {path.parent for path in files.values()}:
            shutil.rmtree(d, ignore_errors=True)

    def verify(self, manifest: Manifest) -> None:
        """Raise DataLoss naming the first stored tensor whose bytes do not match its CRC-32."""
        for name, t in manifest.tensors.items():
            with safetensors.safe_open(str(self.root / t.file), "pt") as f:
                crc = crc32_of(f.get_tensor(name))
            if crc != t.crc32:
                raise DataLoss(f"weight store: {name} in {t.file} has CRC-32 {crc:#010x}, the manifest says {t.crc32:#010x}")

    def clean(self) -> None:
        """Drop what no committed version refers to: interrupted pushes and uncommitted versions.
        Only while no push can be running (a single-process server starting; an ingress holding
        the push lock): a running push's files would go too."""
        for d in self.incoming.iterdir():
            shutil.rmtree(d, ignore_errors=True)
        self._collect(running=False)

    def _collect(self, running: bool = True) -> None:
        """Delete the versions older than the last `keep` and what only they refer to; with
        `running`, keep the candidates of later versions (a push in flight may be preparing them)."""
        current = self.current_version()
        kept = [v for v in range(max(1, current - self.keep + 1), current + 1)]
        live = {self._dir(v) for v in kept}
        for v in kept:
            m = self.manifest(v)
            live |= {(self.root / t.file).parent for t in m.tensors.values()} if m else set()
        for d in self.root.glob("v*"):
            candidate = "-" in d.name  # v000004-push-*: adopted, maybe not committed yet
            if running and candidate and int(d.name[1:7]) > current:
                continue
            if d.is_dir() and d not in live:
                shutil.rmtree(d, ignore_errors=True)


_COMMIT_LOCKS: dict[Path, threading.Lock] = {}


def _write_atomic(path: Path, text: str) -> None:
    # A temporary name of this writer's own: the ingress and the replicas bind a new store at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
