"""The runtime layer imports without torch and pulls in no training or export code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = ("torch", "onnx", "mmedge.train", "mmedge.export")

PROBE = r"""
import json, sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError

stage = {}
import mmedge.runtime
stage["after_package"] = sorted(sys.modules)
import mmedge.runtime.retriever
import mmedge.runtime.bundle, mmedge.runtime.encoders, mmedge.runtime.index
import mmedge.runtime.metrics, mmedge.runtime.preprocess, mmedge.runtime.tokenizer
import mmedge.data
from mmedge.runtime import (Bundle, Retriever, Index, Item, Hit, IndexParams, ImageEncoder,
                            TextEncoder, PreprocessConfig, retrieval_metrics, BundleError,
                            ImageError, TextError, UsageError, SearchIndexError, MmedgeError)
for name in mmedge.runtime.__all__:
    getattr(mmedge.runtime, name)
stage["after_all"] = sorted(sys.modules)
stage["torch_is_none"] = sys.modules.get("torch", "absent") is None
print(json.dumps(stage))
"""


def _forbidden(modules: list[str]) -> list[str]:
    bad = []
    for name in modules:
        for f in FORBIDDEN:
            if name == f or name.startswith(f + "."):
                bad.append(name)
    return bad


@pytest.fixture(scope="module")
def stage() -> dict:
    """Run the probe once in a fresh interpreter; its module lists after each stage."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_imports_without_torch(stage: dict) -> None:
    assert stage["torch_is_none"], "something replaced the torch placeholder"
    # "torch" itself is our None placeholder; nothing else named torch/onnx/train/export
    assert [m for m in _forbidden(stage["after_all"]) if m != "torch"] == []


def test_importing_runtime_package_is_cheap(stage: dict) -> None:
    first = stage["after_package"]
    heavy = ("numpy", "onnxruntime", "hnswlib", "PIL", "tokenizers")
    assert [m for m in first if m.split(".")[0] in heavy] == []
