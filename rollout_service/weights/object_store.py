"""The weight store on an object store (weights_dir s3://bucket/prefix): the layout and protocol of
weights/versions.py, whose storage primitives this class gives on S3 (s3fs), with one difference,
CURRENT:

    <url>/CURRENT                     {"version": 3, "fence": 17, "write": <id>}: the commit point
    <url>/v000003/manifest.json       as in a directory; created only where none is (If-None-Match)
    <url>/v000003-push-*/part-*.safetensors   a push's shards: immutable, uploaded before the manifest
    <url>/BASE.json                   the checkpoint the versions overlay (identity)

The commit is compare-and-set. A directory store renames CURRENT under a lock; an object store has
no lock, so the current version and the newest fencing token share one small object, CURRENT,
which is only ever replaced by a conditional PutObject: If-Match its ETag (If-None-Match: * while
there is none). `raise_fence` reads it and writes it back with the higher token; a commit of
version N under token F reads it (N-1 and mark M, ETag E), refuses unless N-1 is current and F >= M,
uploads the shards, creates vN/manifest.json, and writes CURRENT {N, F} If-Match E. Whatever wrote
CURRENT since (a push raising the fence, another commit) changes E, so the write fails (412) and
nothing is committed: raise_fence and commit are linearizable on the one object, and a commit under
a token older than one raise_fence recorded is refused even when it read CURRENT before the raise.
The manifest is created, never overwritten, so that two pushes racing for version N cannot replace
each other's: only the push that created vN/manifest.json can move CURRENT to N. One whose creator
cannot commit any more (its token is older than the caller's, which is the newest) is replaced, If-
Match its ETag; `clean` deletes those after CURRENT. s3fs retries a request whose reply was lost, so
a conditional write may be told 412 about its own first attempt: CURRENT is then read back, and the
write was ours if it carries our write id.

Object stores without conditional writes are refused at open (a probe: a create-only write twice
and a write If-Match a wrong ETag, both must fail): without them nothing arbitrates two writers of
CURRENT, and a push whose lock lapsed could overwrite a version clients were told of. Only s3://
URLs are taken: the conditions are S3's PutObject headers (AWS S3 since 2024, MinIO, moto).

No LOCK: an object store has no lock that dies with its holder. In a Serve deployment the
coordinator's push lock orders the pushes and the fencing token in CURRENT refuses one whose lock
lapsed, as on a directory. What is lost: a second single-process server on the same URL is not
detected. The compare-and-set still keeps either from overwriting the other's versions (a push
numbered on a version the other moved past is refused, Conflict), but each serves its own pushes
only: give each server its own prefix.

A PutObject that returned is durable: nothing is synced. A push is received on this machine, into
a directory under the staging root (`incoming/`, then adopted as v000003-push-*/; the replicas took
its parts through Ray as they were written, serve/fanout.py); the commit uploads its shards, then
creates the manifest, then moves CURRENT. Those local copies go with their
version (`_collect`) and at `close`. A version this machine did not push is read through
`local_files` and `shard`: downloaded into a scratch directory and checked against its CRC-32s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rollout_service.errors import ConfigError, Conflict, DataLoss, StorageUnavailable
from rollout_service.weights.versions import _COMMIT_LOCKS, Manifest, VersionStore, _shown, version_name

log = logging.getLogger(__name__)

# Tries of raise_fence against writers that replace CURRENT in between (each a push's begin or commit).
_FENCE_TRIES = 20
# A shard larger than this logs its download's progress.
_PROGRESS_BYTES = 256 << 20


@dataclass(frozen=True)
class _Pointer:
    """CURRENT as read: the version, the newest fencing token, the id of the write that made it,
    and its ETag (None: there is no CURRENT yet)."""

    version: int
    fence: int
    write: str
    etag: str | None

    def body(self) -> bytes:
        return json.dumps({"version": self.version, "fence": self.fence, "write": self.write}).encode()


class ObjectVersionStore(VersionStore):
    _manifests_in_flight = True

    def __init__(self, url: str, keep: int, local_root: Path):
        """The store at `url` (s3://bucket/prefix), its pushes received under `local_root`. Refused
        (ConfigError) when the bucket is missing, access is refused, or it lacks conditional writes."""
        import fsspec

        self.url = self.root = url.rstrip("/")
        self.keep = keep
        self.temporary = False
        self.durable = False  # the upload is the durable copy; the local one is scratch
        try:
            # No listing cache (another process's pushes change the listings), and a client of its own (the
            # environment as it is now, not as when a cached one was made).
            self.fs, self._path = fsspec.core.url_to_fs(self.url, use_listings_cache=False, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"weights_dir {self.url}: not an object store URL fsspec can open ({exc})") from None
        if "s3" not in self.fs.protocol:
            raise ConfigError(
                f"weights_dir {self.url}: only s3:// object stores are taken (their conditional writes make the "
                "commit compare-and-set); give an s3:// URL or a directory"
            )
        self._probe()
        local_root.mkdir(parents=True, exist_ok=True)
        self.local = Path(tempfile.mkdtemp(prefix="store-", dir=local_root))
        self._owner = _own(self.local)
        _drop_unowned(local_root)
        self.incoming = self.local / "incoming"
        self.incoming.mkdir()
        self._commit_lock = _COMMIT_LOCKS.setdefault(self.local, threading.Lock())
        # CURRENT as the commit running on this thread read it (see `_committing`).
        self._held: _Pointer | None = None
        self._held_by: int | None = None

    def _key(self, name: str) -> str:
        return f"{self._path}/{name}"

    def _probe(self) -> None:
        """Fail at open, naming the URL, where the store cannot serve: a missing bucket, refused
        credentials, an unreachable endpoint, no conditional writes."""
        from botocore.exceptions import BotoCoreError, NoCredentialsError

        key = self._key(f".probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(key, b"", mode="create")
            try:
                conditional = not self._wrote(key, b"", mode="create") and not self._wrote(key, b"", IfMatch='"0"')
            finally:
                with contextlib.suppress(OSError):
                    self.fs.rm_file(key)
        except FileNotFoundError:
            raise ConfigError(f"weights_dir {self.url}: the bucket does not exist (create it, or give another)") from None
        except PermissionError as exc:
            raise ConfigError(
                f"weights_dir {self.url}: access refused ({exc}); give credentials that may read and write it, in the "
                "environment as the AWS SDK reads them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role)"
            ) from None
        except NoCredentialsError:
            raise ConfigError(
                f"weights_dir {self.url}: no credentials found; set them in the environment as the AWS SDK reads them"
            ) from None
        except (OSError, BotoCoreError) as exc:
            raise StorageUnavailable(f"weights_dir {self.url}: the object store cannot be reached ({exc})") from None
        if not conditional:
            raise ConfigError(
                f"weights_dir {self.url}: the object store ignores conditional writes (If-None-Match, If-Match), "
                "which make its commit compare-and-set; without them two writers could overwrite a version: give "
                "a directory, or a store that enforces them (AWS S3, MinIO)"
            )

    def _wrote(self, key: str, data: bytes, **condition) -> bool:
        """Whether a conditional write of `data` landed (False: its condition failed)."""
        try:
            self.fs.pipe_file(key, data, **condition)
            return True
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise

    # ---- CURRENT: the version and the fencing token, replaced by compare-and-set -----------------

    def _read_pointer(self) -> _Pointer:
        try:
            text, etag = self._get(self._key("CURRENT"))
        except FileNotFoundError:
            return _Pointer(0, 0, "", None)
        try:
            raw = json.loads(text)
            return _Pointer(int(raw["version"]), int(raw["fence"]), str(raw["write"]), etag)
        except (ValueError, TypeError, KeyError):
            raise DataLoss(f"weight store {self._where('CURRENT')}: {_shown(text)} is not a version and a fencing token") from None

    def _pointer(self) -> _Pointer:
        """CURRENT: as the commit running on this thread read it, else read now."""
        if self._held is not None and self._held_by == threading.get_ident():
            return self._held
        return self._read_pointer()

    def _swap_pointer(self, new: _Pointer, expected: _Pointer) -> bool:
        """Replace CURRENT by `new` if it is still `expected`; whether it was."""
        condition = {"IfMatch": expected.etag} if expected.etag else {"mode": "create"}
        if self._wrote(self._key("CURRENT"), new.body(), **condition):
            return True
        return self._read_pointer().write == new.write  # a retried request whose first try landed

    def current_version(self) -> int:
        return self._pointer().version

    def fence_mark(self) -> int:
        return self._pointer().fence

    def raise_fence(self, token: int) -> None:
        for _ in range(_FENCE_TRIES):
            current = self._read_pointer()
            if token <= current.fence:
                return
            if self._swap_pointer(_Pointer(current.version, token, uuid.uuid4().hex, None), current):
                return
        raise Conflict(f"weight store {self.url}: CURRENT kept changing while this push recorded its fencing token {token}: push again")

    @contextlib.contextmanager
    def _committing(self):
        """No lock: CURRENT as read here is what the commit point swaps from (`_point_current`)."""
        with self._commit_lock:
            self._held, self._held_by = self._read_pointer(), threading.get_ident()
            try:
                yield
            finally:
                self._held = self._held_by = None

    def _write_manifest(self, manifest: Manifest, files: dict[str, Path]) -> None:
        """The shards uploaded, then the manifest created (see the module docstring)."""
        for path in sorted(set(files.values())):
            self.fs.put_file(str(path), self._key(self._rel(path)))
        body = manifest.to_json().encode()
        key = self._key(f"{version_name(manifest.version)}/manifest.json")
        if self._wrote(key, body, mode="create"):
            return
        text, etag = self._get(key)
        if text.encode() == body:  # a retried request whose first try landed
            return
        try:
            left = json.loads(text).get("fence", 0)
        except ValueError:
            left = -1  # torn: nobody commits on it
        if manifest.fence <= left or not self._wrote(key, body, IfMatch=etag):
            raise Conflict(
                f"weight store {self.url}: another push (fencing token {left}) is committing version {manifest.version}; "
                "nothing was committed: push again"
            )

    def _point_current(self, version: int, fence: int) -> None:
        held = self._held
        new = _Pointer(version, max(fence, held.fence), uuid.uuid4().hex, None)
        if not self._swap_pointer(new, held):
            # Its manifest stays: deleting it could delete the one of the push that moved CURRENT on.
            raise Conflict(
                f"weight store {self.url}: CURRENT changed while this push committed version {version} (another push "
                "began or committed); nothing was committed: push again"
            )
        self._held = new  # what the rest of the commit (deleting old versions) reads

    def _sync_commit(self) -> None:
        pass  # a PutObject that returned is durable

    # ---- the rest of the storage primitives ---------------------------------------------------

    def lock(self, shared: bool = False) -> None:
        if not shared:
            log.info("weights_dir %s is an object store: a second server on it is not detected (see weights/object_store.py)", self.url)

    def close(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)
        _OPEN_HERE.discard(self.local)
        os.close(self._owner)

    def adopt(self, staged: Path, files: dict[str, Path], version: int) -> dict[str, Path]:
        """As a directory's, on this machine: uploaded by the commit."""
        target = self.local / f"{version_name(version)}-{staged.name}"
        os.replace(staged, target)
        return {name: target / path.name for name, path in files.items()}

    def discard(self, files: dict[str, Path]) -> None:
        for d in {path.parent for path in files.values()}:
            self._remove_dir(d.name)

    def clean(self) -> None:
        for d in self.incoming.iterdir():
            shutil.rmtree(d, ignore_errors=True)
        self._collect(running=False)

    def verify(self, manifest: Manifest, progress=None) -> None:
        with tempfile.TemporaryDirectory(dir=self.local) as scratch:
            self.local_files(manifest, Path(scratch))

    def shard(self, file: str, scratch: Path) -> Path:
        """This machine's copy of stored shard `file` (a push it received), else downloaded into `scratch`."""
        for path in (self.local / file, scratch / file):
            if path.exists():
                return path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part")
        start = time.monotonic()
        self.fs.get_file(self._key(file), str(partial))
        os.replace(partial, path)
        if (size := path.stat().st_size) >= _PROGRESS_BYTES:
            elapsed = time.monotonic() - start
            log.info("downloaded %s (%.0f MB) in %.1f s (%.0f MB/s)", self._where(file), size / 1e6, elapsed, size / 1e6 / max(elapsed, 1e-9))
        return path

    def local_files(self, manifest: Manifest, scratch: Path) -> dict[str, Path]:
        files = sorted({t.file for t in manifest.tensors.values()})
        total = sum(t.nbytes for t in manifest.tensors.values())
        if total >= _PROGRESS_BYTES:
            log.info("fetching version %d from %s: %d shards, %.0f MB", manifest.version, self.url, len(files), total / 1e6)
        paths = {}
        for i, file in enumerate(files, 1):
            try:
                paths[file] = self.shard(file, scratch)
            except FileNotFoundError:
                raise DataLoss(f"weight store {self._where(file)}: missing (a shard of version {manifest.version})") from None
            if total >= _PROGRESS_BYTES:
                log.info("version %d: %d of %d shards fetched", manifest.version, i, len(files))
        for name, t in manifest.tensors.items():
            problem = self.tensor_problem(name, t, paths[t.file])
            if problem is not None:
                raise DataLoss(f"weight store {self._where(t.file)}: {problem} (a tensor of version {manifest.version})")
        return {name: paths[t.file] for name, t in manifest.tensors.items()}

    def _where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.local))

    def _read(self, name: str) -> str:
        try:
            return self.fs.cat_file(self._key(name)).decode()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "not in the weight store", self._where(name)) from None

    def _write_record(self, name: str, text: str) -> None:
        self.fs.pipe_file(self._key(name), text.encode())

    @contextlib.contextmanager
    def _open_shard(self, file: str):
        # A small block: the check reads a shard's header only, not the default 50 MB read-ahead.
        with self.fs.open(self._key(file), "rb", block_size=1 << 20) as fh:
            yield fh, fh.size

    def _version_dirs(self) -> list[str]:
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self._path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith("v") and n[1:7].isdigit())

    def _remove_manifest(self, d: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(f"{d}/manifest.json"))

    def _remove_dir(self, d: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(d), recursive=True)
        shutil.rmtree(self.local / d, ignore_errors=True)

    def _get(self, key: str) -> tuple[str, str]:
        """An object's text and its ETag, in one request (two could see two different objects)."""
        from fsspec.asyn import sync

        bucket, name, _ = self.fs.split_path(key)

        async def get() -> tuple[str, str]:
            reply = await self.fs._call_s3("get_object", Bucket=bucket, Key=name)
            body = reply["Body"]
            try:
                return (await body.read()).decode(), reply["ETag"]
            finally:
                body.close()

        return sync(self.fs.loop, get)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether s3fs's error is S3 refusing a conditional write (412, or 409 for a concurrent one)."""
    if isinstance(exc, FileExistsError):
        return True
    code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


# The local directories of the stores open in this process: a lockf lock is the process's own, so
# another process's test of it says nothing about this one's.
_OPEN_HERE: set[Path] = set()


def _own(local: Path) -> int:
    """Lock `local`/.owner for as long as this process lives (the descriptor returned): the mark
    that the directory is in use (lockf: released by the kernel when the process dies)."""
    fd = os.open(local / ".owner.new", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(local / ".owner.new", local / ".owner")  # seen by others only once locked
    _OPEN_HERE.add(local)
    return fd


def _drop_unowned(local_root: Path) -> None:
    """Delete the local directories of stores whose process died without `close` (killed, a
    crash): each holds up to keep_versions + 1 versions' local copies, and nothing else would."""
    for d in local_root.glob("store-*"):
        if d in _OPEN_HERE:
            continue
        try:
            fd = os.open(d / ".owner", os.O_RDWR)
        except OSError:  # a store opening right now (not locked yet), or not a store's directory
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its process lives
            continue
        finally:
            os.close(fd)
        log.info("removing %s: the local copies of an object store whose process is gone", d)
        shutil.rmtree(d, ignore_errors=True)

