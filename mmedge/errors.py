"""Typed errors shared by every layer. Library code raises these; the CLI turns
them into one line and a non-zero exit code (``exit_code``)."""

from __future__ import annotations


class MmedgeError(Exception):
    """Base class of every error mmedge raises on purpose."""

    exit_code = 1


class UsageError(MmedgeError):
    """The caller asked for something that cannot be done (bad argument combination)."""

    exit_code = 2


class DatasetError(MmedgeError):
    """A dataset file, row, column or referenced image is missing or malformed."""


class ImageError(MmedgeError):
    """An image cannot be read or decoded, or breaks a documented limit."""


class TextError(MmedgeError):
    """A text cannot be encoded (wrong type, over the length limit)."""


class BundleError(MmedgeError):
    """A bundle is missing files, has a bad manifest, fails checksums or golden vectors."""


class SearchIndexError(MmedgeError):
    """An index is missing, corrupt, or built for another embedding space."""


class TrainError(MmedgeError):
    """Training cannot start or continue (bad config, incompatible checkpoint)."""


class ExportError(MmedgeError):
    """Export failed, including a parity check between PyTorch and ONNX Runtime."""


class MissingDependencyError(MmedgeError):
    """An optional dependency is needed (e.g. ``pip install 'mmedge[train]'``)."""
