"""Approximate-nearest-neighbour libraries for benchmarks/perf.py, behind one small interface.

Each adapter builds an inner-product index over unit vectors with ``build_threads`` threads,
then answers one query at a time on one thread (what an on-device query does), with a
search-breadth knob (``ef`` for hnswlib, ``efSearch`` for faiss HNSW, ``expansion_search``
for usearch). Peers are optional imports (the ``bench`` extra).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return 0


class Adapter:
    library = ""
    name = ""
    knob = "ef"

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.build_s = 0.0
        self.build_rss_bytes = 0

    def build(self, x: np.ndarray, threads: int) -> None:
        gc.collect()
        before = _rss_bytes()
        t = time.perf_counter()
        self._build(x, threads)
        self.build_s = time.perf_counter() - t
        self.build_rss_bytes = max(0, _rss_bytes() - before)
        self.n = len(x)

    def _build(self, x: np.ndarray, threads: int) -> None:
        raise NotImplementedError

    def set_knob(self, value: int) -> None:
        raise NotImplementedError

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        """One query ``(1, d)`` -> ids ``(k,)``."""
        raise NotImplementedError

    def bytes(self) -> int:
        """Serialised size of the index (vectors and graph)."""
        raise NotImplementedError

    def label(self) -> str:
        return self.name + "(" + ", ".join(f"{k}={v}" for k, v in self.params.items()) + ")"


class Hnswlib(Adapter):
    library = "hnswlib"
    name = "hnswlib"

    def _build(self, x: np.ndarray, threads: int) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=x.shape[1])
        self.index.init_index(max_elements=len(x), M=self.params["M"], ef_construction=self.params["ef_construction"])
        self.index.set_num_threads(threads)
        self.index.add_items(x, np.arange(len(x)))
        self.index.set_num_threads(1)

    def set_knob(self, value: int) -> None:
        self.index.set_ef(value)

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.knn_query(q, k=k, num_threads=1)[0][0]

    def bytes(self) -> int:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "h.bin"
            self.index.save_index(str(p))
            return p.stat().st_size


class FaissHNSW(Adapter):
    library = "faiss"
    name = "faiss-hnsw"

    def _build(self, x: np.ndarray, threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexHNSWFlat(x.shape[1], self.params["M"], faiss.METRIC_INNER_PRODUCT)
        if "ef_construction" in self.params:  # else faiss's default (40)
            self.index.hnsw.efConstruction = self.params["ef_construction"]
        self.index.add(x)
        faiss.omp_set_num_threads(1)

    def set_knob(self, value: int) -> None:
        self.index.hnsw.efSearch = value

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(q, k)[1][0]

    def bytes(self) -> int:
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def label(self) -> str:
        if "ef_construction" not in self.params:
            return f"faiss-hnsw(M={self.params['M']}, default ef_construction)"
        return super().label()


class FaissFlat(Adapter):
    library = "faiss"
    name = "faiss-flat"
    knob = ""

    def _build(self, x: np.ndarray, threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(threads)
        self.index = faiss.IndexFlatIP(x.shape[1])
        self.index.add(x)
        faiss.omp_set_num_threads(1)

    def set_knob(self, value: int) -> None:
        pass

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(q, k)[1][0]

    def bytes(self) -> int:
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)


class Usearch(Adapter):
    library = "usearch"
    name = "usearch"
    knob = "expansion_search"

    def _build(self, x: np.ndarray, threads: int) -> None:
        from usearch.index import Index

        kw = {"ndim": x.shape[1], "metric": "ip", "dtype": self.params.get("dtype", "f32")}
        if "M" in self.params:  # else usearch's own defaults (connectivity 16, expansion_add 128)
            kw.update(connectivity=self.params["M"], expansion_add=self.params["ef_construction"])
        self.index = Index(**kw)
        self.index.add(np.arange(len(x)), x, threads=threads)

    def set_knob(self, value: int) -> None:
        self.index.expansion_search = value

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(self.index.search(q[0], k, threads=1).keys)

    def bytes(self) -> int:
        return len(self.index.save())

    def label(self) -> str:
        if "M" not in self.params:
            return "usearch(defaults" + "".join(f", {k}={v}" for k, v in self.params.items()) + ")"
        return super().label()


class NumpyExact(Adapter):
    library = "numpy"
    name = "numpy-exact"
    knob = ""

    def _build(self, x: np.ndarray, threads: int) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)

    def set_knob(self, value: int) -> None:
        pass

    def query(self, q: np.ndarray, k: int) -> np.ndarray:
        s = self.x @ q[0]
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top])]

    def bytes(self) -> int:
        return int(self.x.nbytes)


def available(name: str) -> bool:
    try:
        __import__({"faiss": "faiss", "usearch": "usearch.index", "hnswlib": "hnswlib", "numpy": "numpy"}[name])
        return True
    except ImportError:
        return False


def measure(adapter: Adapter, queries: np.ndarray, truth: np.ndarray, knobs: list[int], k: int = 10,
            warmup: int = 50) -> list[dict[str, Any]]:
    """Recall@k and single-query latency of ``adapter`` at each knob value."""
    from mmedge.runtime.benchmark import summarize
    from perf_data import recall_at_k

    rows = []
    for knob in knobs or [0]:
        adapter.set_knob(knob)
        for q in queries[:warmup]:
            adapter.query(q[None], k)
        found, times = [], []
        clock = time.perf_counter_ns
        for q in queries:
            q1 = q[None]
            t = clock()
            ids = adapter.query(q1, k)
            times.append(clock() - t)
            found.append(ids)
        lat = summarize(np.asarray(times) / 1e9)
        rows.append({"knob": knob, "recall_at_10": recall_at_k(found, truth), **lat,
                     "qps": 1.0 / max(lat["mean_ms"] / 1e3, 1e-12)})
    return rows


def latency_at_recall(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The cheapest measured point with recall >= target (None if never reached)."""
    ok = [r for r in rows if r["recall_at_10"] >= target]
    return min(ok, key=lambda r: r["p50_ms"]) if ok else None
