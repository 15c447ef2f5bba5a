"""Corpus embedding on a local Ray with 2 workers gives the same index as a
single-process build (skipped when Ray is not installed: `mmedge[ray]`)."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from mmedge.data import load_pairs  # noqa: E402
from mmedge.distributed.ray_index import build_index_ray  # noqa: E402
from mmedge.runtime.bundle import Bundle  # noqa: E402
from mmedge.runtime.encoders import ImageEncoder, TextEncoder  # noqa: E402
from mmedge.runtime.index import Index, Item  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module (2 CPUs); build_index_ray reuses it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_build_matches_single_process(tmp_path, fp32_bundle, synthetic_data):
    pairs = load_pairs(synthetic_data["train"]).pairs[:300]
    out = tmp_path / "ray-index"
    stats = build_index_ray(fp32_bundle, pairs, out, modality="image", workers=2, batch_size=64)
    assert stats["embedded"] == len(pairs) and stats["skipped_count"] == 0

    bundle = Bundle.load(fp32_bundle)
    enc = ImageEncoder(bundle, threads=1)
    local = Index.create(tmp_path / "local-index", dim=bundle.dim, fingerprint=bundle.fingerprint)
    vecs = enc.encode([p.image for p in pairs])
    local.add([Item(key=p.key, path=str(p.image), caption=p.caption) for p in pairs], vecs)
    local.save()

    remote = Index.open(out, fingerprint=bundle.fingerprint, readonly=True)
    assert len(remote) == len(local) == len(pairs)
    np.testing.assert_allclose(remote.vectors([p.key for p in pairs]), vecs, atol=1e-5)
    queries = TextEncoder(bundle).encode([p.caption for p in pairs[:40]])
    # ef = N: an exhaustive beam, so that two graphs built in different insertion orders
    # (threads) return the same neighbours; the default beam is approximate by design
    for a, b in zip(remote.search(queries, k=10, ef=len(pairs)), local.search(queries, k=10, ef=len(pairs))):
        assert [h.key for h in a] == [h.key for h in b]


def test_ray_build_skips_bad_images(tmp_path, fp32_bundle, synthetic_data):
    pairs = load_pairs(synthetic_data["train"]).pairs[:20]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    from mmedge.data import Pair

    pairs = pairs + [Pair(image=bad, caption="broken", key="bad.png", extra={})]
    stats = build_index_ray(fp32_bundle, pairs, tmp_path / "idx", workers=2, batch_size=8, skip_bad=True)
    assert stats["skipped_count"] == 1 and stats["embedded"] == 20
    idx = Index.open(tmp_path / "idx", readonly=True)
    assert len(idx) == 20 and "bad.png" not in idx
