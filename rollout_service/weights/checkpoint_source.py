"""A safetensors checkpoint read for LoadWeights: one file, or a Hugging Face sharded directory
(`model.safetensors.index.json` naming each tensor's file, or a lone `model.safetensors`), in an
object store (an fsspec URL such as s3://bucket/step-120/, read with the server's own credentials as
the AWS SDK finds them) or in a local directory the operator allows (config `load_dirs`).

`CheckpointSource.open` reads every file's safetensors header first (a few small ranged reads),
so a file that is missing, unreadable, truncated or declares a dtype a push cannot take is refused,
naming it, before any tensor byte is read or anything is staged. `chunks` then reads the tensor
bytes in ranges of CHUNK_BYTES (ranged GETs on an object store), yielding them as a push's chunks;
the checkpoint is never in memory whole. Blocking (fsspec's file API): the caller runs it on a thread.

Local paths: only under a directory of `load_dirs`, checked on the path with its symlinks resolved
(the index's file names too), so a caller cannot make the server read any other file; with no
`load_dirs` every local path is refused. Only object-store schemes are taken (not http:// and the
like, which would have the server fetch any URL a caller names).
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec

from rollout_service.errors import DataLoss, InvalidArgument, NotFound, PermissionDenied, StorageUnavailable, TooLarge
from rollout_service.weights.manifest import TensorSpec
from rollout_service.weights.safetensors_stream import MAX_HEADER_BYTES, parse_header

# S3 (s3fs is a dependency); another fsspec store would need its package (gcsfs, adlfs) and a test.
OBJECT_STORES = ("s3", "s3a")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# One ranged read: large enough that an object store's per-request latency is small beside it,
# small beside the push buffer (config.push_buffer_mib) that bounds what a load holds.
CHUNK_BYTES = 16 << 20
MAX_INDEX_BYTES = 64 << 20
# The first read of a file: its header size and, for most checkpoints, the whole header in one
# request (a header lists about 100 bytes a tensor).
HEAD_BYTES = 256 << 10


@dataclass(frozen=True)
class Shard:
    url: str  # as errors name it
    path: str  # in the filesystem
    tensors: list[TensorSpec]
    spans: list[tuple[int, int]]  # each tensor's [begin, end) in the file, in file order
    first: int  # the push's index of tensors[0]

    @property
    def data(self) -> tuple[int, int]:
        """The file's tensor bytes: [begin, end)."""
        return (self.spans[0][0], self.spans[-1][1]) if self.spans else (0, 0)


class CheckpointSource:
    def __init__(self, url: str, fs: fsspec.AbstractFileSystem, shards: list[Shard]):
        self.url = url
        self._fs = fs
        self.shards = shards

    @property
    def tensors(self) -> list[TensorSpec]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def open(cls, url: str, load_dirs: Sequence[Path], load_urls: Sequence[str] = ()) -> CheckpointSource:
        """The checkpoint at `url` with every file's header read and checked; `load_dirs` and
        `load_urls`: where the operator allows loads from (config)."""
        fs, root, allowed = _filesystem(url, load_dirs, load_urls)
        name = root.rstrip("/").rpartition("/")[2]
        if name.endswith(".safetensors"):
            folder, files = root.rpartition("/")[0], {name: None}
        else:
            folder = root.rstrip("/")
            files = _shard_names(fs, folder, url, allowed)
        shards, first = [], 0
        for file, names in files.items():
            path = allowed(f"{folder}/{file}")
            shard_url = _join(url, file) if not name.endswith(".safetensors") else url
            shards.append(_read_shard(fs, path, shard_url, first, names))
            first += len(shards[-1].tensors)
        if first == 0:
            raise InvalidArgument("url", f"{url}: the checkpoint holds no tensor")
        return cls(url, fs, shards)

    def chunks(self) -> Iterator[tuple[int, int, memoryview]]:
        """(push tensor index, offset in the tensor, bytes) for every tensor, file by file, read in
        ranges of CHUNK_BYTES; a file shorter than its header said raises DataLoss naming it."""
        for shard in self.shards:
            begin, end = shard.data
            with _reading(shard.url), self._fs.open(shard.path, "rb", cache_type="none", block_size=CHUNK_BYTES) as f:
                f.seek(begin)
                index, position = 0, begin
                while position < end:
                    with _reading(shard.url):
                        piece = memoryview(f.read(min(CHUNK_BYTES, end - position)))
                    if not piece:
                        raise DataLoss(f"{shard.url}: ended at byte {position}, inside {shard.tensors[index].name} "
                                       f"(its header declares tensors up to byte {end})")
                    while piece:
                        t_begin, t_end = shard.spans[index]
                        take = min(len(piece), t_end - position)
                        if take:
                            yield shard.first + index, position - t_begin, piece[:take]
                        piece, position = piece[take:], position + take
                        if position == t_end:
                            index += 1


def under_prefix(url: str, prefixes: Sequence[str]) -> bool:
    """Whether `url` is one of `prefixes` or under one: a prefix ending in / takes what follows it
    (s3:// every bucket, s3://b/ all of bucket b); any other, whole path segments only (s3://b
    is not s3://b2)."""
    return any(url == p or url.startswith(p if p.endswith("/") else p + "/") for p in prefixes)


def _filesystem(url: str, load_dirs: Sequence[Path], load_urls: Sequence[str]):
    """(filesystem, path in it, the check every path read goes through) for `url`."""
    if "::" in url:  # fsspec's chained URLs would put another filesystem (a local one) behind the scheme
        raise InvalidArgument("url", f"{url!r}: chained URLs (::) are not taken")
    protocol, path = fsspec.core.split_protocol(url)
    if protocol is not None and "@" in path.partition("/")[0]:  # not echoed: it may hold a key
        raise InvalidArgument("url", "credentials in the URL are not taken (they would reach logs and errors): the "
                              "server reads object stores with its own, from its environment")
    if protocol not in (None, "file"):
        if protocol not in OBJECT_STORES:
            raise InvalidArgument("url", f"{url!r}: scheme {protocol!r} is not an object store ({', '.join(OBJECT_STORES)}) nor a local path")
        if not under_prefix(url, load_urls):
            raise PermissionDenied(f"{url}: not under a prefix this server loads from (its load_urls option"
                                   + (f": {', '.join(load_urls)})" if load_urls else " is empty)"))
        with _reading(url):
            # Fresh listings each load: a checkpoint written since the last one must be seen.
            fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
        return fs, root, lambda p: p
    if not load_dirs:
        raise PermissionDenied(f"{url}: this server reads no local checkpoints (its load_dirs option is empty); "
                               "give an object-store URL, or ask its operator to allow the directory")
    if not Path(path).is_absolute():
        raise InvalidArgument("url", f"{url!r}: a local path must be absolute")
    roots = [d.resolve() for d in load_dirs]

    def allowed(p: str) -> str:
        resolved = Path(p).resolve()
        if not any(resolved.is_relative_to(r) for r in roots):
            raise PermissionDenied(f"{p}: outside the directories this server loads from (its load_dirs option)")
        return str(resolved)

    return fsspec.filesystem("file"), allowed(path), allowed


def _shard_names(fs, folder: str, url: str, allowed) -> dict[str, list[str] | None]:
    """File name -> the tensor names the index puts in it (None: a lone model.safetensors)."""
    index_url = _join(url, INDEX)
    try:
        with _reading(index_url):
            size = fs.size(allowed(f"{folder}/{INDEX}"))
    except NotFound:
        try:
            with _reading(_join(url, SINGLE)):
                fs.size(allowed(f"{folder}/{SINGLE}"))
        except NotFound:
            raise NotFound(f"{url}: holds neither {INDEX} nor {SINGLE}") from None
        return {SINGLE: None}
    if size > MAX_INDEX_BYTES:
        raise TooLarge(f"{index_url}: {size} bytes, over the limit of {MAX_INDEX_BYTES} for an index")
    with _reading(index_url):
        raw = fs.cat_file(allowed(f"{folder}/{INDEX}"))
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InvalidArgument("url", f"{index_url}: not a JSON object with a weight_map") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidArgument("url", f"{index_url}: weight_map is not an object of tensor name -> file name")
    files: dict[str, list[str]] = {}
    for tensor, file in sorted(weight_map.items(), key=lambda item: item[1]):
        if "/" in file or "\\" in file or not file.endswith(".safetensors") or file.startswith("."):
            raise InvalidArgument("url", f"{index_url}: {tensor!r} is in {file!r}, not a .safetensors file beside the index")
        files.setdefault(file, []).append(tensor)
    return files


def _read_shard(fs, path: str, url: str, first: int, indexed: list[str] | None) -> Shard:
    """A file's header, checked against its size (a truncated file is refused here) and against
    the tensors the index puts in it."""
    with _reading(url):
        size = fs.size(path)
        head = fs.cat_file(path, start=0, end=min(size, HEAD_BYTES))
        if len(head) < 8:
            raise DataLoss(f"{url}: {size} bytes, too short for a safetensors file (truncated?)")
        (header_size,) = struct.unpack("<Q", head[:8])
        if header_size > MAX_HEADER_BYTES:
            raise TooLarge(f"{url}: a safetensors header of {header_size} bytes, over the limit of {MAX_HEADER_BYTES}")
        if 8 + header_size > size:
            raise DataLoss(f"{url}: {size} bytes, shorter than its header's {8 + header_size} (truncated)")
        raw = head[8 : 8 + header_size] if 8 + header_size <= len(head) else fs.cat_file(path, start=8, end=8 + header_size)
    tensors, spans = parse_header(raw, url, ": ")
    start = 8 + header_size
    spans = [(start + b, start + e) for b, e in spans]
    end = spans[-1][1] if spans else start
    if size != end:
        what = "truncated" if size < end else "trailing bytes after its last tensor"
        raise DataLoss(f"{url}: {size} bytes, where its header declares {end} ({what})")
    if indexed is not None and sorted(indexed) != sorted(t.name for t in tensors):
        held = {t.name for t in tensors}
        odd = sorted(set(indexed) ^ held)[0]
        where = "the index puts it there, its header lacks it" if odd not in held else "its header has it, the index does not"
        raise InvalidArgument("url", f"{url}: {odd}: {where}")
    return Shard(url, path, tensors, spans, first)


def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """The filesystem's errors as the service's, naming `url` (never the credentials)."""
    try:
        yield
    except FileNotFoundError:
        raise NotFound(f"{url}: no such file or object") from None
    except PermissionError as exc:
        raise PermissionDenied(f"{url}: the server may not read it ({exc.strerror or exc})") from None
    except OSError as exc:
        raise StorageUnavailable(f"{url}: could not be read ({type(exc).__name__}: {exc})") from None
