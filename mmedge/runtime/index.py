"""On-disk vector index: an hnswlib HNSW graph plus an SQLite item store, in one folder.

Vectors are L2-normalised (again, defensively) and searched by inner product, so a hit's
``score`` is the cosine similarity ``1 - hnsw_distance``. Every vector carries an integer
*label*; labels are assigned from a counter (``next_label`` in SQLite ``meta``) and never
reused, so a label always names the same item. The item rows (external ``key``, modality,
path, caption, JSON metadata) live in SQLite, keyed by label.

Files in the folder::

    index.json          schema_version=1, dim, space "ip", fingerprint, M, ef_construction, ef,
                        max_elements, count, generation, hnsw_file (informational copy)
    hnsw.<g>.bin        the HNSW graph of generation g, in hnswlib's save_index format
    items.sqlite        items(label INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, modality,
                        path, caption, metadata JSON) and meta(k TEXT PRIMARY KEY, v TEXT):
                        generation, next_label, dim, fingerprint, schema_version, M,
                        ef_construction, ef

Durability
----------
Changes (:meth:`Index.add`, :meth:`Index.remove`, upserts) go to the in-memory graph and to
SQLite inside *one* open SQLite transaction, started (``BEGIN IMMEDIATE``) by the first
change. Nothing reaches the folder until :meth:`Index.save`, which:

1. writes the graph to ``hnsw.<g+1>.bin.tmp``, fsyncs it and renames it to ``hnsw.<g+1>.bin``;
2. sets ``generation = g+1`` in SQLite ``meta`` and COMMITs: **this commit is the single
   commit point**;
3. rewrites ``index.json`` (temp file, fsync, ``os.replace``); it is informational and is
   rewritten from SQLite whenever it is found stale;
4. deletes ``hnsw.<g>.bin`` and stray temporary files.

:meth:`Index.open` takes the generation from SQLite and loads ``hnsw.<that generation>.bin``.
A crash before step 2 leaves SQLite (rolled back by SQLite itself) and ``hnsw.<g>.bin`` as
they were: the old state, plus an orphan ``hnsw.<g+1>.bin`` that the next writable open or
save deletes. A crash after step 2 leaves the new state; a stale ``index.json`` or an old
graph file is repaired or deleted later. There is never a mix of the two.
:meth:`Index.close` without :meth:`Index.save` discards the pending changes.

SQLite runs in ``journal_mode=DELETE`` with ``synchronous=FULL`` rather than WAL: after every
commit the whole item store is the single ``items.sqlite`` file, so an index folder can be
copied or shipped to a device as is (a WAL database keeps committed pages in ``-wal`` until
a checkpoint) and can be opened ``readonly`` from read-only media, where WAL needs its
``-shm`` file. The cost is that a COMMIT waits for running readers (busy timeout
:data:`BUSY_TIMEOUT_S`).

Concurrency: one writer at a time. A writer holds SQLite's write lock from its first change
until :meth:`Index.save` or :meth:`Index.close`; another writer's first change then fails
with :class:`~mmedge.errors.SearchIndexError` (after the busy timeout), and a writer whose
snapshot is older than the folder's generation is refused too (reopen it). Readers in other
processes load the graph of the generation committed when they opened and keep it; item rows
are read live, and a hit whose row has since been removed is dropped.

Inside one process an :class:`Index` is shared safely by many threads through a
readers-writer lock: :meth:`Index.search`, :meth:`Index.get`, :meth:`Index.keys`,
:meth:`Index.vectors`, :meth:`Index.check` and :meth:`Index.info` run in parallel (hnswlib's
``knn_query`` releases the GIL); :meth:`Index.add`, :meth:`Index.remove`, :meth:`Index.save`
and :meth:`Index.close` run alone. A read sees the state left by the last change call that
completed before it started (saved or not), never part of one.

Every corrupt, missing or mismatched file raises :class:`~mmedge.errors.SearchIndexError`
naming the file; an HNSW file is checked structurally (header against the index's ``dim``
and ``M``, exact size, neighbour ids, link levels, finite unit vectors, unique labels) before
hnswlib loads it, because hnswlib can crash on a damaged file, and its live labels must be
exactly the item store's.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Union

import hnswlib
import numpy as np

from mmedge.errors import SearchIndexError, UsageError

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Version of the folder layout this module reads and writes.
SCHEMA_VERSION: int = 1
#: The modalities an :class:`Item` may have.
MODALITIES: tuple[str, ...] = ("image", "text")
#: HNSW capacity of a new index; it doubles whenever an add needs more.
INITIAL_CAPACITY: int = 1024
#: Seconds a SQLite statement waits for another connection's lock before failing.
BUSY_TIMEOUT_S: float = 10.0
#: Largest ``k`` :meth:`Index.search` accepts; a larger one raises :class:`UsageError`.
MAX_K: int = 10_000

INDEX_JSON = "index.json"
ITEMS_DB = "items.sqlite"
_HNSW_RE = re.compile(r"^hnsw\.(\d+)\.bin$")
_STRAY_RE = re.compile(r"^(?:index\.json|items\.sqlite|hnsw\.\d+\.bin)\.tmp(?:-journal)?$")
_OWN_RE = re.compile(r"^(?:index\.json|items\.sqlite(?:-journal|-wal|-shm)?|hnsw\.\d+\.bin)$")
_SQL_CHUNK = 500
# What a damaged item store can raise: SQLite's errors, and UnicodeDecodeError when Python
# decodes an error message or a text value that is not UTF-8.
_SQL_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, UnicodeDecodeError)
_VEC_CHUNK = 8192

# hnswlib HierarchicalNSW::saveIndex header: offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t), maxlevel (int),
# enterpoint_node (uint32), maxM, maxM0, M (size_t), mult (double), ef_construction (size_t).
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_MAX_LEVEL = 128
# Stored vectors are unit length (normalised in float32 before hnswlib copies them).
_NORM_TOL = 1e-3


def _hnsw_name(generation: int) -> str:
    return f"hnsw.{generation}.bin"


@dataclass(frozen=True)
class Item:
    """One indexed thing. ``key`` is the caller's id, unique in an index."""

    key: str
    modality: str = "image"
    path: str | None = None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is the cosine similarity to the query."""

    key: str
    score: float
    modality: str
    path: str | None
    caption: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class IndexParams:
    """hnswlib parameters: ``M`` (links per node), ``ef_construction`` (build beam) and the
    default search beam ``ef`` (raised to ``k`` when a search asks for more).

    The defaults come from recall@10 / latency curves of text->image queries over real image
    embeddings of the demo model (benchmarks/perf.py, 128-d): at 100,000 items M=16 reached the
    recall of M=32 at a lower latency, and ef_construction=200 gave no better graph than 100 for
    two to three times the build time; at 1,000,000 items M=16, ef_construction=100 gave recall@10
    0.991 at ef=16, 0.999 at ef=32 and 1.000 at ef=64, the default (a margin for embeddings less
    clustered than the demo's). M=16 also stores 660 instead of 788 bytes per item. Vectors
    without structure are much harder: on 5,000 uniformly random 64-d unit vectors these
    defaults reach recall@10 0.90, M=32, ef_construction=200, ef=100 reach 0.997."""

    M: int = 16
    ef_construction: int = 100
    ef: int = 64

    def __post_init__(self) -> None:
        for name, low in (("M", 2), ("ef_construction", 1), ("ef", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise UsageError(f"IndexParams.{name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))

    def to_dict(self) -> dict[str, int]:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef": self.ef}


@dataclass(frozen=True)
class _HnswFileInfo:
    max_elements: int
    count: int  # element slots, deleted ones included
    deleted: int
    M: int
    ef_construction: int
    max_label: int  # -1 when empty
    live_labels: np.ndarray  # sorted labels of the slots not marked deleted (uint64)


# ---------------------------------------------------------------------------------------
# file helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not delete %s: %s", path, exc)


def _inspect_hnsw_file(path: Path, dim: int) -> _HnswFileInfo:
    """Check an hnswlib index file structurally before hnswlib reads it.

    Verifies the header against ``dim``, the exact file size implied by the element count and
    the upper-level link lists, that every neighbour id is below the element count, that a
    neighbour at level ``l`` reaches level ``l`` itself (hnswlib follows such a link without
    looking and crashes otherwise), that the vectors are finite and of unit length and that
    the labels are unique. Raises :class:`SearchIndexError` naming the file.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SearchIndexError(f"HNSW file {path} is missing") from None
    except OSError as exc:
        raise SearchIndexError(f"cannot read HNSW file {path}: {exc}") from exc

    def bad(reason: str) -> SearchIndexError:
        return SearchIndexError(f"HNSW file {path} is corrupt or truncated: {reason}")

    hsize = _HEADER.size
    if size < hsize:
        raise bad(f"{size} bytes, shorter than the {hsize}-byte header")
    try:
        with open(path, "rb") as f:
            head = f.read(hsize)
            (off0, max_el, cur, sdpe, label_off, off_data, maxlevel, ep,
             max_m, max_m0, m, _mult, efc) = _HEADER.unpack(head)
            links0 = max_m0 * 4 + 4
            if off0 != 0:
                raise bad(f"offsetLevel0 is {off0}, expected 0")
            if m < 2 or max_m != m or max_m0 != 2 * m or m > 65535:
                raise bad(f"inconsistent M ({m}, maxM {max_m}, maxM0 {max_m0})")
            if off_data != links0 or label_off != links0 + 4 * dim or sdpe != label_off + 8:
                raise bad(
                    f"element layout (size_data_per_element {sdpe}, offsetData {off_data}, "
                    f"label_offset {label_off}) does not match dim {dim} and M {m}"
                )
            if cur > max_el:
                raise bad(f"cur_element_count {cur} exceeds max_elements {max_el}")
            level0_bytes = cur * sdpe
            minimum = hsize + level0_bytes + 4 * cur
            if size < minimum:
                raise bad(f"{size} bytes, the header implies at least {minimum}")
            if cur == 0:
                if size != hsize:
                    raise bad(f"{size - hsize} unexpected bytes after the header of an empty graph")
                return _HnswFileInfo(max_el, 0, 0, m, efc, -1, np.zeros(0, dtype=np.uint64))
            if not 0 <= maxlevel < _MAX_LEVEL or ep >= cur:
                raise bad(f"entry point {ep} / max level {maxlevel} out of range")

            # level 0: links, vectors, labels, read and checked in blocks of about 4 MiB (a
            # memory map would count the whole file in the process's resident memory)
            deleted = 0
            labels = np.empty(cur, dtype=np.uint64)
            is_deleted = np.empty(cur, dtype=bool)
            slot = np.arange(max_m0, dtype=np.uint32)
            chunk = max(1, (4 << 20) // sdpe)
            buf = np.empty((min(chunk, cur), sdpe), dtype=np.uint8)
            for start in range(0, cur, chunk):
                blk = buf[:min(chunk, cur - start)]
                if f.readinto(memoryview(blk).cast("B")) != blk.nbytes:
                    raise bad("level 0 is truncated")
                words = np.ascontiguousarray(blk[:, :links0]).view("<u4")
                counts = words[:, 0] & 0xFFFF
                if (counts > max_m0).any():
                    raise bad("a level-0 link count exceeds maxM0")
                ids = words[:, 1:]
                if ((ids >= cur) & (slot[None, :] < counts[:, None])).any():
                    raise bad("a level-0 neighbour id is out of range")
                flags = ((words[:, 0] >> 16) & 1).astype(bool)
                is_deleted[start:start + len(blk)] = flags
                deleted += int(flags.sum())
                vecs = blk[:, off_data:label_off].view("<f4")
                # squared norms in float32 (error ~1e-5, far below _NORM_TOL); not finite when a
                # value is not (or overflows when squared, which the norm check then refuses)
                sq = np.einsum("ij,ij->i", vecs, vecs)
                if not np.isfinite(sq).all() and not np.isfinite(vecs).all():
                    raise bad("a stored vector is not finite")
                norms = np.sqrt(sq.astype(np.float64))
                if (np.abs(norms - 1.0) > _NORM_TOL).any():
                    j = int(np.argmax(np.abs(norms - 1.0) > _NORM_TOL))
                    raise bad(f"the vector of element {start + j} has norm {norms[j]:.6g}, not 1")
                labels[start:start + len(blk)] = (
                    np.ascontiguousarray(blk[:, label_off:label_off + 8]).view("<u8").ravel()
                )
            ordered = np.sort(labels)  # (np.unique would import numpy.ma, slow at start-up)
            if (ordered[1:] == ordered[:-1]).any():
                raise bad("duplicate labels")

            # upper levels: per element a uint32 byte count, then that many bytes of links
            f.seek(hsize + level0_bytes)
            tail = f.read()
    except OSError as exc:
        raise SearchIndexError(f"cannot read HNSW file {path}: {exc}") from exc

    # Upper levels: per element a uint32 byte count, then that many bytes of links. Most
    # elements have none (a zero count), so the walk jumps from one non-zero word to the next;
    # the link lists found are then checked together.
    slpe = max_m * 4 + 4
    end = len(tail)
    words = np.frombuffer(tail, dtype="<u4", count=end // 4)
    nw = len(words)
    # plain Python ints and bisect: a numpy call per element costs several times more
    nonzero = np.flatnonzero(words).tolist()
    n_nonzero = len(nonzero)
    elems: list[int] = []
    heads: list[int] = []
    pos = 0  # word index of the next element's byte count
    i = 0
    while i < cur:
        k = bisect.bisect_left(nonzero, pos)
        q = nonzero[k] if k < n_nonzero else nw
        if q - pos >= cur - i:  # the remaining elements have no upper levels
            pos += cur - i
            break
        if q >= nw:
            raise bad("the upper-level link lists are truncated")
        i += q - pos
        n = int(words[q])
        if n % slpe or n // slpe > maxlevel or 4 * (q + 1) + n > end:
            raise bad(f"element {i} has a malformed upper-level link list ({n} bytes)")
        elems.append(i)
        heads.append(q)
        pos = q + 1 + n // 4
        i += 1
    levels = np.zeros(cur, dtype=np.int64)
    ep_level = 0
    owner = np.asarray(elems, dtype=np.int64)
    if elems:
        head = np.asarray(heads, dtype=np.int64)
        counts_per = words[head].astype(np.int64) // slpe  # levels above 0 of each element
        levels[owner] = counts_per
        row_owner = np.repeat(owner, counts_per)
        row_level = np.arange(len(row_owner)) - np.repeat(np.cumsum(counts_per) - counts_per, counts_per)
        row_start = np.repeat(head + 1, counts_per) + row_level * (max_m + 1)
        rows = words[row_start[:, None] + np.arange(max_m + 1)[None, :]]
        counts = rows[:, 0] & 0xFFFF
        over = np.flatnonzero(counts > max_m)
        if over.size:
            raise bad(f"element {row_owner[over[0]]} has an upper-level link count above maxM")
        mask = np.arange(max_m)[None, :] < counts[:, None]
        ids = rows[:, 1:]
        out = np.flatnonzero(((ids >= cur) & mask).any(axis=1))
        if out.size:
            raise bad(f"element {row_owner[out[0]]} has an upper-level neighbour id out of range")
        ep_level = int(levels[ep])
    pos *= 4
    if pos != end:
        raise bad(f"{end - pos} unexpected bytes after the link lists")
    if ep_level != maxlevel:
        raise bad(f"the entry point has level {ep_level}, the header says {maxlevel}")
    if elems:
        # a neighbour at level l must itself reach level l (row_level is l - 1)
        low = ((levels[np.where(mask, ids, 0)] <= row_level[:, None]) & mask).any(axis=1)
        if low.any():
            raise bad(f"element {row_owner[int(np.argmax(low))]} links to a neighbour above that neighbour's level")
    return _HnswFileInfo(max_el, cur, deleted, m, efc, int(labels.max()), np.sort(labels[~is_deleted]))


# ---------------------------------------------------------------------------------------
# SQLite helpers


def _connect(db: Path, readonly: bool) -> sqlite3.Connection:
    mode = "ro" if readonly else "rw"
    uri = f"{db.resolve().as_uri()}?mode={mode}"
    try:
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
    except _SQL_ERRORS as exc:
        raise SearchIndexError(f"cannot open item store {db}: {exc}") from exc
    try:
        if readonly:
            conn.execute("PRAGMA query_only=ON")
        else:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
    except _SQL_ERRORS as exc:
        conn.close()
        raise SearchIndexError(f"cannot open item store {db}: {exc}") from exc
    return conn


def _chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


_ITEM_COLS = "label, key, modality, path, caption, metadata"
_Row = tuple[int, str, str, Union[str, None], Union[str, None], str]


def _row_metadata(row: _Row, db: Path) -> dict[str, Any]:
    if not row[5] or row[5] == "{}":  # most items: no JSON parse per search hit
        return {}
    try:
        meta = json.loads(row[5])
    except (ValueError, TypeError) as exc:
        raise SearchIndexError(f"item store {db} is corrupt: the metadata of item {row[1]!r} is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise SearchIndexError(f"item store {db} is corrupt: the metadata of item {row[1]!r} is not a JSON object")
    return meta


def _row_to_item(row: _Row, db: Path) -> Item:
    return Item(key=row[1], modality=row[2], path=row[3], caption=row[4], metadata=_row_metadata(row, db))


# ---------------------------------------------------------------------------------------
# readers-writer lock


class _RWLock:
    """Many readers or one writer, inside one process.

    Writer-preferring: once a writer waits, new readers wait behind it, so a stream of
    queries cannot starve an add. The writing thread may take the write lock again and may
    read (both nest). A thread that holds a read lock may take it again even while a writer
    waits (it is counted once), but may not upgrade to the write lock (``RuntimeError``,
    a programming error inside this module).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding the read lock
        self._writer: int | None = None  # ident of the thread holding the write lock
        self._write_depth = 0
        self._writers_waiting = 0
        self._local = threading.local()  # per-thread read depth

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:  # the writer reads its own state
            yield
            return
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:
            self._write_depth += 1
            try:
                yield
            finally:
                self._write_depth -= 1
            return
        if getattr(self._local, "depth", 0):
            raise RuntimeError("a thread holding the index read lock cannot take the write lock")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
            self._write_depth = 1
        try:
            yield
        finally:
            with self._cond:
                self._write_depth = 0
                self._writer = None
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------


class Index:
    """An on-disk HNSW + SQLite vector index. Build one with :meth:`create`, load one with
    :meth:`open`; see the module docstring for the file layout and the durability rules."""

    def __init__(
        self,
        *,
        folder: Path,
        conn: sqlite3.Connection,
        hnsw: hnswlib.Index,
        dim: int,
        fingerprint: str,
        params: IndexParams,
        generation: int,
        next_label: int,
        count: int,
        readonly: bool,
        notes: list[str],
    ) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._folder = folder
        self._conn: sqlite3.Connection | None = conn
        self._hnsw: hnswlib.Index | None = hnsw
        self._dim = dim
        self._fingerprint = fingerprint
        self._params = params
        self._generation = generation
        self._next_label = next_label
        self._count = count
        self._readonly = readonly
        self._notes = notes
        self._in_tx = False
        self._pending = 0
        # Many readers (search, get, keys, vectors, check, info) or one writer (add, remove,
        # save, close). Readers share one SQLite connection, so their statements are
        # serialised by _db_lock (microseconds); hnswlib's knn_query runs in parallel.
        self._lock = _RWLock()
        self._db_lock = threading.Lock()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: PathLike,
        dim: int,
        fingerprint: str,
        params: IndexParams = IndexParams(),
        overwrite: bool = False,
    ) -> Index:
        """Create an empty index (generation 0) in folder ``path`` and open it for writing.

        The folder is created if needed. If it already holds index files, they are replaced
        only with ``overwrite=True`` (other files in the folder are left alone); otherwise
        :class:`SearchIndexError`. The empty index is on disk when this returns.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise UsageError(f"dim must be a positive integer, got {dim!r}")
        dim = int(dim)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise UsageError("fingerprint must be a non-empty string")
        if not isinstance(params, IndexParams):
            raise UsageError(f"params must be an IndexParams, got {type(params).__name__}")
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise SearchIndexError(f"index path {folder} exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            own = sorted(p.name for p in folder.iterdir()
                         if _OWN_RE.match(p.name) or _STRAY_RE.match(p.name))
        except OSError as exc:
            raise SearchIndexError(f"cannot create index folder {folder}: {exc}") from exc
        if own and not overwrite:
            raise SearchIndexError(
                f"{folder} already holds index files ({', '.join(own)}); "
                "pass overwrite=True to replace them"
            )
        # items.sqlite first: an interrupted overwrite leaves a folder that does not open.
        for name in sorted(own, key=lambda n: not n.startswith(ITEMS_DB)):
            _unlink_quietly(folder / name)

        try:
            hnsw = hnswlib.Index(space="ip", dim=dim)
            hnsw.init_index(max_elements=INITIAL_CAPACITY, M=params.M,
                            ef_construction=params.ef_construction, allow_replace_deleted=True)
            final = folder / _hnsw_name(0)
            tmp = final.with_name(final.name + ".tmp")
            hnsw.save_index(str(tmp))
            _fsync_file(tmp)
            os.replace(tmp, final)

            db_tmp = folder / (ITEMS_DB + ".tmp")
            _unlink_quietly(db_tmp)
            conn = sqlite3.connect(str(db_tmp), isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN")
                conn.execute(
                    "CREATE TABLE items (label INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, "
                    "modality TEXT, path TEXT, caption TEXT, metadata TEXT)"
                )
                conn.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
                meta = {
                    "schema_version": SCHEMA_VERSION, "generation": 0, "next_label": 0,
                    "dim": dim, "fingerprint": fingerprint, **params.to_dict(),
                }
                conn.executemany("INSERT INTO meta(k, v) VALUES (?, ?)",
                                 [(k, str(v)) for k, v in meta.items()])
                conn.execute("COMMIT")
            finally:
                conn.close()
            _fsync_file(db_tmp)
            os.replace(db_tmp, folder / ITEMS_DB)
            _fsync_dir(folder)
            _atomic_write_text(folder / INDEX_JSON, _index_json_text(
                dim, fingerprint, params, INITIAL_CAPACITY, 0, 0))
        except (OSError, RuntimeError, *_SQL_ERRORS) as exc:
            raise SearchIndexError(f"cannot create index in {folder}: {exc}") from exc
        logger.info("created index %s (dim %d, fingerprint %s)", folder, dim, fingerprint)
        return cls.open(folder, fingerprint=fingerprint)

    @classmethod
    def open(cls, path: PathLike, fingerprint: str | None = None, readonly: bool = False) -> Index:
        """Open the index in folder ``path``.

        ``fingerprint``, when given, must equal the index's (else :class:`SearchIndexError`
        naming both). ``readonly=True`` opens SQLite read-only and refuses changes. The
        generation comes from SQLite; a stale ``index.json`` is noted in :meth:`info` and, in a
        writable open, rewritten, together with the removal of orphan graph and temporary files.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise SearchIndexError(f"index folder {folder} does not exist")
        jpath = folder / INDEX_JSON
        doc = _read_index_json(jpath)
        db = folder / ITEMS_DB
        if not db.is_file():
            raise SearchIndexError(f"item store {db} is missing")
        conn = _connect(db, readonly)
        try:
            return cls._open_with(folder, conn, doc, fingerprint, readonly)
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except _SQL_ERRORS:
                pass
            conn.close()
            raise

    @classmethod
    def _open_with(
        cls,
        folder: Path,
        conn: sqlite3.Connection,
        doc: dict[str, Any],
        fingerprint: str | None,
        readonly: bool,
    ) -> Index:
        db = folder / ITEMS_DB
        jpath = folder / INDEX_JSON
        # A writable open tries to take the write lock without waiting, to repair the folder
        # safely; otherwise (or if another writer holds it) a read transaction pins the
        # generation while its graph file is loaded, so a concurrent save cannot delete it.
        locked = False
        try:
            if not readonly:
                conn.execute("PRAGMA busy_timeout=0")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    locked = True
                except sqlite3.OperationalError:
                    locked = False
                conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            if not locked:
                conn.execute("BEGIN")
            meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
            count = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        except _SQL_ERRORS as exc:
            hint = ""
            if readonly and (folder / (ITEMS_DB + "-journal")).exists():
                hint = " (an interrupted write left a journal: open it once without readonly)"
            raise SearchIndexError(f"cannot read item store {db}: {exc}{hint}") from exc

        def meta_int(key: str) -> int:
            try:
                return int(meta[key])
            except (KeyError, ValueError):
                raise SearchIndexError(f"item store {db}: meta '{key}' is missing or not an integer") from None

        generation = meta_int("generation")
        next_label = meta_int("next_label")
        dim = meta_int("dim")
        if "schema_version" in meta and meta["schema_version"] != str(SCHEMA_VERSION):
            raise SearchIndexError(
                f"item store {db} has schema_version {meta['schema_version']}; "
                f"this mmedge reads {SCHEMA_VERSION}"
            )
        fp = meta.get("fingerprint")
        if not fp:
            raise SearchIndexError(f"item store {db}: meta 'fingerprint' is missing")
        if dim != doc["dim"]:
            raise SearchIndexError(f"dim mismatch: {jpath} says {doc['dim']}, {db} says {dim}")
        if fp != doc["fingerprint"]:
            raise SearchIndexError(
                f"fingerprint mismatch inside the index: {jpath} says {doc['fingerprint']}, {db} says {fp}"
            )
        if fingerprint is not None and fingerprint != fp:
            raise SearchIndexError(
                f"index {folder} was built for embedding space {fp}, "
                f"but fingerprint {fingerprint} was requested"
            )
        try:
            params = IndexParams(
                M=int(meta.get("M", doc["M"])),
                ef_construction=int(meta.get("ef_construction", doc["ef_construction"])),
                ef=int(meta.get("ef", doc["ef"])),
            )
        except (ValueError, UsageError) as exc:
            raise SearchIndexError(f"item store {db}: bad index parameters: {exc}") from exc

        notes: list[str] = []
        if doc["generation"] != generation:
            notes.append(
                f"{INDEX_JSON} names generation {doc['generation']}, {ITEMS_DB} generation "
                f"{generation}; using {generation}"
            )

        hpath = folder / _hnsw_name(generation)
        finfo = _inspect_hnsw_file(hpath, dim)
        if finfo.M != params.M:
            raise SearchIndexError(f"HNSW file {hpath} has M={finfo.M}, {db} says M={params.M}")
        live = finfo.count - finfo.deleted
        if live != count:
            raise SearchIndexError(
                f"HNSW file {hpath} holds {live} live vectors but {db} has {count} items"
            )
        try:
            # the labels as one string from SQLite, parsed by numpy: about 3x faster than a
            # Python step per row (0.3 instead of 0.8 s for a million items)
            (joined,) = conn.execute("SELECT group_concat(label) FROM items").fetchone()
            rows = np.sort(np.fromstring(joined, dtype=np.int64, sep=",")) if joined else np.zeros(0, np.int64)
        except (sqlite3.Error, ValueError) as exc:
            raise SearchIndexError(f"cannot read item store {db}: {exc}") from exc
        if (rows < 0).any() or not np.array_equal(rows.astype(np.uint64), finfo.live_labels):
            only_db = np.setdiff1d(rows.astype(np.uint64), finfo.live_labels)
            only_graph = np.setdiff1d(finfo.live_labels, rows.astype(np.uint64))
            which = (f"label {int(only_db[0])} is in {db} but not live in the graph" if only_db.size
                     else f"label {int(only_graph[0])} is live in the graph but has no row in {db}")
            raise SearchIndexError(f"HNSW file {hpath} and {db} disagree: {which}")
        capacity = max(finfo.count, min(finfo.max_elements, 2 * finfo.count + INITIAL_CAPACITY), 16)
        hnsw = hnswlib.Index(space="ip", dim=dim)
        try:
            hnsw.load_index(str(hpath), max_elements=capacity, allow_replace_deleted=True)
        except (RuntimeError, MemoryError, ValueError) as exc:
            raise SearchIndexError(f"HNSW file {hpath} cannot be loaded: {exc}") from exc
        hnsw.set_ef(params.ef)
        if finfo.max_label >= next_label:
            notes.append(f"meta next_label {next_label} raised above the largest label {finfo.max_label}")
            logger.warning("index %s: next_label %d raised to %d", folder, next_label, finfo.max_label + 1)
            next_label = finfo.max_label + 1

        index = cls(folder=folder, conn=conn, hnsw=hnsw, dim=dim, fingerprint=fp, params=params,
                    generation=generation, next_label=next_label, count=count,
                    readonly=readonly, notes=notes)
        if locked:
            index._cleanup_files(generation)
            if (folder / (ITEMS_DB + "-journal")).exists():
                # A crash before SQLite synced its journal leaves a journal that is not hot;
                # SQLite ignores it, and a (no-op) write makes SQLite itself delete it.
                try:
                    conn.execute("INSERT OR REPLACE INTO meta(k, v) SELECT k, v FROM meta WHERE k = 'generation'")
                except _SQL_ERRORS as exc:
                    logger.debug("index %s: could not clear the stale journal: %s", folder, exc)
            if notes:
                try:
                    index._write_index_json()
                    notes.append(f"{INDEX_JSON} rewritten from {ITEMS_DB}")
                except OSError as exc:
                    logger.warning("could not rewrite %s: %s", jpath, exc)
        try:
            conn.execute("COMMIT")
        except _SQL_ERRORS as exc:
            raise SearchIndexError(f"cannot read item store {db}: {exc}") from exc
        logger.debug("opened index %s: generation %d, %d items", folder, generation, count)
        return index

    # -- properties ---------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def params(self) -> IndexParams:
        return self._params

    @property
    def path(self) -> Path:
        return self._folder

    @property
    def generation(self) -> int:
        """The last saved generation this object is based on."""
        return self._generation

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock.read():
            return bool(self._query("SELECT 1 FROM items WHERE key = ?", (key,)))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._count} items, generation {self._generation}"
        return f"Index({str(self._folder)!r}, dim={self._dim}, {state})"

    def __enter__(self) -> Index:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _need_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise UsageError(f"index {self._folder} is closed")
        return self._conn

    def _need_hnsw(self) -> hnswlib.Index:
        self._need_conn()
        assert self._hnsw is not None
        return self._hnsw

    def _need_writable(self, what: str) -> sqlite3.Connection:
        conn = self._need_conn()
        if self._readonly:
            raise UsageError(f"cannot {what}: index {self._folder} was opened readonly")
        return conn

    def _begin(self) -> None:
        """Start the write transaction (first change since open or the last save)."""
        if self._in_tx:
            return
        conn = self._need_conn()
        db = self._folder / ITEMS_DB
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise SearchIndexError(
                f"cannot write {db}: {exc} (is another writer holding the index?)"
            ) from exc
        except _SQL_ERRORS as exc:
            raise SearchIndexError(f"cannot write {db}: {exc}") from exc
        try:
            row = conn.execute("SELECT v FROM meta WHERE k = 'generation'").fetchone()
            on_disk = int(row[0]) if row else -1
        except (sqlite3.Error, ValueError) as exc:
            conn.execute("ROLLBACK")
            raise SearchIndexError(f"cannot read {db}: {exc}") from exc
        if on_disk != self._generation:
            conn.execute("ROLLBACK")
            raise SearchIndexError(
                f"index {self._folder} was saved by another writer (generation {on_disk}, this "
                f"object has {self._generation}); reopen it before changing it"
            )
        self._in_tx = True

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one SELECT and fetch all rows; safe from concurrent readers."""
        conn = self._need_conn()
        with self._db_lock:
            try:
                return conn.execute(sql, params).fetchall()
            except _SQL_ERRORS as exc:  # e.g. a damaged file: "database disk image is malformed"
                raise SearchIndexError(f"cannot read item store {self._folder / ITEMS_DB}: {exc}") from exc

    def _set_meta(self, key: str, value: object) -> None:
        self._need_conn().execute("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", (key, str(value)))

    def _labels_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in _chunks(keys, _SQL_CHUNK):
            q = f"SELECT key, label FROM items WHERE key IN ({','.join('?' * len(part))})"
            out.update((k, int(label)) for k, label in self._query(q, list(part)))
        return out

    def _rows_for_labels(self, labels: Sequence[int]) -> dict[int, _Row]:
        out: dict[int, _Row] = {}
        for part in _chunks(labels, _SQL_CHUNK):
            q = f"SELECT {_ITEM_COLS} FROM items WHERE label IN ({','.join('?' * len(part))})"
            out.update((int(r[0]), r) for r in self._query(q, list(part)))
        return out

    def _prepare_vectors(self, vectors: Any, rows: int | None, what: str) -> np.ndarray:
        """Validate and L2-normalise; returns a C-contiguous float32 (N, dim) array."""
        try:
            arr = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{what} must be a numeric array: {exc}") from exc
        if arr.ndim == 1 and (rows is None or rows == 1):
            arr = arr.reshape(1, -1)
        if arr.ndim != 2:
            raise UsageError(f"{what} must have shape (N, {self._dim}), got {arr.shape}")
        if arr.shape[1] != self._dim:
            raise UsageError(
                f"{what} have dimension {arr.shape[1]}, the index holds {self._dim}-dimensional vectors"
            )
        if rows is not None and arr.shape[0] != rows:
            raise UsageError(f"{rows} items but {arr.shape[0]} vectors")
        if arr.shape[0] == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        # squared norms in float64 (a float32 square cannot overflow there): NaN or infinity in
        # a row makes its sum non-finite, so one pass checks and normalises
        sq = np.einsum("ij,ij->i", arr, arr, dtype=np.float64)
        if not np.isfinite(sq).all():
            raise UsageError(f"{what} row {int(np.argmin(np.isfinite(sq)))} contains NaN or infinity")
        if (sq <= 1e-24).any():
            raise UsageError(f"{what} row {int(np.argmax(sq <= 1e-24))} is a zero vector")
        return (arr / np.sqrt(sq)[:, None]).astype(np.float32)

    @staticmethod
    def _item_row(item: Any, i: int) -> tuple[str, str, str | None, str | None, str]:
        if not isinstance(item, Item):
            raise UsageError(f"items[{i}] is a {type(item).__name__}, expected Item")
        if not isinstance(item.key, str) or not item.key:
            raise UsageError(f"items[{i}].key must be a non-empty string, got {item.key!r}")
        if item.modality not in MODALITIES:
            raise UsageError(f"items[{i}].modality must be one of {MODALITIES}, got {item.modality!r}")
        path = item.path
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if path is not None and not isinstance(path, str):
            raise UsageError(f"items[{i}].path must be a string or None, got {type(path).__name__}")
        if item.caption is not None and not isinstance(item.caption, str):
            raise UsageError(f"items[{i}].caption must be a string or None")
        if not isinstance(item.metadata, dict):
            raise UsageError(f"items[{i}].metadata must be a dict, got {type(item.metadata).__name__}")
        try:
            meta = json.dumps(item.metadata, allow_nan=False, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"items[{i}].metadata is not JSON-serialisable: {exc}") from exc
        return item.key, item.modality, path, item.caption, meta

    def _reserve(self, live_needed: int) -> None:
        hnsw = self._need_hnsw()
        cap = hnsw.get_max_elements()
        if live_needed <= cap:
            return
        new_cap = max(2 * cap, live_needed)
        logger.debug("index %s: growing HNSW capacity %d -> %d", self._folder, cap, new_cap)
        hnsw.resize_index(new_cap)

    # -- changes ------------------------------------------------------------------------

    def add(self, items: Sequence[Item], vectors: np.ndarray, upsert: bool = False) -> None:
        """Add ``items`` with their ``vectors`` (N, dim); pending until :meth:`save`.

        Vectors are L2-normalised; a wrong shape or dimension, NaN/inf or a zero vector raises
        :class:`UsageError`, as does an invalid item (empty key, unknown modality, metadata
        that is not JSON-serialisable). A key repeated in the batch or already in the index
        raises :class:`SearchIndexError`, unless ``upsert=True``: then the existing row and
        vector are replaced (the item gets a new label) and, within the batch, the last
        occurrence of a key wins. Nothing changes when an error is raised.
        """
        with self._lock.write():
            conn = self._need_writable("add items")
            if isinstance(items, (str, bytes, Item)):
                raise UsageError("items must be a sequence of Item")
            items = list(items)
            vecs = self._prepare_vectors(vectors, len(items), "vectors")
            if not items:
                return
            rows = [self._item_row(it, i) for i, it in enumerate(items)]
            last: dict[str, int] = {}
            for i, row in enumerate(rows):
                if row[0] in last and not upsert:
                    raise SearchIndexError(
                        f"key {row[0]!r} appears twice in the batch (items {last[row[0]]} and {i})"
                    )
                last[row[0]] = i
            if len(last) != len(rows):
                keep = sorted(last.values())
                rows = [rows[i] for i in keep]
                vecs = vecs[keep]
            existing = self._labels_for_keys([r[0] for r in rows])
            if existing and not upsert:
                first = next(r[0] for r in rows if r[0] in existing)
                raise SearchIndexError(
                    f"key {first!r} is already in the index ({len(existing)} of the batch's keys "
                    "are); pass upsert=True to replace"
                )
            hnsw = self._need_hnsw()
            self._begin()
            m = len(rows)
            labels = np.arange(self._next_label, self._next_label + m, dtype=np.uint64)
            old_labels = list(existing.values())
            self._next_label += m  # labels are never reused, even if this add fails
            conn.execute("SAVEPOINT mmedge_add")
            marked: list[int] = []
            try:
                if old_labels:
                    conn.executemany("DELETE FROM items WHERE label = ?", [(x,) for x in old_labels])
                conn.executemany(
                    f"INSERT INTO items({_ITEM_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
                    [(int(label), *row) for label, row in zip(labels, rows)],
                )
                self._set_meta("next_label", self._next_label)
                # Add before deleting the old vectors so that replacement can only reuse
                # slots freed by earlier removals: the old vectors stay restorable.
                self._reserve(self._count + m)
                hnsw.add_items(vecs, labels, replace_deleted=True)
                for label in old_labels:
                    hnsw.mark_deleted(label)
                    marked.append(label)
            except BaseException as exc:
                self._undo_add(labels, marked)
                if isinstance(exc, (*_SQL_ERRORS, RuntimeError, MemoryError)):
                    raise SearchIndexError(f"adding {m} items failed: {exc}") from exc
                raise
            conn.execute("RELEASE mmedge_add")
            self._count += m - len(old_labels)
            self._pending += m
            logger.debug("index %s: added %d items (%d replaced)", self._folder, m, len(old_labels))

    def _undo_add(self, labels: np.ndarray, marked: list[int]) -> None:
        conn = self._need_conn()
        hnsw = self._need_hnsw()
        try:
            conn.execute("ROLLBACK TO mmedge_add")
            conn.execute("RELEASE mmedge_add")
            self._set_meta("next_label", self._next_label)
        except _SQL_ERRORS as exc:  # pragma: no cover - SQLite failing twice
            logger.error("index %s: rollback of a failed add failed: %s", self._folder, exc)
        for label in marked:
            hnsw.unmark_deleted(label)
        present = set(int(x) for x in hnsw.get_ids_list())
        for label in labels:
            if int(label) in present:
                try:
                    hnsw.mark_deleted(int(label))
                except RuntimeError:
                    pass

    def remove(self, keys: Sequence[str], missing_ok: bool = False) -> int:
        """Remove the items with these keys; pending until :meth:`save`. Returns how many were
        removed. A key not in the index raises :class:`SearchIndexError` (and nothing is
        removed) unless ``missing_ok=True``."""
        with self._lock.write():
            conn = self._need_writable("remove items")
            if isinstance(keys, (str, bytes)):
                raise UsageError("keys must be a sequence of str, not a single string")
            keys = list(dict.fromkeys(keys))
            for k in keys:
                if not isinstance(k, str):
                    raise UsageError(f"keys must be strings, got {type(k).__name__}")
            found = self._labels_for_keys(keys)
            missing = [k for k in keys if k not in found]
            if missing and not missing_ok:
                raise SearchIndexError(
                    f"{len(missing)} key(s) not in the index, e.g. {missing[0]!r}; nothing removed"
                )
            if not found:
                return 0
            hnsw = self._need_hnsw()
            self._begin()
            conn.execute("SAVEPOINT mmedge_remove")
            marked: list[int] = []
            try:
                conn.executemany("DELETE FROM items WHERE label = ?", [(x,) for x in found.values()])
                for label in found.values():
                    hnsw.mark_deleted(label)
                    marked.append(label)
            except BaseException as exc:
                conn.execute("ROLLBACK TO mmedge_remove")
                conn.execute("RELEASE mmedge_remove")
                for label in marked:
                    hnsw.unmark_deleted(label)
                if isinstance(exc, (*_SQL_ERRORS, RuntimeError)):
                    raise SearchIndexError(f"removing {len(found)} items failed: {exc}") from exc
                raise
            conn.execute("RELEASE mmedge_remove")
            self._count -= len(found)
            self._pending += len(found)
            logger.debug("index %s: removed %d items", self._folder, len(found))
            return len(found)

    # -- reads --------------------------------------------------------------------------

    def get(self, key: str) -> Item | None:
        """The item stored under ``key`` (pending changes included), or None."""
        with self._lock.read():
            rows = self._query(f"SELECT {_ITEM_COLS} FROM items WHERE key = ?", (key,))
            return _row_to_item(rows[0], self._folder / ITEMS_DB) if rows else None

    def keys(self) -> list[str]:
        """All keys, in insertion (label) order."""
        with self._lock.read():
            return [r[0] for r in self._query("SELECT key FROM items ORDER BY label")]

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        """The stored (normalised) vectors of ``keys`` as float32 (len(keys), dim); an unknown
        key raises :class:`SearchIndexError`."""
        with self._lock.read():
            if isinstance(keys, (str, bytes)):
                raise UsageError("keys must be a sequence of str, not a single string")
            keys = list(keys)
            hnsw = self._need_hnsw()
            found = self._labels_for_keys(list(dict.fromkeys(keys)))
            missing = [k for k in keys if k not in found]
            if missing:
                raise SearchIndexError(f"{len(missing)} key(s) not in the index, e.g. {missing[0]!r}")
            if not keys:
                return np.zeros((0, self._dim), dtype=np.float32)
            try:
                out = np.asarray(hnsw.get_items([found[k] for k in keys]), dtype=np.float32)
            except RuntimeError as exc:
                raise SearchIndexError(f"index {self._folder} is inconsistent: {exc}") from exc
            return out.reshape(len(keys), self._dim)

    def search(self, vectors: np.ndarray, k: int = 10, ef: int | None = None) -> list[list[Hit]]:
        """Nearest items by cosine similarity for each query.

        ``vectors`` is (Q, dim) or (dim,); queries are L2-normalised. Returns one list per query,
        best first, of at most ``min(k, len(self))`` hits. ``ef`` (default ``params.ef``) is
        raised to at least ``k``. ``k <= 0`` or ``k > MAX_K`` raises :class:`UsageError`.
        Pending (unsaved) changes are searched too.

        Thread-safe: searches run in parallel under the read lock and see the state left by
        the last :meth:`add` / :meth:`remove` call that completed before they started. A
        search whose beam differs from ``params.ef`` (``ef`` given, or ``k`` above it) has to
        set hnswlib's shared ``ef`` and therefore runs alone, under the write lock.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise UsageError(f"k must be a positive integer, got {k!r}")
        if k > MAX_K:
            raise UsageError(f"k = {k} is over the limit of {MAX_K} (MAX_K)")
        if ef is not None and (isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef <= 0):
            raise UsageError(f"ef must be a positive integer, got {ef!r}")
        if ef is not None and ef > MAX_K:
            raise UsageError(f"ef = {ef} is over the limit of {MAX_K} (MAX_K)")
        with self._lock.read():
            q = self._prepare_vectors(vectors, None, "query vectors")
            if q.shape[0] == 0:
                return []
            beam = self._beam(k, ef)
            if beam is None or beam == self._params.ef:
                return self._search_locked(q, k, beam)
        with self._lock.write():  # another beam: hnswlib's ef is shared state
            return self._search_locked(q, k, self._beam(k, ef))

    def _beam(self, k: int, ef: int | None) -> int | None:
        """The ``ef`` a search of ``k`` needs now; None for an empty index."""
        if self._count == 0:
            return None
        return max(int(ef or self._params.ef), min(int(k), self._count))

    def _search_locked(self, q: np.ndarray, k: int, beam: int | None) -> list[list[Hit]]:
        self._need_conn()
        if beam is None or self._count == 0:
            return [[] for _ in range(q.shape[0])]
        kk = min(int(k), self._count)
        labels, scores = self._knn(q, kk, beam)
        # plain Python numbers and one Path: per-hit numpy scalars and Path joins were a
        # measurable share of a single query's time
        labels, scores = labels.tolist(), scores.tolist()
        rows = self._rows_for_labels(sorted({int(x) for row in labels for x in row}))
        out: list[list[Hit]] = []
        dropped = 0
        db = self._folder / ITEMS_DB
        for qi in range(q.shape[0]):
            hits: list[Hit] = []
            for label, score in zip(labels[qi], scores[qi]):
                row = rows.get(int(label))
                if row is None:
                    dropped += 1
                    continue
                hits.append(Hit(key=row[1], score=float(score), modality=row[2], path=row[3],
                                caption=row[4], metadata=_row_metadata(row, db)))
            out.append(hits)
        if dropped:
            logger.debug("index %s: dropped %d hits whose items were removed", self._folder, dropped)
        return out

    def _knn(self, q: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray]:
        hnsw = self._need_hnsw()
        own_beam = ef != self._params.ef  # only under the write lock (see search)
        if own_beam:
            hnsw.set_ef(ef)
        try:
            labels, dist = hnsw.knn_query(q, k=k)
            return labels, 1.0 - dist
        except RuntimeError as exc:
            # hnswlib could not find k live neighbours (tiny or heavily deleted graph).
            logger.debug("index %s: hnswlib search failed (%s); exact search", self._folder, exc)
        finally:
            if own_beam:
                hnsw.set_ef(self._params.ef)
        return self._exact_search(q, k)

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        hnsw = self._need_hnsw()
        in_graph = set(int(x) for x in hnsw.get_ids_list())
        live = [r[0] for r in self._query("SELECT label FROM items ORDER BY label") if r[0] in in_graph]
        nq = q.shape[0]
        best_l = np.zeros((nq, 0), dtype=np.uint64)
        best_s = np.zeros((nq, 0), dtype=np.float32)
        for part in _chunks(live, _VEC_CHUNK):
            try:
                v = np.asarray(hnsw.get_items(list(part)), dtype=np.float32).reshape(len(part), self._dim)
            except RuntimeError as exc:
                raise SearchIndexError(f"index {self._folder} is inconsistent: {exc}") from exc
            s = np.concatenate([best_s, q @ v.T], axis=1)
            lab = np.concatenate([best_l, np.broadcast_to(np.asarray(part, dtype=np.uint64), (nq, len(part)))], axis=1)
            top = min(k, s.shape[1])
            idx = np.argpartition(-s, top - 1, axis=1)[:, :top]
            best_s = np.take_along_axis(s, idx, axis=1)
            best_l = np.take_along_axis(lab, idx, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_l, order, axis=1), np.take_along_axis(best_s, order, axis=1)

    # -- persistence --------------------------------------------------------------------

    def save(self) -> None:
        """Make the pending changes durable, atomically (see the module docstring).

        Steps: (1) graph to ``hnsw.<g+1>.bin.tmp``, fsync, rename; (2) SQLite ``generation =
        g+1`` and COMMIT, the commit point; (3) ``index.json`` by temp file and ``os.replace``;
        (4) delete ``hnsw.<g>.bin`` and stray temporary files. A failure in (1) or (2) raises
        :class:`SearchIndexError` and keeps the changes pending (save can be retried); failures
        in (3) and (4) only log a warning, as the save is already durable. Without pending
        changes this does nothing.
        """
        with self._lock.write():
            conn = self._need_writable("save")
            hnsw = self._need_hnsw()
            if not self._in_tx:
                return
            new_gen = self._generation + 1
            final = self._folder / _hnsw_name(new_gen)
            tmp = final.with_name(final.name + ".tmp")
            try:
                hnsw.save_index(str(tmp))
                _fsync_file(tmp)
                os.replace(tmp, final)
                _fsync_dir(self._folder)
            except (OSError, RuntimeError) as exc:
                _unlink_quietly(tmp)
                raise SearchIndexError(f"cannot write HNSW file {final}: {exc}") from exc
            try:
                self._commit_generation(new_gen)
            except _SQL_ERRORS as exc:
                if conn.in_transaction:
                    raise SearchIndexError(
                        f"cannot commit {self._folder / ITEMS_DB}: {exc}; the changes are still "
                        "pending, save() can be retried"
                    ) from exc
                # SQLite rolled the transaction back: the in-memory graph no longer matches.
                self._in_tx = False
                self.close()
                raise SearchIndexError(
                    f"cannot commit {self._folder / ITEMS_DB}: {exc}; the pending changes are "
                    "lost and the index was closed, reopen it"
                ) from exc
            old_gen = self._generation
            self._generation = new_gen
            self._in_tx = False
            self._pending = 0
            self._notes = []
            try:
                self._write_index_json()
            except OSError as exc:
                self._notes.append(f"{INDEX_JSON} could not be written: {exc}")
                logger.warning("index %s saved, but %s could not be written: %s",
                               self._folder, INDEX_JSON, exc)
            self._cleanup_files(new_gen)
            logger.debug("index %s: saved generation %d (was %d)", self._folder, new_gen, old_gen)

    def _commit_generation(self, generation: int) -> None:
        """Step 2 of :meth:`save`: the commit point."""
        conn = self._need_conn()
        self._set_meta("generation", generation)
        conn.execute("COMMIT")

    def _write_index_json(self) -> None:
        hnsw = self._need_hnsw()
        _atomic_write_text(self._folder / INDEX_JSON, _index_json_text(
            self._dim, self._fingerprint, self._params, hnsw.get_max_elements(),
            self._count, self._generation))

    def _cleanup_files(self, keep_generation: int) -> None:
        try:
            names = [p.name for p in self._folder.iterdir()]
        except OSError as exc:
            logger.warning("could not list %s: %s", self._folder, exc)
            return
        for name in names:
            m = _HNSW_RE.match(name)
            if (m and int(m.group(1)) != keep_generation) or _STRAY_RE.match(name):
                logger.debug("index %s: deleting %s", self._folder, name)
                _unlink_quietly(self._folder / name)

    def close(self) -> None:
        """Release the index. Pending changes not saved are discarded (logged as a warning).
        Closing twice is allowed."""
        with self._lock.write():
            conn = self._conn
            if conn is None:
                return
            try:
                if conn.in_transaction:
                    if self._pending:
                        logger.warning("index %s closed with %d unsaved changes; discarded",
                                       self._folder, self._pending)
                    conn.execute("ROLLBACK")
            except _SQL_ERRORS as exc:
                logger.warning("index %s: rollback on close failed: %s", self._folder, exc)
            finally:
                conn.close()
                self._conn = None
                self._hnsw = None
                self._in_tx = False
                self._pending = 0

    # -- diagnostics --------------------------------------------------------------------

    def check(self) -> None:
        """Verify SQLite's own structure (``PRAGMA quick_check``), that every live HNSW label has
        its SQLite row and the reverse, that stored vectors are unit length and that
        ``next_label`` is above every label. Raises
        :class:`SearchIndexError` describing the first mismatch."""
        with self._lock.read():
            hnsw = self._need_hnsw()
            db = self._folder / ITEMS_DB
            problems = [r[0] for r in self._query("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise SearchIndexError(f"item store {db} is corrupt: {'; '.join(map(str, problems[:3]))}")
            rows = self._query("SELECT label, key FROM items ORDER BY label")
            in_graph = set(int(x) for x in hnsw.get_ids_list())
            row_labels = set()
            for label, key in rows:
                if label not in in_graph:
                    raise SearchIndexError(
                        f"item {key!r} (label {label}) is in {db} but not in the HNSW graph"
                    )
                row_labels.add(label)
            for part in _chunks(rows, _VEC_CHUNK):
                try:
                    v = np.asarray(hnsw.get_items([r[0] for r in part]), dtype=np.float32)
                except RuntimeError:
                    for label, key in part:
                        try:
                            hnsw.get_items([label])
                        except RuntimeError:
                            raise SearchIndexError(
                                f"item {key!r} (label {label}) is in {db} but deleted in the HNSW graph"
                            ) from None
                    raise  # pragma: no cover - batch failed but no single label did
                norms = np.linalg.norm(v.reshape(len(part), self._dim), axis=1)
                bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
                if bad.size:
                    label, key = part[int(bad[0])]
                    raise SearchIndexError(
                        f"item {key!r} (label {label}) has a vector of norm {norms[bad[0]]:.6f}, not 1"
                    )
            for label in sorted(in_graph - row_labels):
                try:
                    hnsw.get_items([label])
                except RuntimeError:
                    continue  # deleted, as it should be
                raise SearchIndexError(f"HNSW label {label} is live but has no row in {db}")
            if len(rows) != self._count:
                raise SearchIndexError(f"{db} has {len(rows)} items, the index counts {self._count}")
            if in_graph and max(in_graph) >= self._next_label:
                raise SearchIndexError(
                    f"next_label {self._next_label} is not above the largest label {max(in_graph)}"
                )

    def info(self) -> dict[str, Any]:
        """A summary: dim, count, fingerprint, params, generation, capacity, pending changes,
        bytes on disk per file and notes (e.g. a stale ``index.json`` that was overridden)."""
        with self._lock.read():
            hnsw = self._need_hnsw()
            files: dict[str, int] = {}
            for name in (INDEX_JSON, ITEMS_DB, _hnsw_name(self._generation)):
                try:
                    files[name] = (self._folder / name).stat().st_size
                except OSError:
                    pass
            return {
                "path": str(self._folder),
                "dim": self._dim,
                "count": self._count,
                "fingerprint": self._fingerprint,
                "params": self._params.to_dict(),
                "space": "ip",
                "generation": self._generation,
                "max_elements": hnsw.get_max_elements(),
                "element_slots": hnsw.get_current_count(),
                "next_label": self._next_label,
                "unsaved_changes": self._pending,
                "readonly": self._readonly,
                "files": files,
                "notes": list(self._notes),
            }


# ---------------------------------------------------------------------------------------
# index.json


def _index_json_text(
    dim: int, fingerprint: str, params: IndexParams, max_elements: int, count: int, generation: int
) -> str:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "dim": dim,
        "space": "ip",
        "fingerprint": fingerprint,
        **params.to_dict(),
        "max_elements": max_elements,
        "count": count,
        "generation": generation,
        "hnsw_file": _hnsw_name(generation),
    }
    return json.dumps(doc, indent=2) + "\n"


def _read_index_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SearchIndexError(f"index description {path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchIndexError(f"cannot read {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SearchIndexError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SearchIndexError(f"{path} must hold a JSON object")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SearchIndexError(
            f"{path} has schema_version {version!r}; this mmedge reads {SCHEMA_VERSION}"
        )
    if doc.get("space") != "ip":
        raise SearchIndexError(f"{path} has space {doc.get('space')!r}; only 'ip' is supported")
    for key in ("dim", "M", "ef_construction", "ef", "generation"):
        if isinstance(doc.get(key), bool) or not isinstance(doc.get(key), int):
            raise SearchIndexError(f"{path}: '{key}' is missing or not an integer")
    if not isinstance(doc.get("fingerprint"), str):
        raise SearchIndexError(f"{path}: 'fingerprint' is missing or not a string")
    return doc



# ---------------------------------------------------------------------------------------
# moving a finished index into place


def install_index(src: PathLike, dst: PathLike, overwrite: bool = False) -> None:
    """Move the (closed, saved) index in folder ``src`` to folder ``dst``.

    Used to build an index out of sight and publish it only when it is complete. If ``dst``
    does not exist, ``src`` is renamed to it (atomic). If ``dst`` exists it must be a folder
    and, when it holds index files, ``overwrite=True`` is needed (else
    :class:`SearchIndexError`, nothing moved); its index files are then replaced, its other
    files left alone, and ``src`` is removed. ``src`` and ``dst`` should be on the same file
    system (siblings).
    """
    src_dir, dst_dir = Path(src), Path(dst)
    if not (src_dir / ITEMS_DB).is_file():
        raise SearchIndexError(f"{src_dir} holds no index to install")
    try:
        if not dst_dir.exists():
            os.rename(src_dir, dst_dir)
            _fsync_dir(dst_dir.parent)
            return
        if not dst_dir.is_dir():
            raise SearchIndexError(f"index path {dst_dir} exists and is not a folder")
        old = [p.name for p in dst_dir.iterdir() if _OWN_RE.match(p.name) or _STRAY_RE.match(p.name)]
        if old and not overwrite:
            raise SearchIndexError(
                f"{dst_dir} already holds index files ({', '.join(sorted(old))}); "
                "pass overwrite=True to replace them"
            )
        # items.sqlite goes first and comes back last: in between the folder does not open.
        for name in sorted(old, key=lambda n: not n.startswith(ITEMS_DB)):
            _unlink_quietly(dst_dir / name)
        new = [p.name for p in src_dir.iterdir()]
        for name in sorted(new, key=lambda n: n == ITEMS_DB):
            os.replace(src_dir / name, dst_dir / name)
        _fsync_dir(dst_dir)
        src_dir.rmdir()
    except OSError as exc:
        raise SearchIndexError(f"cannot move the index from {src_dir} to {dst_dir}: {exc}") from exc
