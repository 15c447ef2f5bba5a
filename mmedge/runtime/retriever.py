"""Bundle + index = search: embed a query with the bundle's encoders and look it up in an index.

Every direction (text->image, image->text, image->image, text->text) goes through the same
path: encode the query with the matching tower, then :meth:`Index.search`; what comes back
depends on what the index holds.

Threads: one :class:`Retriever` may be shared by many threads. Queries run in parallel
(ONNX Runtime sessions and the tokenizer are thread-safe; the index takes a read lock);
:meth:`Retriever.add_images`, :meth:`Retriever.add_texts`, :meth:`Retriever.remove` and
:meth:`Retriever.save` take the index's write lock only for the index change itself (the
embedding runs before, outside the lock). A query sees the index as left by the last
add/remove call that completed before it started, saved or not; never part of a call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import SearchIndexError, TextError, UsageError
from mmedge.runtime.bundle import Bundle
from mmedge.runtime.encoders import ImageEncoder, TextEncoder
from mmedge.runtime.index import Hit, Index, Item
from mmedge.runtime.preprocess import MAX_IMAGE_BATCH, ImageSource, is_single_source
from mmedge.runtime.tokenizer import MAX_BATCH, clean_text

logger = logging.getLogger(__name__)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")


def _check_batch_size(batch_size: int, limit: int, name: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= limit:
        raise UsageError(f"batch_size must be an integer from 1 to {limit} ({name}), got {batch_size!r}")


def _check_not_blank(text: object, what: str) -> None:
    """An empty or whitespace-only text (after NUL removal) carries no query: TextError."""
    if isinstance(text, str) and not clean_text(text).strip():
        raise TextError(f"{what} is empty or only whitespace")


class Retriever:
    """Search an index with text or image queries embedded by a bundle.

    Args:
        bundle: a :class:`Bundle` or a bundle folder (loaded with checksum verification).
        index: an open :class:`Index`, an index folder (opened with the bundle's fingerprint
            check) or ``None`` (encoding only; searching then raises UsageError).
        providers: ONNX Runtime providers, see :func:`~mmedge.runtime.encoders.choose_providers`.
        threads: ONNX Runtime intra-op threads.
        readonly: open an index given as a folder read-only (searching only).

    Encoders are created on first use. An index built for another embedding space raises
    :class:`~mmedge.errors.SearchIndexError`.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        index: Index | str | os.PathLike[str] | None = None,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        readonly: bool = False,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self.providers = providers
        self.threads = threads
        self._image_encoder: ImageEncoder | None = None
        self._text_encoder: TextEncoder | None = None
        self._init_lock = threading.Lock()  # encoders are created once, on first use
        self._index: Index | None = None
        if index is not None:
            if isinstance(index, (str, os.PathLike)):
                index = Index.open(Path(index), fingerprint=self.bundle.fingerprint, readonly=readonly)
            self._check_index(index)
            self._index = index

    def _check_index(self, index: Index) -> None:
        if index.fingerprint != self.bundle.fingerprint:
            raise SearchIndexError(
                f"the index was built for embedding space {index.fingerprint}, "
                f"but the bundle {self.bundle.path} has {self.bundle.fingerprint}"
            )
        if index.dim != self.bundle.dim:
            raise SearchIndexError(f"the index holds {index.dim}-d vectors, the bundle makes {self.bundle.dim}-d")

    # -- components ----------------------------------------------------------------
    @property
    def index(self) -> Index:
        """The index searched; UsageError when the retriever has none."""
        if self._index is None:
            raise UsageError("this Retriever has no index; pass index=... to search or add items")
        return self._index

    @property
    def image_encoder(self) -> ImageEncoder:
        if self._image_encoder is None:
            with self._init_lock:
                if self._image_encoder is None:
                    self._image_encoder = ImageEncoder(self.bundle, providers=self.providers, threads=self.threads)
        return self._image_encoder

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            with self._init_lock:
                if self._text_encoder is None:
                    self._text_encoder = TextEncoder(self.bundle, providers=self.providers, threads=self.threads)
        return self._text_encoder

    # -- encoding --------------------------------------------------------------------
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """``B`` texts -> ``(B, D) float32`` unit vectors (a bare str gives ``(1, D)``); encoded
        ``batch_size`` (at most ``MAX_BATCH``) at a time."""
        _check_batch_size(batch_size, MAX_BATCH, "MAX_BATCH")
        return self.text_encoder.encode(texts, batch_size=batch_size)

    def encode_image(self, images: Sequence[ImageSource] | ImageSource, batch_size: int = 64) -> np.ndarray:
        """``B`` images -> ``(B, D) float32`` unit vectors (a single source gives ``(1, D)``);
        encoded ``batch_size`` (at most ``MAX_IMAGE_BATCH``) at a time."""
        _check_batch_size(batch_size, MAX_IMAGE_BATCH, "MAX_IMAGE_BATCH")
        return self.image_encoder.encode(images, batch_size=batch_size)

    # -- search ------------------------------------------------------------------------
    def search(
        self,
        text: str | Sequence[str] | None = None,
        image: ImageSource | Sequence[ImageSource] | None = None,
        k: int = 10,
        ef: int | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """Nearest items to a text or an image query, best first.

        Exactly one of ``text`` / ``image`` must be given (else UsageError). A single query (a
        ``str`` text; a path, bytes, file object or PIL image) returns ``list[Hit]`` of at most
        ``k`` hits; a sequence of ``Q`` queries returns ``Q`` such lists (encoded as a batch and
        searched with one index call). An empty or whitespace-only query text raises
        :class:`~mmedge.errors.TextError`.
        """
        if (text is None) == (image is None):
            raise UsageError("give exactly one of text= or image= to search")
        _check_k(k)
        if text is not None:
            single = isinstance(text, str)
            queries: list[Any] = [text] if single else list(text)
            if not queries:
                return []
            for i, t in enumerate(queries):
                _check_not_blank(t, "the query text" if single else f"query text #{i}")
            vectors = self.encode_text(queries)
        else:
            single = is_single_source(image)
            queries = [image] if single else list(image)  # type: ignore[arg-type]
            if not queries:
                return []
            vectors = self.encode_image(queries)
        results = self.search_vectors(vectors, k=k, ef=ef)
        return results[0] if single else results

    def search_vectors(self, vectors: np.ndarray, k: int = 10, ef: int | None = None) -> list[list[Hit]]:
        """``(Q, D)`` (or ``(D,)``) query vectors -> ``Q`` lists of at most ``k`` hits."""
        _check_k(k)
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.bundle.dim:
            raise UsageError(f"query vectors must have shape (Q, {self.bundle.dim}), got {np.shape(vectors)}")
        if v.shape[0] == 0:
            return []
        return self.index.search(v, k, ef=ef)

    # -- adding ------------------------------------------------------------------------
    def add_images(
        self,
        images: Sequence[Item | str | os.PathLike[str]],
        keys: Sequence[str] | None = None,
        upsert: bool = False,
        batch_size: int = 64,
    ) -> int:
        """Embed images and add them to the index; returns how many were added.

        Each element is an :class:`Item` (``modality="image"``, its ``path`` is embedded) or a
        path, whose key is ``keys[i]`` when given, else the path as a string. The index is not
        saved; call :meth:`save` (or ``index.save()``).
        """
        images = [images] if isinstance(images, (str, os.PathLike, Item)) else list(images)
        if keys is not None and len(keys) != len(images):
            raise UsageError(f"{len(keys)} keys for {len(images)} images")
        items: list[Item] = []
        for i, entry in enumerate(images):
            if isinstance(entry, Item):
                if entry.path is None:
                    raise UsageError(f"image item {entry.key!r} has no path to embed")
                items.append(entry)
            elif isinstance(entry, (str, os.PathLike)):
                key = str(keys[i]) if keys is not None else str(entry)
                items.append(Item(key=key, modality="image", path=str(entry)))
            else:
                raise UsageError(f"add_images takes Items or paths, got {type(entry).__name__}")
        if not items:
            return 0
        vectors = self.encode_image([it.path for it in items], batch_size=batch_size)
        self.index.add(items, vectors, upsert=upsert)
        return len(items)

    def add_texts(
        self,
        texts: Sequence[Item | str],
        keys: Sequence[str] | None = None,
        upsert: bool = False,
        batch_size: int = 256,
    ) -> int:
        """Embed texts and add them to the index; returns how many were added.

        Each element is an :class:`Item` (``modality="text"``, its ``caption`` is embedded) or a
        string, whose key is ``keys[i]`` when given, else the text itself. The index is not saved.
        """
        texts = [texts] if isinstance(texts, (str, Item)) else list(texts)
        if keys is not None and len(keys) != len(texts):
            raise UsageError(f"{len(keys)} keys for {len(texts)} texts")
        items: list[Item] = []
        for i, entry in enumerate(texts):
            if isinstance(entry, Item):
                if entry.caption is None:
                    raise UsageError(f"text item {entry.key!r} has no caption to embed")
                items.append(entry)
            elif isinstance(entry, str):
                key = str(keys[i]) if keys is not None else entry
                items.append(Item(key=key, modality="text", caption=entry))
            else:
                raise UsageError(f"add_texts takes Items or strings, got {type(entry).__name__}")
            _check_not_blank(items[-1].caption, f"the text of item {items[-1].key!r}")
        if not items:
            return 0
        vectors = self.encode_text([str(it.caption) for it in items], batch_size=batch_size)
        self.index.add(items, vectors, upsert=upsert)
        return len(items)

    def remove(self, keys: Sequence[str], missing_ok: bool = False) -> int:
        """Remove items by key (``index.remove``); returns how many. Not saved."""
        return self.index.remove(keys, missing_ok=missing_ok)

    def save(self) -> None:
        """Save the index (``index.save()``)."""
        self.index.save()
