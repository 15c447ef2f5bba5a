"""mmedge runtime: load a bundle, embed images and texts with ONNX Runtime, search an HNSW index.

Everything is re-exported flat here, e.g. ``from mmedge.runtime import Bundle, Retriever``.
Importing this package is cheap: the errors are imported at once, everything else (numpy,
onnxruntime, hnswlib, Pillow, tokenizers) on first attribute access. The runtime never
imports torch, onnx, :mod:`mmedge.train` or :mod:`mmedge.export`.

The batch preprocessing function is ``mmedge.runtime.preprocess.preprocess`` (not re-exported:
the name ``mmedge.runtime.preprocess`` is the submodule).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmedge.errors import (
    BundleError,
    DatasetError,
    ImageError,
    MissingDependencyError,
    MmedgeError,
    SearchIndexError,
    TextError,
    UsageError,
)

if TYPE_CHECKING:  # pragma: no cover
    from mmedge.runtime.bundle import Bundle, sha256_file, verify_golden, write_golden, write_manifest
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder, available_providers, choose_providers
    from mmedge.runtime.index import Hit, Index, IndexParams, Item
    from mmedge.runtime.metrics import retrieval_metrics
    from mmedge.runtime.preprocess import PreprocessConfig, load_image
    from mmedge.runtime.retriever import Retriever
    from mmedge.runtime.tokenizer import TextTokenizer

_LAZY: dict[str, str] = {
    "Bundle": "mmedge.runtime.bundle",
    "sha256_file": "mmedge.runtime.bundle",
    "write_manifest": "mmedge.runtime.bundle",
    "write_golden": "mmedge.runtime.bundle",
    "verify_golden": "mmedge.runtime.bundle",
    "ImageEncoder": "mmedge.runtime.encoders",
    "TextEncoder": "mmedge.runtime.encoders",
    "available_providers": "mmedge.runtime.encoders",
    "choose_providers": "mmedge.runtime.encoders",
    "Index": "mmedge.runtime.index",
    "Item": "mmedge.runtime.index",
    "Hit": "mmedge.runtime.index",
    "IndexParams": "mmedge.runtime.index",
    "retrieval_metrics": "mmedge.runtime.metrics",
    "PreprocessConfig": "mmedge.runtime.preprocess",
    "load_image": "mmedge.runtime.preprocess",
    "Retriever": "mmedge.runtime.retriever",
    "TextTokenizer": "mmedge.runtime.tokenizer",
}

__all__ = [
    *_LAZY,
    "BundleError",
    "DatasetError",
    "ImageError",
    "MissingDependencyError",
    "MmedgeError",
    "SearchIndexError",
    "TextError",
    "UsageError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
