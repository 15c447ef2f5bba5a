"""Data for benchmarks/perf.py: the demo output, real embeddings, and larger synthetic corpora.

Real data: the built-in synthetic shapes dataset written by ``mmedge demo`` (11,500 64x64 PNG
images with captions in train/val/test). Its images are embedded with the image tower and
its test and validation captions with the text tower; those caption embeddings are the
queries (text->image, the main use).

For N beyond the real images, the corpus is the real image embeddings plus perturbed copies:
copy = normalise(x_s + a * (x_u - x_v)) for a random real source s and two other random real
items u, v. The noise is a difference of two real embeddings, so it follows the data's own
covariance (it stays in the span the model actually uses, unlike isotropic noise), and ``a``
is set so that a copy's cosine to its source is about the cosine between a real item and its
10th nearest real neighbour: copies are as far from their source as real neighbours are from
each other. Every copy carries its source's path and caption as metadata.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class Corpus:
    """Real items of the demo dataset: image paths, captions, keys (one per image)."""

    paths: list[Path]
    captions: list[str]
    keys: list[str]
    split: list[str]


def ensure_demo(demo: Path, log) -> Path:
    """Run ``mmedge demo`` into ``demo`` unless a finished demo is already there."""
    if (demo / "report.json").is_file() and (demo / "bundle-int8" / "manifest.json").is_file():
        return demo
    log(f"running `mmedge demo --out {demo}` (a few minutes)")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmedge.cli.main", "demo", "--out", str(demo), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    log(f"demo finished in {time.perf_counter() - t:.0f} s")
    return demo


def load_corpus(demo: Path) -> Corpus:
    paths, captions, keys, split = [], [], [], []
    for s in SPLITS:
        csv_path = demo / "data" / s / "captions.csv"
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                p = (csv_path.parent / row["filepath"]).resolve()
                paths.append(p)
                captions.append(row["caption"])
                keys.append(f"{s}/{row['filepath']}")
                split.append(s)
    return Corpus(paths, captions, keys, split)


def embed_corpus(corpus: Corpus, bundle: Path, cache: Path, log) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings, caption embeddings) of every real item, cached in ``cache``."""
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder

    cache.mkdir(parents=True, exist_ok=True)
    b = Bundle.load(bundle)
    tag = f"{b.fingerprint}-{b.quantization['image']}-{b.quantization['text']}-{len(corpus.paths)}"
    img_f, txt_f = cache / f"img-{tag}.npy", cache / f"txt-{tag}.npy"
    if img_f.is_file() and txt_f.is_file():
        return np.load(img_f), np.load(txt_f)
    t = time.perf_counter()
    img = ImageEncoder(b).encode(corpus.paths, batch_size=256)
    txt = TextEncoder(b).encode(corpus.captions, batch_size=256)
    log(f"embedded {len(img)} images and captions in {time.perf_counter() - t:.1f} s")
    np.save(img_f, img)
    np.save(txt_f, txt)
    return img, txt


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def kth_neighbour_cosine(x: np.ndarray, k: int = 10, sample: int = 2000, seed: int = 0) -> float:
    """Median cosine between a real item and its k-th nearest other real item."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), size=min(sample, len(x)), replace=False)
    s = x[idx] @ x.T
    s[np.arange(len(idx)), idx] = -np.inf
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
    return float(np.median(kth))


def perturbation_scale(x: np.ndarray, target_cos: float, seed: int = 0) -> float:
    """``a`` such that the median cosine of normalise(x_s + a (x_u - x_v)) to x_s is target_cos."""
    rng = np.random.default_rng(seed)
    n = min(4000, len(x))
    s, u, v = (rng.integers(0, len(x), n) for _ in range(3))
    lo, hi = 0.0, 4.0
    for _ in range(40):
        a = (lo + hi) / 2
        c = np.median(np.sum(normalise(x[s] + a * (x[u] - x[v])) * x[s], axis=1))
        lo, hi = (a, hi) if c > target_cos else (lo, a)
    return (lo + hi) / 2


def expand(x: np.ndarray, n: int, scale: float, seed: int = 0, chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """First ``len(x)`` rows are ``x`` itself (or its first n rows); the rest perturbed copies.
    Returns (vectors (n, d) float32, source index of each row)."""
    if n <= len(x):
        return np.ascontiguousarray(x[:n], dtype=np.float32), np.arange(n)
    rng = np.random.default_rng(seed)
    out = np.empty((n, x.shape[1]), dtype=np.float32)
    src = np.empty(n, dtype=np.int64)
    out[: len(x)] = x
    src[: len(x)] = np.arange(len(x))
    for start in range(len(x), n, chunk):
        m = min(chunk, n - start)
        s, u, v = (rng.integers(0, len(x), m) for _ in range(3))
        out[start:start + m] = normalise(x[s] + scale * (x[u] - x[v]))
        src[start:start + m] = s
    return out, src


def exact_topk(corpus: np.ndarray, queries: np.ndarray, k: int = 10, chunk: int = 256) -> np.ndarray:
    """Exact inner-product top-k ids (best first) of each query: faiss IndexFlatIP when it is
    installed (exact, and much faster at 1M), else batched numpy matrix products."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(np.ascontiguousarray(corpus, dtype=np.float32))
        _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids.astype(np.int64)
    out = np.empty((len(queries), k), dtype=np.int64)
    for i in range(0, len(queries), chunk):
        s = queries[i:i + chunk] @ corpus.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1, kind="stable")
        out[i:i + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found: np.ndarray | list, truth: np.ndarray) -> float:
    """Mean |found_i ∩ truth_i| / k over queries (found rows may be shorter or -1 padded)."""
    k = truth.shape[1]
    hits = 0
    for f, t in zip(found, truth):
        hits += len(set(int(x) for x in f[:k]) & set(int(x) for x in t))
    return hits / (k * len(truth))


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
