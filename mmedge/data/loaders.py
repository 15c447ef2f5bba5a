"""Load image-caption pairs from CSV/TSV, JSONL, COCO-captions JSON or a folder.

Every format yields the same :class:`Pair` records. Only the existence of each image
file is checked here (cheap); images are decoded elsewhere.

Problems are split in two kinds:

* file-level (no such file, empty file, a required column missing, text that is not
  UTF-8, unreadable JSON document) always raise :class:`~mmedge.errors.DatasetError`;
* row-level (missing image, empty caption, malformed JSON line, duplicate pair, ...)
  raise too, unless ``skip_bad=True``, in which case they are recorded in
  :attr:`LoadResult.skipped` as ``(where, reason)``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmedge.errors import DatasetError, UsageError

__all__ = ["IMAGE_EXTENSIONS", "FORMATS", "LoadResult", "Pair", "load_pairs"]

#: File extensions (lower case) treated as images by the folder format.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})

#: Values accepted by ``load_pairs(fmt=...)``.
FORMATS: tuple[str, ...] = ("auto", "csv", "tsv", "jsonl", "coco", "folder")


@dataclass(frozen=True)
class Pair:
    """One image-caption pair."""

    image: Path
    """Absolute path of the image file."""
    caption: str
    key: str
    """Stable unique id: the file path as written in the source (plus ``#n`` for the
    n-th caption of the same image), ``"image_id:ann_id"`` for COCO."""
    extra: dict[str, str] = field(default_factory=dict)
    """The other columns of the row, as strings."""


@dataclass
class LoadResult:
    """The pairs of a dataset, what was skipped, and where it came from."""

    pairs: list[Pair]
    skipped: list[tuple[str, str]]
    """``(where, reason)``, e.g. ``("captions.csv row 17 (line 18)", "image not found: x.png")``."""
    source: Path


class _RowError(Exception):
    """A problem confined to one row; becomes a skip or a DatasetError."""


class _Collector:
    """Accumulates pairs, enforces unique keys, and routes row-level problems."""

    def __init__(self, source: Path, skip_bad: bool) -> None:
        self.source = source
        # ``where`` starts with the file name (or, for a folder, the relative path).
        self._prefix = source if source.is_dir() else source.parent
        self.skip_bad = skip_bad
        self.pairs: list[Pair] = []
        self.skipped: list[tuple[str, str]] = []
        self._keys: set[str] = set()
        self._pair_where: dict[tuple[str, str], str] = {}
        self._per_image: dict[str, int] = {}

    def bad(self, where: str, reason: str) -> None:
        """Record a row-level problem: skip it, or raise."""
        if self.skip_bad:
            self.skipped.append((where, reason))
            return
        raise DatasetError(f"{self._prefix / where}: {reason}")

    def add(
        self,
        where: str,
        image: Path,
        caption: str,
        key: str,
        extra: dict[str, str],
        explicit_key: bool = False,
    ) -> None:
        """Add a pair whose image and caption were already validated.

        The same image (by absolute path) with the same caption twice is a duplicate.
        A derived ``key`` that is already taken (another caption of the same image) gets
        ``#2``, ``#3``, ... appended; an ``explicit_key`` that is taken is a duplicate.
        """
        first = self._pair_where.get((str(image), caption))
        if first is not None:
            self.bad(where, f"duplicate of {first}: same image and caption {caption!r}")
            return
        if key in self._keys:
            if explicit_key:
                self.bad(where, f"duplicate key {key!r}")
                return
            base_key = key
            n = self._per_image.get(base_key, 1)
            while key in self._keys:
                n += 1
                key = f"{base_key}#{n}"
            self._per_image[base_key] = n
        self._keys.add(key)
        self._pair_where[(str(image), caption)] = where
        self.pairs.append(Pair(image=image, caption=caption, key=key, extra=extra))

    def result(self) -> LoadResult:
        return LoadResult(pairs=self.pairs, skipped=self.skipped, source=self.source)


def load_pairs(
    path: str | Path,
    fmt: str = "auto",
    skip_bad: bool = False,
    image_column: str = "filepath",
    caption_column: str = "caption",
) -> LoadResult:
    """Load image-caption pairs from a file or folder.

    Formats (``fmt="auto"`` picks by extension, or ``"folder"`` for a directory):

    * ``csv`` (``.csv``) / ``tsv`` (``.tsv``): a header row with ``image_column`` and
      ``caption_column`` (``filepath,caption`` by default); image paths are relative
      to the file's folder (absolute paths allowed). Other columns go to ``Pair.extra``.
    * ``jsonl`` (``.jsonl``): one JSON object per line with the same fields.
    * ``coco`` (``.json``): COCO captions, ``images`` ``[{id, file_name}]`` and
      ``annotations`` ``[{image_id, caption, id}]``; one pair per annotation, key
      ``"image_id:ann_id"``, ``extra["image_id"]`` set. Images are looked up beside the
      JSON file, then in an ``images/`` subfolder.
    * ``folder``: every image file (png, jpg, jpeg, webp, bmp, gif; searched
      recursively) with a same-named ``.txt`` beside it; caption = the text stripped;
      key = the path relative to the folder. Images without a ``.txt`` are not an
      error: they are listed in ``skipped`` (whatever ``skip_bad`` says).

    A second caption of the same image gets key ``"<path>#2"``, ``"#3"``, ...; the same
    image with the same caption twice is a duplicate. With ``skip_bad=True`` row-level
    problems (missing image, empty caption, malformed JSON line, duplicate) go to
    ``LoadResult.skipped`` instead of raising; file-level problems always raise.

    Raises:
        DatasetError: naming the file and row/line and the reason.
        UsageError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    source = Path(os.path.abspath(os.fspath(path)))
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    if fmt == "auto":
        fmt = _detect_format(source)
    if fmt == "folder":
        if not source.is_dir():
            raise DatasetError(f"{source}: not a folder (format 'folder')")
        return _load_folder(source, skip_bad)
    if not source.is_file():
        raise DatasetError(f"{source}: is a folder, not a {fmt} file")
    text = _read_text(source)
    if not text.strip():
        raise DatasetError(f"{source}: empty file")
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        return _load_csv(source, text, delimiter, skip_bad, image_column, caption_column)
    if fmt == "jsonl":
        return _load_jsonl(source, text, skip_bad, image_column, caption_column)
    return _load_coco(source, text, skip_bad)


def _detect_format(source: Path) -> str:
    if source.is_dir():
        return "folder"
    suffix = source.suffix.lower()
    detected = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "coco"}.get(suffix)
    if detected is None:
        raise DatasetError(
            f"{source}: cannot tell the dataset format from the extension {suffix or '(none)'!r}; "
            "use .csv, .tsv, .jsonl, .json (COCO captions) or a folder, or pass fmt"
        )
    return detected


def _read_text(file: Path) -> str:
    """Read a whole file as UTF-8 (a leading BOM is dropped)."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{file}: not UTF-8 text: byte offset {exc.start} (line {line}): {exc.reason}"
        ) from exc


def _resolve_image(base: Path, written: str) -> Path:
    # os.path rather than pathlib: one Path per row instead of three (a tenth of indexing a
    # folder of small images went into building them); join keeps an absolute ``written``
    return Path(os.path.normpath(os.path.join(base, written)))


def _to_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _check_row(
    base: Path, written: Any, caption: Any, image_column: str, caption_column: str
) -> tuple[Path, str]:
    """Validate one row's image path and caption; raise _RowError on a problem."""
    if not isinstance(written, str):
        raise _RowError(f"{image_column} is not a string: {written!r}")
    written = written.strip()
    if not written:
        raise _RowError(f"empty {image_column}")
    if caption is None:
        raise _RowError("empty caption")
    if not isinstance(caption, str):
        raise _RowError(f"{caption_column} is not a string: {caption!r}")
    caption = caption.strip()
    if not caption:
        raise _RowError("empty caption")
    image = _resolve_image(base, written)
    if not os.path.isfile(image):
        raise _RowError(f"image not found: {written}")
    return image, caption


def _load_csv(
    source: Path,
    text: str,
    delimiter: str,
    skip_bad: bool,
    image_column: str,
    caption_column: str,
) -> LoadResult:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    name = source.name
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DatasetError(f"{source}: line 1: unreadable header: {exc}") from exc
    columns = [c.strip() for c in header]
    seen: set[str] = set()
    for c in columns:
        if c in seen:
            raise DatasetError(f"{source}: line 1: duplicate column {c!r} in the header")
        seen.add(c)
    missing = [c for c in (image_column, caption_column) if c not in seen]
    if missing:
        raise DatasetError(
            f"{source}: missing required column(s) {', '.join(repr(m) for m in missing)}; "
            f"columns found: {', '.join(repr(c) for c in columns)}"
        )
    i_img = columns.index(image_column)
    i_cap = columns.index(caption_column)
    base = source.parent
    out = _Collector(source, skip_bad)
    row_no = 0
    while True:
        start_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(f"{source}: line {start_line}: malformed CSV: {exc}") from exc
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        row_no += 1
        where = f"{name} row {row_no} (line {start_line})"
        if len(fields) > len(columns):
            out.bad(where, f"{len(fields)} fields, but the header has {len(columns)} columns")
            continue
        fields = fields + [""] * (len(columns) - len(fields))
        try:
            image, caption = _check_row(
                base, fields[i_img], fields[i_cap], image_column, caption_column
            )
        except _RowError as exc:
            out.bad(where, str(exc))
            continue
        extra = {c: v for j, (c, v) in enumerate(zip(columns, fields)) if j not in (i_img, i_cap)}
        out.add(where, image, caption, fields[i_img].strip(), extra)
    if row_no == 0:
        raise DatasetError(f"{source}: no data rows (header only)")
    return out.result()


def _load_jsonl(
    source: Path, text: str, skip_bad: bool, image_column: str, caption_column: str
) -> LoadResult:
    name = source.name
    base = source.parent
    out = _Collector(source, skip_bad)
    rows: list[tuple[str, dict[str, Any]]] = []
    fields_found: set[str] = set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.bad(where, f"malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            out.bad(where, f"expected a JSON object, got {type(obj).__name__}")
            continue
        fields_found.update(obj)
        rows.append((where, obj))
    if rows:
        missing = [c for c in (image_column, caption_column) if c not in fields_found]
        if missing:
            raise DatasetError(
                f"{source}: missing required field(s) {', '.join(repr(m) for m in missing)} "
                f"on every line; fields found: {', '.join(repr(f) for f in sorted(fields_found))}"
            )
    for where, obj in rows:
        absent = [c for c in (image_column, caption_column) if c not in obj]
        if absent:
            out.bad(
                where,
                f"missing field(s) {', '.join(map(repr, absent))}; fields: {', '.join(map(repr, obj))}",
            )
            continue
        try:
            image, caption = _check_row(
                base, obj.get(image_column), obj.get(caption_column), image_column, caption_column
            )
        except _RowError as exc:
            out.bad(where, str(exc))
            continue
        extra = {k: _to_str(v) for k, v in obj.items() if k not in (image_column, caption_column)}
        out.add(where, image, caption, obj[image_column].strip(), extra)
    return out.result()


def _load_coco(source: Path, text: str, skip_bad: bool) -> LoadResult:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{source}: line {exc.lineno} column {exc.colno}: malformed JSON: {exc.msg}"
        ) from exc
    if not isinstance(doc, dict):
        raise DatasetError(
            f"{source}: expected a COCO captions object with 'images' and 'annotations', "
            f"got a JSON {type(doc).__name__}"
        )
    missing = [k for k in ("images", "annotations") if not isinstance(doc.get(k), list)]
    if missing:
        raise DatasetError(
            f"{source}: missing required key(s) {', '.join(repr(m) for m in missing)} "
            f"(a list each); keys found: {', '.join(repr(k) for k in doc)}"
        )
    name = source.name
    base = source.parent
    out = _Collector(source, skip_bad)
    files: dict[str, str] = {}  # str(image id) -> file_name
    for i, img in enumerate(doc["images"]):
        where = f"{name} images[{i}]"
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            out.bad(where, "expected an object with 'id' and 'file_name'")
            continue
        files[_to_str(img["id"])] = img["file_name"]
    resolved: dict[str, Path | None] = {}
    for i, ann in enumerate(doc["annotations"]):
        where = f"{name} annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            out.bad(where, "expected an object with 'image_id', 'caption' and 'id'")
            continue
        image_id = _to_str(ann["image_id"])
        ann_id = _to_str(ann.get("id", i))
        where = f"{where} (id {ann_id})"
        file_name = files.get(image_id)
        if file_name is None:
            out.bad(where, f"image_id {image_id} is not in 'images'")
            continue
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            out.bad(where, "empty caption" if not caption else f"caption is not a string: {caption!r}")
            continue
        if image_id not in resolved:
            resolved[image_id] = _find_coco_image(base, file_name)
        image = resolved[image_id]
        if image is None:
            out.bad(where, f"image not found: {file_name} (looked beside the JSON and in images/)")
            continue
        out.add(
            where,
            image,
            caption.strip(),
            f"{image_id}:{ann_id}",
            {"image_id": image_id},
            explicit_key=True,
        )
    return out.result()


def _find_coco_image(base: Path, file_name: str) -> Path | None:
    for candidate in (_resolve_image(base, file_name), _resolve_image(base / "images", file_name)):
        if candidate.is_file():
            return candidate
    return None


def _walk_images(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / f


def _load_folder(source: Path, skip_bad: bool) -> LoadResult:
    out = _Collector(source, skip_bad)
    n_images = 0
    n_captioned = 0
    for image in _walk_images(source):
        n_images += 1
        rel = image.relative_to(source).as_posix()
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            out.skipped.append((rel, f"no caption file {txt.name}"))
            continue
        n_captioned += 1
        caption = _read_text(txt).strip()
        if not caption:
            out.bad(rel, f"empty caption in {txt.name}")
            continue
        out.add(rel, image, caption, rel, {})
    if n_images == 0:
        raise DatasetError(
            f"{source}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder"
        )
    if n_captioned == 0:
        raise DatasetError(
            f"{source}: none of the {n_images} image(s) has a same-named .txt caption beside it"
        )
    return out.result()
