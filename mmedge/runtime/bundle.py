"""The model bundle: a folder with ``manifest.json``, two ONNX graphs, a tokenizer and golden vectors.

Reading: :meth:`Bundle.load` validates the manifest (format, schema version, required fields)
and, by default, the sha256 of every file it lists. Writing (used by ``mmedge.export``):
:func:`write_manifest` fills the ``files`` checksums and writes the manifest atomically;
:func:`write_golden` encodes sample inputs with this runtime and stores them as golden
vectors; :func:`verify_golden` recomputes them. The format is described in
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mmedge.errors import BundleError, ImageError, MmedgeError, UsageError
from mmedge.runtime.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

#: The manifest schema version this runtime reads and writes.
SCHEMA_VERSION: int = 1
#: Value of the manifest's ``format`` field.
FORMAT: str = "mmedge-bundle"
MANIFEST_NAME: str = "manifest.json"
GOLDEN_DIR: str = "golden"
GOLDEN_JSON: str = "golden/golden.json"
#: Default tolerance (max abs difference per embedding value) of the golden check.
GOLDEN_TOLERANCE: float = 1e-4

_QUANT_KINDS = frozenset({"fp32", "int8-dynamic", "int8-weights", "int8-qdq-static"})
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- validation


def _get(d: Mapping[str, Any], dotted: str, kind: type | tuple[type, ...]) -> Any:
    cur: Any = d
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(cur, Mapping) or part not in cur:
            raise BundleError(f"manifest.json is missing required field {'.'.join(parts[: i + 1])!r}")
        cur = cur[part]
    if isinstance(cur, bool) and kind is not bool and (kind is int or (isinstance(kind, tuple) and int in kind)):
        raise BundleError(f"manifest field {dotted!r} must be {getattr(kind, '__name__', kind)}, got {cur!r}")
    if not isinstance(cur, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"manifest field {dotted!r} must be {name}, got {type(cur).__name__}")
    return cur


def _rel_path(value: str, field: str) -> str:
    """A manifest path must be relative, inside the bundle, with forward slashes."""
    p = PurePosixPath(value)
    if not value or p.is_absolute() or "\\" in value or ".." in p.parts or value.startswith("/"):
        raise BundleError(f"manifest field {field} names {value!r}, which is not a relative path inside the bundle")
    return value


def _validate_manifest(m: Any) -> None:
    """Structural checks shared by the reader and the writer (no file access)."""
    if not isinstance(m, Mapping):
        raise BundleError(f"manifest.json must hold a JSON object, got {type(m).__name__}")
    fmt = m.get("format")
    if fmt != FORMAT:
        raise BundleError(f"manifest.json format is {fmt!r}, expected {FORMAT!r}")
    version = m.get("schema_version")
    if version is None:
        raise BundleError("manifest.json is missing required field 'schema_version'")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(f"unknown schema version {version} (this mmedge reads {SCHEMA_VERSION})")
    dim = _get(m, "embedding.dim", int)
    if dim < 1:
        raise BundleError(f"embedding.dim must be positive, got {dim}")
    metric = _get(m, "embedding.metric", str)
    if metric != "cosine":
        raise BundleError(f"embedding.metric {metric!r} is not supported (only 'cosine')")
    if not _get(m, "embedding.fingerprint", str):
        raise BundleError("embedding.fingerprint is empty")
    _rel_path(_get(m, "image.model", str), "image.model")
    _get(m, "image.input", str)
    _get(m, "image.output", str)
    PreprocessConfig.from_manifest(_get(m, "image.preprocess", Mapping))
    _rel_path(_get(m, "text.model", str), "text.model")
    inputs = _get(m, "text.inputs", list)
    if len(inputs) != 2 or not all(isinstance(x, str) for x in inputs):
        raise BundleError(f"text.inputs must be [input_ids name, attention_mask name], got {inputs!r}")
    _get(m, "text.output", str)
    _rel_path(_get(m, "text.tokenizer", str), "text.tokenizer")
    if _get(m, "text.max_length", int) < 1:
        raise BundleError("text.max_length must be positive")
    if _get(m, "text.pad_id", int) < 0:
        raise BundleError("text.pad_id must be non-negative")
    quant = _get(m, "quantization", Mapping)
    for tower in ("image", "text"):
        kind = quant.get(tower)
        if kind not in _QUANT_KINDS:
            raise BundleError(
                f"quantization.{tower} is {kind!r}; expected one of {', '.join(sorted(_QUANT_KINDS))}"
            )
    files = _get(m, "files", Mapping)
    for rel, digest in files.items():
        _rel_path(rel, f"files[{rel!r}]")
        if not isinstance(digest, str) or not _SHA_RE.match(digest):
            raise BundleError(f"files[{rel!r}] must be a lowercase hex sha256, got {digest!r}")
    golden = m.get("golden")
    if golden is not None:
        if not isinstance(golden, str):
            raise BundleError(f"manifest field 'golden' must be a string, got {type(golden).__name__}")
        _rel_path(golden, "golden")


# --------------------------------------------------------------------------- Bundle


@dataclass(frozen=True, eq=False)
class Bundle:
    """A validated bundle folder. Build with :meth:`Bundle.load`; treat ``manifest`` as read-only."""

    path: Path
    manifest: Mapping[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike[str], verify_checksums: bool = True) -> Bundle:
        """Read and validate ``path/manifest.json``.

        Checks: the folder and manifest exist, the manifest is a JSON object with
        ``format == "mmedge-bundle"`` and ``schema_version == 1``, required fields are present
        with the right types, the model and tokenizer files exist, and (``verify_checksums``)
        every file in ``files`` exists with a matching sha256 and the model and tokenizer files
        are listed there. Any failure raises :class:`~mmedge.errors.BundleError` naming it.
        """
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle folder {root} does not exist")
        if not root.is_dir():
            raise BundleError(f"bundle path {root} is not a folder")
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise BundleError(f"bundle {root} has no {MANIFEST_NAME}")
        try:
            text = mpath.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read {mpath}: {exc}") from exc
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{mpath} is not valid JSON: {exc}") from exc
        _validate_manifest(manifest)
        bundle = cls(path=root, manifest=manifest)
        for rel in (manifest["image"]["model"], manifest["text"]["model"], manifest["text"]["tokenizer"]):
            if not (root / rel).is_file():
                raise BundleError(f"bundle {root} is missing {rel} (named in manifest.json)")
        if verify_checksums:
            bundle.verify_checksums()
        return bundle

    def verify_checksums(self) -> None:
        """Check the sha256 of every file in ``files``; raises BundleError naming the first bad one."""
        files: Mapping[str, str] = self.manifest["files"]
        for rel in (self.manifest["image"]["model"], self.manifest["text"]["model"], self.manifest["text"]["tokenizer"]):
            if rel not in files:
                raise BundleError(f"manifest.json lists no checksum for {rel}")
        for rel, expected in files.items():
            fp = self.path / rel
            if not fp.is_file():
                raise BundleError(f"bundle {self.path} is missing {rel} (listed in manifest.json files)")
            try:
                actual = sha256_file(fp)
            except OSError as exc:
                raise BundleError(f"cannot read {rel} in bundle {self.path}: {exc}") from exc
            if actual != expected:
                raise BundleError(
                    f"checksum mismatch for {rel} in bundle {self.path}: sha256 {actual}, manifest says {expected}"
                )

    # -- properties ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Embedding dimension ``D`` of both towers."""
        return int(self.manifest["embedding"]["dim"])

    @property
    def fingerprint(self) -> str:
        """Hex id of the embedding space (an index built with it refuses other bundles)."""
        return str(self.manifest["embedding"]["fingerprint"])

    @property
    def metric(self) -> str:
        return str(self.manifest["embedding"]["metric"])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_manifest(self.manifest["image"]["preprocess"])

    @property
    def image_model_path(self) -> Path:
        return self.path / self.manifest["image"]["model"]

    @property
    def image_input(self) -> str:
        return str(self.manifest["image"]["input"])

    @property
    def image_output(self) -> str:
        return str(self.manifest["image"]["output"])

    @property
    def text_model_path(self) -> Path:
        return self.path / self.manifest["text"]["model"]

    @property
    def text_inputs(self) -> list[str]:
        """``[input_ids name, attention_mask name]``."""
        return [str(x) for x in self.manifest["text"]["inputs"]]

    @property
    def text_output(self) -> str:
        return str(self.manifest["text"]["output"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["text"]["tokenizer"]

    @property
    def max_length(self) -> int:
        return int(self.manifest["text"]["max_length"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["text"]["pad_id"])

    @property
    def quantization(self) -> dict[str, str]:
        """Per tower: ``"fp32"``, ``"int8-dynamic"``, ``"int8-weights"`` or ``"int8-qdq-static"`` (the
        image tower of bundles exported before int8-weights)."""
        return {k: str(v) for k, v in self.manifest["quantization"].items()}

    @property
    def parity(self) -> dict[str, Any]:
        return dict(self.manifest.get("parity") or {})

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.manifest.get("model_config") or {})

    @property
    def golden_path(self) -> Path | None:
        g = self.manifest.get("golden")
        return None if g is None else self.path / g

    @property
    def files(self) -> dict[str, str]:
        return dict(self.manifest["files"])


# --------------------------------------------------------------------------- writing


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a bundle is meant to be shared read-only
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_manifest(bundle_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Write ``bundle_dir/manifest.json`` with fresh checksums; returns its path.

    ``files`` is replaced by ``{posix relative path: sha256}`` of every regular file under
    ``bundle_dir`` except ``manifest.json`` (and this function's own temporary files).
    ``format``, ``schema_version``, ``mmedge_version`` and ``created`` are filled when absent.
    The manifest is validated like :meth:`Bundle.load` would, then written to a temporary file,
    fsynced and renamed over ``manifest.json``. The ``manifest`` argument is not modified.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist")
    try:
        m: dict[str, Any] = json.loads(json.dumps(dict(manifest)))  # deep copy, JSON-only values
    except (TypeError, ValueError) as exc:
        raise BundleError(f"cannot write manifest: it holds a value JSON cannot store ({exc})") from exc
    if "format" not in m:
        m["format"] = FORMAT
    if "schema_version" not in m:
        m["schema_version"] = SCHEMA_VERSION
    if "mmedge_version" not in m:
        from mmedge import __version__

        m["mmedge_version"] = __version__
    if "created" not in m:
        m["created"] = _now_utc()
    files: dict[str, str] = {}
    for fp in sorted(root.rglob("*")):
        if not fp.is_file():
            continue
        rel = fp.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or (fp.parent == root and fp.name.startswith(f".{MANIFEST_NAME}.")):
            continue
        files[rel] = sha256_file(fp)
    m["files"] = files
    _validate_manifest(m)
    for rel in (m["image"]["model"], m["text"]["model"], m["text"]["tokenizer"]):
        if rel not in files:
            raise BundleError(f"cannot write manifest: {rel} (named in the manifest) is not in {root}")
    target = root / MANIFEST_NAME
    _atomic_write_bytes(target, (json.dumps(m, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    logger.debug("wrote %s (%d files)", target, len(files))
    return target


def _pixel_sha256(pixels: np.ndarray) -> str:
    """sha256 of a ``(3, H, W) float32`` tensor's little-endian bytes."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype="<f4").tobytes()).hexdigest()


def _float32_rows(x: np.ndarray) -> list[list[float]]:
    """``(N, D)`` float32 -> nested lists of the shortest decimals that read back as the same float32.

    Each value is written with the digits float32 needs (at most 9 significant ones) rather
    than float64's 17; reading it back as float32 gives the exact same bits, and as float64 a
    value within 1e-9 relative of it, far inside any golden tolerance.
    """
    arr = np.asarray(x, dtype=np.float32)
    return [[float(np.format_float_scientific(v, unique=True)) for v in row] for row in arr]


def _golden_png_bytes(src: Any, cfg: PreprocessConfig) -> bytes:
    """PNG bytes for a golden image: PNG input is copied as is, anything else re-encoded."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        try:
            data = Path(src).read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read golden image {src}: {exc}") from exc
    else:
        data = b""
    if data.startswith(_PNG_MAGIC):
        return data
    from mmedge.runtime.preprocess import load_image

    img = load_image(data if data else src, cfg)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_golden(
    bundle_dir: str | os.PathLike[str],
    texts: Sequence[str],
    images: Sequence[str | os.PathLike[str] | bytes],
    tolerance: float = GOLDEN_TOLERANCE,
    providers: str | Sequence[str] | None = "cpu",
) -> dict[str, Any]:
    """Encode sample inputs with this runtime and store them as the bundle's golden vectors.

    The bundle must already have a valid ``manifest.json`` (see :func:`write_manifest`).
    ``golden/`` is replaced: image ``i`` is stored as ``golden/<i>.png`` (PNG sources copied
    byte for byte, others decoded with :func:`~mmedge.runtime.preprocess.load_image` and
    re-encoded as PNG), and ``golden/golden.json`` holds ``texts``, ``input_ids`` and
    ``attention_mask`` (``(B, T)`` as padded for the whole batch), ``images`` (relative paths),
    ``pixel_sha256`` (sha256 of each ``(3, H, W)`` float32 tensor, little-endian),
    ``image_embeddings`` and ``text_embeddings`` (``(N, D)``) and ``tolerance``. The manifest's
    ``golden`` field is set and its checksums rewritten. Returns the golden dict.
    """
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder
    from mmedge.runtime.preprocess import preprocess

    root = Path(bundle_dir)
    texts = list(texts)
    images = list(images)
    if not texts or not images:
        raise UsageError("write_golden needs at least one text and one image")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise UsageError(f"golden tolerance must be positive, got {tolerance!r}")
    bundle = Bundle.load(root, verify_checksums=False)
    cfg = bundle.preprocess
    pngs = [_golden_png_bytes(src, cfg) for src in images]

    gdir = root / GOLDEN_DIR
    if gdir.exists():
        shutil.rmtree(gdir)
    gdir.mkdir(parents=True)
    rels = []
    for i, data in enumerate(pngs):
        rel = f"{GOLDEN_DIR}/{i}.png"
        _atomic_write_bytes(root / rel, data)
        rels.append(rel)

    image_enc = ImageEncoder(bundle, providers=providers)
    text_enc = TextEncoder(bundle, providers=providers)
    pixels = preprocess([root / r for r in rels], cfg)
    ids, mask = text_enc.tokenizer.encode(texts)
    golden: dict[str, Any] = {
        "texts": texts,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "images": rels,
        "pixel_sha256": [_pixel_sha256(p) for p in pixels],
        "image_embeddings": _float32_rows(image_enc.encode_pixels(pixels)),
        "text_embeddings": _float32_rows(text_enc.encode_ids(ids, mask)),
        "tolerance": float(tolerance),
    }
    _atomic_write_bytes(root / GOLDEN_JSON, (json.dumps(golden, separators=(",", ":")) + "\n").encode("utf-8"))
    manifest = dict(bundle.manifest)
    manifest["golden"] = GOLDEN_JSON
    write_manifest(root, manifest)
    return golden


def _load_golden(bundle: Bundle) -> dict[str, Any]:
    gpath = bundle.golden_path
    if gpath is None:
        raise BundleError(f"bundle {bundle.path} has no golden file (manifest field 'golden')")
    if not gpath.is_file():
        raise BundleError(f"bundle {bundle.path} is missing its golden file {gpath.name}")
    try:
        g = json.loads(gpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read golden file {gpath}: {exc}") from exc
    required = ("texts", "input_ids", "attention_mask", "images", "pixel_sha256", "image_embeddings", "text_embeddings")
    missing = [k for k in required if k not in g] if isinstance(g, dict) else list(required)
    if missing:
        raise BundleError(f"golden file {gpath} is missing {', '.join(missing)}")
    return g


def verify_golden(
    bundle: Bundle,
    providers: str | Sequence[str] | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Recompute the golden vectors with this runtime and compare them with the stored ones.

    Token ids and pixel checksums must match exactly; embeddings within ``tolerance`` (default:
    the one stored in golden.json) as max absolute difference. Any mismatch raises
    :class:`~mmedge.errors.BundleError` with the figure. Returns ``{"text_max_abs_diff",
    "image_max_abs_diff", "text_min_cosine", "image_min_cosine", "tolerance", "n_texts",
    "n_images", "providers"}``.
    """
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder
    from mmedge.runtime.preprocess import preprocess

    g = _load_golden(bundle)
    tol = float(g.get("tolerance", GOLDEN_TOLERANCE) if tolerance is None else tolerance)
    image_enc = ImageEncoder(bundle, providers=providers)
    text_enc = TextEncoder(bundle, providers=providers)
    try:
        want_ids = np.asarray(g["input_ids"], dtype=np.int64)
        want_mask = np.asarray(g["attention_mask"], dtype=np.int64)
        want_text = np.asarray(g["text_embeddings"], dtype=np.float64)
        want_image = np.asarray(g["image_embeddings"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"golden file of {bundle.path} holds malformed arrays: {exc}") from exc

    ids, mask = text_enc.tokenizer.encode(list(g["texts"]))
    if ids.shape != want_ids.shape or not np.array_equal(ids, want_ids) or not np.array_equal(mask, want_mask):
        raise BundleError(f"golden check failed for {bundle.path}: the tokenizer gives other token ids than golden.json")
    paths = []
    for rel in g["images"]:
        if not isinstance(rel, str):
            raise BundleError(f"golden file of {bundle.path} names a non-string image {rel!r}")
        paths.append(bundle.path / _rel_path(rel, "golden images"))
    try:
        pixels = preprocess(paths, bundle.preprocess)
    except MmedgeError as exc:
        raise BundleError(f"golden check failed for {bundle.path}: {exc}") from exc
    if len(g["pixel_sha256"]) != len(paths):
        raise BundleError(f"golden file of {bundle.path} has {len(paths)} images but {len(g['pixel_sha256'])} checksums")
    for rel, p, want in zip(g["images"], pixels, g["pixel_sha256"]):
        got = _pixel_sha256(p)
        if got != want:
            raise BundleError(
                f"golden check failed for {bundle.path}: preprocessing {rel} gives pixel sha256 {got}, golden says {want}"
            )
    text = text_enc.encode_ids(ids, mask).astype(np.float64)
    image = image_enc.encode_pixels(pixels).astype(np.float64)
    figures: dict[str, Any] = {"tolerance": tol, "n_texts": len(text), "n_images": len(image)}
    for tower, got, want in (("text", text, want_text), ("image", image, want_image)):
        if got.shape != want.shape:
            raise BundleError(
                f"golden check failed for {bundle.path}: {tower} embeddings have shape {got.shape}, golden {want.shape}"
            )
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cos = np.sum(got * want, axis=1) / np.maximum(norms, 1e-12)
        figures[f"{tower}_max_abs_diff"] = diff
        figures[f"{tower}_min_cosine"] = float(cos.min()) if cos.size else 1.0
        if not diff <= tol:
            raise BundleError(
                f"golden check failed for {bundle.path}: {tower} embeddings differ by max abs {diff:.3g} "
                f"(tolerance {tol:.3g})"
            )
    figures["providers"] = image_enc.active_providers
    return figures
