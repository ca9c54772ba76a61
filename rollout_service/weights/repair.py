"""A weight store checked and repaired offline: `rollout-service store verify DIR` and `store repair DIR`.

verify reads CURRENT, FENCE and BASE.json, every manifest of a committed version (those up to
CURRENT still on disk; all of them when CURRENT itself is torn) and every stored tensor against its
CRC-32 (a tensor several versions share is read once). Manifests and shards of versions after
CURRENT are a push a crash cut off before its commit point: left-overs, not damage (the next start
deletes them).

repair, with every server on the store stopped (it takes the store's LOCK alone), rolls CURRENT
back to the newest version that verifies whole: versions after it (torn, or never committed) are
deleted, and so are the manifests of older versions that do not verify (their shards stay while a
kept version refers to them), so that what is left verifies. A torn FENCE is deleted (the fencing
token is then taken from the current manifest); a torn BASE.json is deleted (the next server to
start records its checkpoint as the store's base). Rolling back past a version clients were told
of means the next push is numbered as that version again: repair says so.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rollout_service.errors import ConfigError, DataLoss
from rollout_service.weights import durable
from rollout_service.weights.versions import Manifest, VersionStore

_VERSION_DIR = re.compile(r"^v(\d{6})$")
# Every version on disk is looked at, whatever `keep` the servers run with.
_ALL = 1 << 30


class Progress(typing.Protocol):
    def start(self, total_bytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...


@dataclass
class VersionCheck:
    version: int
    problem: str | None = None  # None: complete, every CRC-32 verified
    tensors: int = 0
    nbytes: int = 0


@dataclass
class StoreCheck:
    root: Path
    current: int | None  # None: CURRENT is torn
    problems: list[str] = field(default_factory=list)  # of CURRENT, FENCE, BASE.json
    versions: list[VersionCheck] = field(default_factory=list)  # committed ones, oldest first
    leftovers: list[str] = field(default_factory=list)  # uncommitted: deleted at the next start

    @property
    def ok(self) -> bool:
        return not self.problems and all(v.problem is None for v in self.versions)

    @property
    def newest_whole(self) -> int:
        """The newest committed version that verifies whole (0: the base checkpoint)."""
        return max((v.version for v in self.versions if v.problem is None), default=0)


def verify(root: Path, progress: Progress | None = None) -> StoreCheck:
    """Check the store at `root` whole (see the module docstring); reads only."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory: give the --weights-dir of a server")
    store = VersionStore(root, _ALL)
    problems: list[str] = []
    current = _read(store.current_version, problems)
    for name, reader in (("FENCE", store.fence_mark), ("BASE.json", store.base)):
        if (root / name).exists():
            _read(reader, problems)
    check = StoreCheck(root, current, problems)
    newest = current if current is not None else max(_versions(root), default=0)
    manifests: dict[int, Manifest] = {}
    for version in sorted(set(_versions(root)) | ({current} if current else set())):
        if version > newest:
            check.leftovers.append(f"{store.manifest_path(version)} (version {version}, after CURRENT: never committed)")
            continue
        entry = VersionCheck(version)
        check.versions.append(entry)
        try:
            manifests[version] = store.manifest(version)
            store.check_files(manifests[version])
        except FileNotFoundError:
            entry.problem = f"weight store {store.manifest_path(version)}: missing, and CURRENT names version {version}"
        except DataLoss as exc:
            entry.problem = str(exc)
    _verify_tensors(store, check, manifests, progress)
    check.leftovers += [f"{d} (a push never committed)" for d in _uncommitted(root, newest)]
    return check


def repair(root: Path, dry_run: bool = False, progress: Progress | None = None) -> tuple[StoreCheck, list[str]]:
    """Roll the store at `root` back to its newest version that verifies whole (see the module
    docstring); returns the check it acted on and what it did (with `dry_run`, would do).
    ConfigError while a server holds the store."""
    store = VersionStore(root, _ALL) if root.is_dir() else None
    if store is not None and not dry_run:
        try:
            store.lock(shared=False)
        except ConfigError:
            raise ConfigError(f"weights_dir {root} is in use by a running server: stop every server on it, then repair") from None
    try:
        check = verify(root, progress)
        return check, _act(store, check, dry_run)
    finally:
        if store is not None:
            store.close()


def _act(store: VersionStore, check: StoreCheck, dry_run: bool) -> list[str]:
    root, target, done = store.root, check.newest_whole, []
    do = (lambda *_: None) if dry_run else (lambda f, *a: f(*a))
    for v in check.versions:
        if v.problem is not None and v.version < target and (root / f"v{v.version:06d}" / "manifest.json").exists():
            do(Path.unlink, root / f"v{v.version:06d}" / "manifest.json")
            done.append(f"deleted the manifest of version {v.version}, which does not verify ({v.problem})")
    if check.current != target:
        was = "torn" if check.current is None else f"version {check.current}"
        do(durable.write_durably, root / "CURRENT", str(target))
        done.append(
            f"rolled CURRENT back from {was} to version {target}, the newest that verifies whole; clients may have "
            f"been told of later versions: the next push is numbered {target + 1}"
        )
    for name, reader in (("FENCE", store.fence_mark), ("BASE.json", store.base)):
        if (root / name).exists() and _read(reader, []) is None:
            do(Path.unlink, root / name)
            done.append(f"deleted the torn {root / name}" + (
                " (the next server to start records its checkpoint as the store's base: start it with the checkpoint "
                "the versions were pushed onto)" if name == "BASE.json" else " (the fencing token is taken from the current manifest)"))
    gone = [f"v{v:06d}" for v in _versions(root) if v > target] + [str(d.relative_to(root)) for d in _uncommitted(root, target)]
    if gone:
        done.append(f"deleted what no version up to {target} refers to (later versions, pushes never committed): {', '.join(gone)}")
    if not dry_run:
        store.clean()  # with every version kept: deletes exactly what no version up to CURRENT refers to
    return done


def _verify_tensors(store: VersionStore, check: StoreCheck, manifests: dict[int, Manifest], progress: Progress | None) -> None:
    """CRC-32 of every stored tensor of the manifests that are whole so far, each read once."""
    whole = {v.version for v in check.versions if v.problem is None}
    unique = {(t.file, name, t.crc32): t for v, m in manifests.items() if v in whole for name, t in m.tensors.items()}
    if progress is not None:
        progress.start(sum(t.nbytes for t in unique.values()))
    problems = {}
    for (file, name, crc), t in unique.items():
        problem = store.tensor_problem(name, t)
        if problem is not None:
            problems[(file, name, crc)] = f"weight store {store.root / file}: {problem}"
        if progress is not None:
            progress.advance(t.nbytes)
    for v in check.versions:
        if v.version in manifests:
            tensors = manifests[v.version].tensors
            v.tensors, v.nbytes = len(tensors), sum(t.nbytes for t in tensors.values())
            if v.problem is None:
                v.problem = next((problems[k] for n, t in tensors.items() if (k := (t.file, n, t.crc32)) in problems), None)


def _read(reader, problems: list[str]):
    """reader(), or None with its DataLoss added to `problems`."""
    try:
        return reader()
    except DataLoss as exc:
        problems.append(str(exc))
        return None
    except FileNotFoundError:
        return None


def _versions(root: Path) -> list[int]:
    """The versions whose manifest is on disk, oldest first."""
    return sorted(int(m[1]) for d in root.glob("v*") if (m := _VERSION_DIR.match(d.name)) and (d / "manifest.json").exists())


def _uncommitted(root: Path, current: int) -> list[Path]:
    """Pushes cut off before their commit: being received (incoming/) or adopted for a version after CURRENT."""
    cut = [d for d in root.glob("v*-push-*") if int(d.name[1:7]) > current]
    return sorted(cut) + sorted((root / "incoming").glob("*"))
