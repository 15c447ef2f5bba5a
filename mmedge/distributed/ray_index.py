"""Corpus embedding on Ray (``pip install 'mmedge[ray]'``).

``mmedge index build --engine ray`` reads the image (or caption) list, embeds it
in Ray Data ``map_batches`` actors — each actor loads the bundle once and runs
the bundle's ONNX encoder on one thread — writes the embeddings as shard files,
and then builds ONE HNSW index from the shards on the driver.

Why one index and not per-shard indexes plus a merge: a query against S shard
indexes costs S graph searches and a top-k merge, and hnswlib has no graph merge,
so shard indexes would only move that cost to every query. Embedding is the
expensive, embarrassingly parallel part (about 1 ms per image per core);
inserting into HNSW costs a fraction of that, so one driver can absorb the
output of many workers. Past what one machine's memory holds, see
docs/SCALING.md.

Shards (``SHARD_DIR/shard-<first row>.npz``: ``rows`` int64 (B,), ``embeddings``
float32 (B, D), ``ok`` bool (B,)) are plain numpy files, so another engine can
produce or consume them. Items are added in dataset order, so the index equals
the one a single-process build makes from the same embeddings.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.data import Pair
from mmedge.errors import ImageError, MissingDependencyError, UsageError

log = logging.getLogger(__name__)


class _Embedder:
    """A Ray actor: loads the bundle once, embeds batches of rows."""

    def __init__(self, bundle_path: str, modality: str, threads: int) -> None:
        from mmedge.runtime.bundle import Bundle
        from mmedge.runtime.encoders import ImageEncoder, TextEncoder

        self.bundle = Bundle.load(bundle_path)
        self.modality = modality
        self.enc = (ImageEncoder(self.bundle, threads=threads) if modality == "image"
                    else TextEncoder(self.bundle, threads=threads))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mmedge.runtime.preprocess import preprocess

        rows = batch["row"].astype(np.int64)
        ok = np.ones(len(rows), dtype=bool)
        errors = [""] * len(rows)
        dim = self.bundle.dim
        if self.modality == "text":
            emb = self.enc.encode([str(t) for t in batch["caption"]])
        else:
            arrays = []
            for j, path in enumerate(batch["path"]):
                try:
                    arrays.append(preprocess([str(path)], self.bundle.preprocess))
                except ImageError as e:
                    ok[j] = False
                    errors[j] = str(e)
            emb = np.zeros((len(rows), dim), dtype=np.float32)
            if arrays:
                emb[ok] = self.enc.encode_pixels(np.concatenate(arrays))
        return {"row": rows, "embedding": emb.astype(np.float32), "ok": ok, "error": np.array(errors, dtype=object)}


def embed_with_ray(
    bundle_path: str | Path,
    pairs: Sequence[Pair],
    modality: str,
    shard_dir: Path,
    workers: int = 2,
    batch_size: int = 256,
    address: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Embed ``pairs`` on Ray and write shard files to ``shard_dir``; returns stats."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("the ray engine needs Ray: pip install 'mmedge[ray]'") from None
    if workers < 1:
        raise UsageError(f"workers must be at least 1, got {workers}")
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers, **kwargs)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [{"row": i, "path": str(p.image), "caption": p.caption} for i, p in enumerate(pairs)]
        t0 = time.perf_counter()
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size + 1, 64 * workers)))
        out = ds.map_batches(_Embedder, fn_constructor_args=(str(bundle_path), modality, 1),
                             batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                             num_cpus=1, batch_format="numpy")
        shard_dir.mkdir(parents=True, exist_ok=True)
        done = 0
        skipped: list[tuple[int, str]] = []
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            rows = batch["row"]
            np.savez(shard_dir / f"shard-{int(rows.min()):09d}-{len(rows):06d}.npz", rows=rows,
                     embeddings=batch["embedding"], ok=batch["ok"])
            for r, good, err in zip(rows, batch["ok"], batch["error"]):
                if not good:
                    skipped.append((int(r), str(err)))
            done += len(rows)
            if on_progress:
                on_progress(done, len(items))
        seconds = time.perf_counter() - t0
        return {"embedded": done - len(skipped), "skipped": skipped, "seconds": seconds,
                "per_second": done / seconds if seconds > 0 else float("nan"), "workers": workers}
    finally:
        if started_here:
            ray.shutdown()


def read_shards(shard_dir: Path, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """All shards of ``shard_dir`` -> embeddings (n, dim) in row order and ok mask (n,)."""
    emb = np.zeros((n, dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    seen = np.zeros(n, dtype=bool)
    for f in sorted(shard_dir.glob("shard-*.npz")):
        with np.load(f, allow_pickle=False) as z:
            rows = z["rows"]
            emb[rows] = z["embeddings"]
            ok[rows] = z["ok"]
            seen[rows] = True
    if not seen.all():
        missing = int((~seen).sum())
        raise UsageError(f"{shard_dir}: {missing} rows have no embedding in any shard")
    return emb, ok


def build_index_ray(
    bundle_path: str | Path,
    pairs: Sequence[Pair],
    out: str | Path,
    modality: str = "image",
    workers: int = 2,
    batch_size: int = 256,
    address: str | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Embed on Ray, then build and save one index at ``out``; returns stats.

    An unreadable image fails the build (naming the file) unless ``skip_bad``,
    in which case it is left out and counted.
    """
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.index import Index, Item

    if modality not in ("image", "text"):
        raise UsageError(f"modality must be image or text, got {modality!r}")
    bundle = Bundle.load(bundle_path)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists (use --overwrite to replace it)")
    if modality == "image":  # an image with several captions is indexed once, under its first key
        seen: set[str] = set()
        unique = []
        for p in pairs:
            if str(p.image) not in seen:
                seen.add(str(p.image))
                unique.append(p)
        pairs = unique
    shard_dir = Path(tempfile.mkdtemp(prefix=".shards-", dir=out.parent if out.parent.exists() else None))
    try:
        stats = embed_with_ray(bundle.path, pairs, modality, shard_dir, workers, batch_size, address, on_progress)
        if stats["skipped"] and not skip_bad:
            row, err = stats["skipped"][0]
            raise ImageError(f"{err} (and {len(stats['skipped']) - 1} more unreadable; use --skip-bad)"
                             if len(stats["skipped"]) > 1 else err)
        t = time.perf_counter()
        emb, ok = read_shards(shard_dir, len(pairs), bundle.dim)
        idx = Index.create(out, dim=bundle.dim, fingerprint=bundle.fingerprint, overwrite=overwrite)
        keep = np.flatnonzero(ok)
        items = [Item(key=pairs[i].key, modality=modality, path=str(pairs[i].image), caption=pairs[i].caption,
                      metadata=dict(pairs[i].extra)) for i in keep]
        for s in range(0, len(items), 10000):
            idx.add(items[s : s + 10000], emb[keep[s : s + 10000]])
        idx.save()
        idx.close()
        stats["index_seconds"] = time.perf_counter() - t
        stats["skipped_count"] = len(stats["skipped"])
        return stats
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
