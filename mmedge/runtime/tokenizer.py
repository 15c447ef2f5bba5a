"""Text -> token ids for the text graph, with the bundle's ``tokenizer.json``.

The tokenizer file is a Hugging Face ``tokenizers`` file. The ones mmedge training writes
carry a post-processor that prepends a ``[CLS]`` token, so every text, even ``""``, gives at
least one token; this module does not rely on that and raises
:class:`~mmedge.errors.TextError` if a text yields no token at all.

Input hygiene, applied before tokenisation and therefore part of the contract:

* only ``str`` is accepted (anything else -> ``TextError``);
* texts longer than :data:`MAX_TEXT_CHARS` characters -> ``TextError``;
* NUL characters are removed;
* lone surrogates (invalid UTF-16 halves) are replaced by ``?``
  (``text.encode("utf-8", "replace").decode("utf-8")``).

Batches larger than :data:`MAX_BATCH` raise :class:`~mmedge.errors.UsageError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmedge.errors import BundleError, TextError, UsageError

logger = logging.getLogger(__name__)

#: Longest text accepted, in characters (before tokenisation).
MAX_TEXT_CHARS: int = 10_000
#: Most texts in one :meth:`TextTokenizer.encode` call.
MAX_BATCH: int = 4096


def clean_text(text: object, index: int | None = None) -> str:
    """Validate and sanitise one text (see the module docstring); returns the cleaned ``str``."""
    where = "" if index is None else f" #{index}"
    if not isinstance(text, str):
        raise TextError(f"text{where} must be a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise TextError(
            f"text{where} has {len(text)} characters, over the limit of {MAX_TEXT_CHARS} (MAX_TEXT_CHARS)"
        )
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


class TextTokenizer:
    """Wraps ``tokenizers.Tokenizer.from_file(path)``; pads and truncates itself.

    Args:
        path: the ``tokenizer.json`` file.
        max_length: most tokens per text, special tokens included (``>= 1``); longer texts are
            truncated by the tokenizer (which keeps the post-processor's special tokens).
        pad_id: id written in padded positions (``attention_mask`` is 0 there).
    """

    def __init__(self, path: str | os.PathLike[str], max_length: int, pad_id: int) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise BundleError(f"text.max_length must be a positive integer, got {max_length!r}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise BundleError(f"text.pad_id must be a non-negative integer, got {pad_id!r}")
        self.max_length = max_length
        self.pad_id = pad_id
        if not self.path.is_file():
            raise BundleError(f"tokenizer file {self.path} does not exist")
        try:
            tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception
            raise BundleError(f"cannot load tokenizer {self.path}: {exc}") from exc
        tok.no_padding()
        try:
            tok.enable_truncation(max_length=max_length)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"tokenizer {self.path} rejects max_length={max_length}: {exc}") from exc
        self._tok = tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise a batch: ``B`` texts -> ``(input_ids, attention_mask)``, both ``(B, T) int64``.

        ``T`` is the longest tokenised text in the batch (``T <= max_length``); shorter rows are
        padded on the right with ``pad_id`` and mask 0. A bare ``str`` is a batch of one. An
        empty batch gives two ``(0, 0)`` arrays.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise TextError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        if len(texts) > MAX_BATCH:
            raise UsageError(f"{len(texts)} texts in one batch, over the limit of {MAX_BATCH} (MAX_BATCH)")
        if len(texts) == 0:
            return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
        cleaned = [clean_text(t, i) for i, t in enumerate(texts)]
        if len(cleaned) == 1:  # a query: encode() skips encode_batch's thread pool, one row needs no padding
            try:
                row = self._tok.encode(cleaned[0], add_special_tokens=True).ids[: self.max_length]
            except Exception as exc:  # noqa: BLE001
                raise TextError(f"tokenizer failed: {exc}") from exc
            if not row:
                raise TextError(f"text #0 ({cleaned[0][:40]!r}) gives no tokens")
            ids = np.array([row], dtype=np.int64)
            return ids, np.ones_like(ids)
        try:
            encodings = self._tok.encode_batch(cleaned, add_special_tokens=True)
        except Exception as exc:  # noqa: BLE001
            raise TextError(f"tokenizer failed: {exc}") from exc
        lengths = [len(e.ids) for e in encodings]
        for i, n in enumerate(lengths):
            if n == 0:
                raise TextError(f"text #{i} ({cleaned[i][:40]!r}) gives no tokens")
        t = min(max(lengths), self.max_length)
        ids = np.full((len(cleaned), t), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(cleaned), t), dtype=np.int64)
        for i, enc in enumerate(encodings):
            row = enc.ids[:t]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask
