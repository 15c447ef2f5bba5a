"""Concurrency: one Retriever shared by 8 query threads while a writer adds, upserts, removes
and saves. Every concurrent result is compared with a serial replay of the same operations:
a query that ran while no change was in progress must equal the serial result of that exact
state; one that overlapped changes must equal the serial result of one of the states it
overlapped (never a mix of two). Plus unit tests of the readers-writer lock itself."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_bundle import CORPUS, make_tiny_bundle, sample_png

from mmedge.runtime import Bundle, Index, IndexParams, Item, Retriever
from mmedge.runtime.index import _RWLock

N_READERS = 8
QUERIES_PER_READER = 120
PARAMS = IndexParams(M=8, ef_construction=40, ef=16)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return Bundle.load(make_tiny_bundle(tmp_path_factory.mktemp("conc") / "bundle"))


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plan_ops(dim: int, initial: list[str], n_ops: int = 36) -> list[tuple[str, Any]]:
    """A deterministic list of changes; hnswlib adds at most 8 rows per call, so that it adds
    them on one thread and a replay builds the identical graph."""
    rng = np.random.default_rng(77)
    words = " ".join(CORPUS).split()
    live = list(initial)
    ops: list[tuple[str, Any]] = []
    for j in range(n_ops):
        kind = ("vectors", "remove", "texts", "upsert", "remove", "save")[j % 6]
        if kind == "vectors":
            keys = [f"a{j}-{i}" for i in range(8)]
            ops.append((kind, (keys, unit(rng, 8, dim))))
            live += keys
        elif kind == "texts":
            texts = [" ".join(rng.choice(words, size=4)) for _ in range(3)]
            keys = [f"t{j}-{i}" for i in range(3)]
            ops.append((kind, (keys, texts)))
            live += keys
        elif kind == "upsert":
            keys = [str(k) for k in rng.choice(live, size=2, replace=False)]
            ops.append((kind, (keys, unit(rng, 2, dim))))
        elif kind == "remove":
            keys = [str(k) for k in rng.choice(live, size=4, replace=False)]
            ops.append((kind, keys))
            live = [k for k in live if k not in keys]
        else:
            ops.append((kind, None))
    return ops


def apply_op(r: Retriever, op: tuple[str, Any]) -> None:
    kind, arg = op
    if kind == "vectors":
        keys, vecs = arg
        r.index.add([Item(key=k, metadata={"op": kind}) for k in keys], vecs)
    elif kind == "texts":
        keys, texts = arg
        r.add_texts(texts, keys=keys)
    elif kind == "upsert":
        keys, vecs = arg
        r.index.add([Item(key=k, metadata={"op": kind}) for k in keys], vecs, upsert=True)
    elif kind == "remove":
        assert r.remove(arg) == len(arg)
    else:
        r.save()


def make_queries(dim: int) -> list[tuple[str, Any, int]]:
    rng = np.random.default_rng(5)
    qs: list[tuple[str, Any, int]] = [("vector", v, (5, 10, 20)[i % 3]) for i, v in enumerate(unit(rng, 12, dim))]
    qs += [("text", t, 5) for t in CORPUS[:4]]
    qs += [("image", sample_png(300 + i), 5) for i in range(2)]
    return qs  # k=20 is above ef=16: those searches take the exclusive path


def run_query(r: Retriever, q: tuple[str, Any, int]) -> list[tuple[str, float]]:
    kind, payload, k = q
    if kind == "vector":
        hits = r.search_vectors(payload, k=k)[0]
    elif kind == "text":
        hits = r.search(text=payload, k=k)
    else:
        hits = r.search(image=payload, k=k)
    return [(h.key, h.score) for h in hits]


def same(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b))


def test_eight_readers_one_writer_match_a_serial_replay(bundle: Bundle, tmp_path: Path) -> None:
    dim = bundle.dim
    rng = np.random.default_rng(3)
    initial = [f"v{i}" for i in range(160)]
    with Index.create(tmp_path / "start", dim, bundle.fingerprint, PARAMS) as idx:
        vecs = unit(rng, len(initial), dim)
        for s in range(0, len(initial), 8):
            idx.add([Item(key=k) for k in initial[s:s + 8]], vecs[s:s + 8])
        idx.save()
    shutil.copytree(tmp_path / "start", tmp_path / "serial")
    ops = plan_ops(dim, initial)
    queries = make_queries(dim)

    # -- concurrent run ----------------------------------------------------------------
    r = Retriever(bundle, tmp_path / "start", providers="cpu", threads=1)
    counters = {"started": 0, "done": 0}
    stop = threading.Event()
    records: list[list[tuple[int, int, int, list[tuple[str, float]]]]] = [[] for _ in range(N_READERS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(N_READERS + 1)

    def reader(t: int) -> None:
        qrng = np.random.default_rng(1000 + t)
        try:
            barrier.wait()
            for _ in range(QUERIES_PER_READER):
                qi = int(qrng.integers(len(queries)))
                done_before = counters["done"]
                result = run_query(r, queries[qi])
                started_after = counters["started"]
                records[t].append((qi, done_before, started_after, result))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def writer() -> None:
        try:
            barrier.wait()
            for j, op in enumerate(ops, start=1):
                counters["started"] = j
                apply_op(r, op)
                counters["done"] = j
                time.sleep(0.002)  # let readers see each state
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(N_READERS)]
    threads.append(threading.Thread(target=writer))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads), "a thread hung (deadlock?)"
    assert not errors, errors
    r.index.check()
    final_keys = sorted(r.index.keys())
    r.save()
    r.index.close()

    # -- serial replay: the expected result of every query in every state ----------------
    serial = Retriever(bundle, tmp_path / "serial", providers="cpu", threads=1)
    expected = [[run_query(serial, q) for q in queries]]
    for op in ops:
        apply_op(serial, op)
        expected.append([run_query(serial, q) for q in queries])
    assert sorted(serial.index.keys()) == final_keys
    serial.index.close()
    distinct = {tuple(k for k, _ in expected[j][0]) for j in range(len(expected))}
    assert len(distinct) > 5, "the writer's changes should change the results"

    # -- every concurrent result equals the serial result of a state it overlapped --------
    exact = overlapped = 0
    for t, recs in enumerate(records):
        assert len(recs) == QUERIES_PER_READER
        for qi, lo, hi, result in recs:
            assert lo <= hi
            states = range(lo, hi + 1)
            assert any(same(result, expected[j][qi]) for j in states), (t, qi, lo, hi, result)
            if lo == hi:
                exact += 1
            else:
                overlapped += 1
    assert exact > 0
    assert exact + overlapped == N_READERS * QUERIES_PER_READER


# ---------------------------------------------------------------------------------------
# the lock itself


def test_rwlock_readers_share_writers_exclude() -> None:
    lock = _RWLock()
    inside = threading.Semaphore(0)
    release = threading.Event()
    active = []

    def read() -> None:
        with lock.read():
            active.append(1)
            inside.release()
            release.wait(5)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for th in readers:
        th.start()
    for _ in range(3):
        assert inside.acquire(timeout=5)  # all three readers are inside at the same time
    got_write = threading.Event()

    def write() -> None:
        with lock.write():
            got_write.set()

    w = threading.Thread(target=write)
    w.start()
    time.sleep(0.05)
    assert not got_write.is_set()  # a writer waits for the readers
    late_reader_in = threading.Event()

    def late_read() -> None:
        with lock.read():
            late_reader_in.set()

    late = threading.Thread(target=late_read)
    late.start()
    time.sleep(0.05)
    assert not late_reader_in.is_set()  # a waiting writer goes before new readers
    release.set()
    assert got_write.wait(5) and late_reader_in.wait(5)
    for th in [*readers, w, late]:
        th.join(5)


def test_rwlock_reentrancy_rules() -> None:
    lock = _RWLock()
    with lock.write():
        with lock.write():  # the writer may re-enter
            with lock.read():  # and read its own state
                pass
    with lock.read():
        with lock.read():  # nested reads
            pass
        with pytest.raises(RuntimeError, match="read lock"):
            with lock.write():  # no upgrade
                pass
    with lock.write():  # the lock is free again
        pass


def test_close_waits_for_running_searches(bundle: Bundle, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    idx = Index.create(tmp_path / "i", bundle.dim, bundle.fingerprint, PARAMS)
    idx.add([Item(key=f"k{i}") for i in range(8)], unit(rng, 8, bundle.dim))
    idx.save()
    q = unit(rng, 64, bundle.dim)
    errors: list[BaseException] = []
    results: list[int] = []

    def searcher() -> None:
        try:
            for _ in range(50):
                results.append(len(idx.search(q, k=3)))
        except Exception as exc:  # noqa: BLE001 - after close: UsageError only
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(0.01)
    idx.close()
    for th in threads:
        th.join(10)
    from mmedge.errors import UsageError

    assert all(isinstance(e, UsageError) and "closed" in str(e) for e in errors), errors
    assert all(n == 64 for n in results)
