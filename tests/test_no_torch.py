"""Query time needs no torch: the CLI imports without it, and `mmedge query` runs in an
environment where torch is not installed at all.

The second test needs such an environment; name its interpreter in MMEDGE_RUNTIME_PYTHON
(``.ci/run`` builds ``.venv-runtime`` with a plain ``pip install .`` and sets it). It queries
the tiny fp32 and int8 bundles of tests/conftest.py through an index built here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# "onnx" is the model-building package (a training/export dependency); "onnxruntime" is fine.
FORBIDDEN = ("torch", "onnx", "mmedge.train", "mmedge.export")

PROBE = r"""
import json, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import mmedge.runtime
import mmedge.runtime.retriever
import mmedge.cli.main
print(json.dumps({"modules": sorted(sys.modules),
                  "torch_is_none": sys.modules.get("torch", "absent") is None}))
"""


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


def test_runtime_and_cli_import_without_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_is_none"], "something replaced the torch placeholder"
    # "torch" itself is the None placeholder; nothing else named torch/onnx/train/export
    assert [m for m in _forbidden(out["modules"]) if m != "torch"] == []


# ----------------------------------------------------------------------------- query without torch


@pytest.fixture(scope="module")
def runtime_python() -> str:
    """The interpreter of the torch-free environment (checked before anything is built)."""
    exe = os.environ.get("MMEDGE_RUNTIME_PYTHON", "")
    if not exe:
        pytest.skip("MMEDGE_RUNTIME_PYTHON is not set: it names the python of an environment with "
                    "`pip install .` and no torch (.ci/run builds .venv-runtime and sets it)")
    if not Path(exe).is_file():
        pytest.fail(f"MMEDGE_RUNTIME_PYTHON={exe} does not exist")
    return exe


def _index_images(bundle: Path, captions_csv: Path, out: Path) -> set[str]:
    """Embed the dataset's images with ``bundle`` into a new index at ``out``; returns the keys."""
    from mmedge.data import load_pairs
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder
    from mmedge.runtime.index import Index, Item

    b = Bundle.load(bundle)
    seen: set[Path] = set()
    pairs = [p for p in load_pairs(captions_csv).pairs if not (p.image in seen or seen.add(p.image))]
    vectors = ImageEncoder(b).encode([p.image for p in pairs])  # (N, D)
    with Index.create(out, dim=b.dim, fingerprint=b.fingerprint) as idx:
        idx.add([Item(key=p.key, modality="image", path=str(p.image), caption=p.caption) for p in pairs],
                vectors)
        idx.save()
    return {p.key for p in pairs}


@pytest.mark.slow
@pytest.mark.parametrize("bundle_fixture", ["fp32_bundle", "int8_bundle"])
def test_query_in_an_environment_without_torch(runtime_python: str, bundle_fixture: str,
                                               synthetic_data: dict[str, Path], tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    exe = runtime_python
    probe = subprocess.run([exe, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0, f"{exe} can import torch; it must be an environment without it"
    assert "torch" in probe.stderr

    bundle: Path = request.getfixturevalue(bundle_fixture)  # tests/conftest.py: a tiny trained run
    index = tmp_path / "index"
    keys = _index_images(bundle, synthetic_data["test"], index)
    # run outside the checkout so the installed package is used, not ./mmedge
    t0 = time.perf_counter()
    proc = subprocess.run(
        [exe, "-m", "mmedge.cli.main", "query", str(bundle), "--index", str(index),
         "--text", "a red circle", "-k", "5", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - t0
    print(f"\ncold `mmedge query` process without torch ({bundle_fixture}): {elapsed * 1000:.0f} ms")
    assert proc.returncode == 0, proc.stderr
    hits = json.loads(proc.stdout)
    assert isinstance(hits, list) and len(hits) == 5
    for h in hits:
        assert {"key", "score", "modality", "path", "caption"} <= set(h)
        assert h["key"] in keys and h["modality"] == "image"
        assert -1.0 - 1e-4 <= h["score"] <= 1.0 + 1e-4
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
