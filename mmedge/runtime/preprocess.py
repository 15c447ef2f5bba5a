"""Image preprocessing: the one implementation shared by training, export and the runtime.

Every image goes through the same three steps, whoever calls them:

1. :func:`load_image` opens the source (a path, bytes, a binary file object or a PIL image),
   refuses decompression bombs, applies the EXIF orientation, takes the first frame of an
   animation and converts any colour mode to 8-bit RGB, compositing transparency onto
   ``cfg.alpha_background``.
2. :func:`to_uint8` resizes to ``cfg.size`` (``[H, W]``, aspect ratio not kept) with the named
   Pillow filter and returns ``(H, W, 3) uint8``.
3. :func:`normalize` turns ``(B, H, W, 3) uint8`` into ``(B, 3, H, W) float32`` as
   ``(x / 255 - mean) / std``.

:func:`load_uint8` is steps 1 and 2 for one source, without the intermediate copies for a
file that is already plain 8-bit RGB or RGBA at ``cfg.size`` (same pixels); :func:`preprocess`
chains them for a batch. The result depends only on the decoded pixels and
the config, so it is deterministic across runs and machines (same Pillow and numpy versions).

Colour-mode rules (documented because they change pixels):

* ``P``, ``L``, ``RGB`` with a ``transparency`` entry, ``LA``, ``PA``, ``RGBA``, ``La``, ``RGBa``:
  converted to RGBA by Pillow, then composited onto ``alpha_background`` with integer
  rounding: ``out = (rgb * a + bg * (255 - a) + 127) // 255``.
* ``I;16`` (and its byte-order variants) and ``I``: values are read as 16-bit
  (``I`` is clipped to ``0..65535``) and mapped to 8 bits as ``round(v / 257)``; grey is
  repeated on the three channels. (Pillow's own conversion clips at 255 instead.)
* ``F``: values are taken on the 0..255 scale, as Pillow does: rounded and clipped.
* ``CMYK``, ``YCbCr``, ``1``, ``L`` and the rest: Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np

from mmedge.errors import BundleError, ImageError, UsageError

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported only when an image is decoded or resized (inside the functions below), so
# that a process that only runs text queries never loads it.

logger = logging.getLogger(__name__)

#: Largest image (width * height) that :func:`load_image` decodes: 64 Mpx (64 * 2**20). Larger
#: images, and files whose header declares larger dimensions (decompression bombs), raise
#: :class:`~mmedge.errors.ImageError` before any pixel is decoded.
MAX_IMAGE_PIXELS: int = 64 * 1024 * 1024

#: Most images in one :func:`preprocess` call, hence in one :class:`ImageEncoder` batch
#: (``batch_size``): a larger batch raises :class:`~mmedge.errors.UsageError` before any image
#: is opened. (1024 images at 224x224 are 600 MB of float32 pixels.)
MAX_IMAGE_BATCH: int = 1024

#: Names of the Pillow resampling filters the manifest may use (see :data:`RESIZE_FILTERS`).
RESIZE_FILTER_NAMES: frozenset[str] = frozenset({"nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"})

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], "Image.Image"]
"""Anything :func:`load_image` accepts."""


@functools.lru_cache(maxsize=1)
def _resize_filters() -> dict[str, Any]:
    from PIL import Image

    return {
        "nearest": Image.Resampling.NEAREST,
        "box": Image.Resampling.BOX,
        "bilinear": Image.Resampling.BILINEAR,
        "hamming": Image.Resampling.HAMMING,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }


def __getattr__(name: str) -> Any:
    # RESIZE_FILTERS (Pillow resampling filters by the names the manifest uses) is built on
    # first access, so that importing this module does not import Pillow.
    if name == "RESIZE_FILTERS":
        return _resize_filters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_pil_image(obj: Any) -> bool:
    """``isinstance(obj, PIL.Image.Image)`` without importing Pillow (no PIL image can exist before it is imported)."""
    mod = sys.modules.get("PIL.Image")
    return mod is not None and isinstance(obj, mod.Image)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _as_float_triple(value: Any, name: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"preprocess.{name} must be three numbers, got {value!r}") from exc
    if len(triple) != 3:
        raise BundleError(f"preprocess.{name} must be three numbers, got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessConfig:
    """How to turn an image into the ``pixel_values`` tensor of the image graph.

    ``size`` is ``(H, W)``; ``mean`` / ``std`` are per RGB channel on 0..1 values;
    ``resize_filter`` is one of :data:`RESIZE_FILTER_NAMES`. Invalid values raise
    :class:`~mmedge.errors.BundleError` (the config normally comes from a manifest).
    """

    size: tuple[int, int]
    resize_filter: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: str = "RGB"
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    exif_transpose: bool = True
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        try:
            size = tuple(int(v) for v in self.size)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"preprocess.size must be [H, W], got {self.size!r}") from exc
        if len(size) != 2 or min(size) < 1:
            raise BundleError(f"preprocess.size must be two positive integers [H, W], got {self.size!r}")
        if self.resize_filter not in RESIZE_FILTER_NAMES:
            raise BundleError(
                f"unknown resize_filter {self.resize_filter!r}; known: {', '.join(sorted(RESIZE_FILTER_NAMES))}"
            )
        mean = _as_float_triple(self.mean, "mean")
        std = _as_float_triple(self.std, "std")
        if any(not np.isfinite(s) or s <= 0 for s in std) or any(not np.isfinite(m) for m in mean):
            raise BundleError(f"preprocess.std must be positive and mean finite, got mean={mean} std={std}")
        try:
            bg = tuple(int(v) for v in self.alpha_background)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"preprocess.alpha_background must be [r, g, b], got {self.alpha_background!r}") from exc
        if len(bg) != 3 or any(v < 0 or v > 255 for v in bg):
            raise BundleError(f"preprocess.alpha_background must be three integers 0..255, got {self.alpha_background!r}")
        if self.color != "RGB":
            raise BundleError(f"preprocess.color {self.color!r} is not supported (only 'RGB')")
        if self.layout != "NCHW":
            raise BundleError(f"preprocess.layout {self.layout!r} is not supported (only 'NCHW')")
        if not isinstance(self.exif_transpose, bool):
            raise BundleError(f"preprocess.exif_transpose must be true or false, got {self.exif_transpose!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "alpha_background", bg)

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Build from the manifest's ``image.preprocess`` object (missing keys -> BundleError)."""
        if not isinstance(d, Mapping):
            raise BundleError(f"image.preprocess must be an object, got {type(d).__name__}")
        missing = [k for k in ("size", "resize_filter", "mean", "std") if k not in d]
        if missing:
            raise BundleError(f"image.preprocess is missing {', '.join(missing)}")
        known = {"size", "resize_filter", "mean", "std", "color", "alpha_background", "exif_transpose", "layout"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"image.preprocess has unknown keys: {', '.join(unknown)}")
        return cls(**{k: d[k] for k in known if k in d})

    def to_manifest(self) -> dict[str, Any]:
        """The JSON-ready ``image.preprocess`` object."""
        return {
            "size": list(self.size),
            "resize_filter": self.resize_filter,
            "mean": list(self.mean),
            "std": list(self.std),
            "color": self.color,
            "alpha_background": list(self.alpha_background),
            "exif_transpose": self.exif_transpose,
            "layout": self.layout,
        }

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """``(B, H, W, 3) uint8 -> (B, 3, H, W) float32``; see :func:`normalize`."""
        return normalize(batch, self)


# --------------------------------------------------------------------------- loading


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if _is_pil_image(src):
        return f"<PIL image {src.mode} {src.size[0]}x{src.size[1]}>"
    name = getattr(src, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _check_pixels(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"cannot read image {name}: it has no pixels ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"cannot read image {name}: {w}x{h} = {w * h} pixels is over the limit of "
            f"{MAX_IMAGE_PIXELS} (MAX_IMAGE_PIXELS, 64 megapixels)"
        )


def _open_and_convert(fp: IO[bytes], name: str, cfg: PreprocessConfig, finish: Any = None) -> Any:
    """Open, check and decode ``fp``; ``finish(im, cfg, name)`` (default :func:`_to_rgb`) turns
    the loaded image into the result, inside the same error handling."""
    from PIL import Image, UnidentifiedImageError

    if finish is None:
        finish = _to_rgb

    try:
        # Image.open reads the header only; the pixel limit is checked before decoding.
        # Pillow's own DecompressionBombWarning (over ~89 Mpx) is above our limit, so an
        # image that triggers it is refused here too; the warnings filters are left alone
        # (changing them is not thread-safe), but if a caller turned the warning into an
        # exception it is caught below.
        with Image.open(fp) as im:
            _check_pixels(im, name)
            if getattr(im, "is_animated", False):  # GIF, APNG, WebP...: the first frame
                im.seek(0)
            im.load()
            return finish(im, cfg, name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"cannot read image {name}: declared size is a decompression bomb "
            f"(limit {MAX_IMAGE_PIXELS} pixels): {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"cannot read image {name}: not a recognised image format") from exc
    except MemoryError as exc:
        raise ImageError(f"cannot read image {name}: out of memory while decoding") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ValueError...)
        raise ImageError(f"cannot read image {name}: corrupt or truncated ({type(exc).__name__}: {exc})") from exc


def load_image(src: ImageSource, cfg: PreprocessConfig) -> Image.Image:
    """Open ``src`` and return a detached 8-bit ``RGB`` PIL image (any size).

    ``src`` may be a path (``str`` / ``PathLike``), encoded bytes, a binary file object or a
    PIL image. Every failure (missing file, directory, permission, empty file, unknown
    format, truncated data, more than :data:`MAX_IMAGE_PIXELS` pixels) raises
    :class:`~mmedge.errors.ImageError` naming the source and the reason.
    """
    name = _describe(src)
    if _is_pil_image(src):
        _check_pixels(src, name)
        try:
            if getattr(src, "is_animated", False) and src.tell() != 0:
                src.seek(0)
            src.load()
            return _to_rgb(src, cfg, name)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ImageError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from exc
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError(f"cannot read image {name}: it is empty (0 bytes)")
        return _open_and_convert(io.BytesIO(bytes(src)), name, cfg)
    if isinstance(src, (str, os.PathLike)):
        return _load_path(src, name, cfg, _to_rgb)
    if hasattr(src, "read"):
        return _open_and_convert(src, name, cfg)  # type: ignore[arg-type]
    raise ImageError(
        f"cannot read image {name}: expected a path, bytes, a binary file or a PIL image, got {type(src).__name__}"
    )


def _load_path(src: str | os.PathLike, name: str, cfg: PreprocessConfig, finish: Any) -> Any:
    """Open the file ``src`` with :func:`load_image`'s checks and messages, then decode it."""
    path = Path(src)
    try:
        if path.is_dir():
            raise ImageError(f"cannot read image {name}: it is a directory")
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"cannot read image {name}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read image {name}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"cannot read image {name}: {exc.strerror or exc}") from exc
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError:
            size = -1
        if size == 0:
            raise ImageError(f"cannot read image {name}: it is empty (0 bytes)")
        return _open_and_convert(fh, name, cfg, finish)


#: EXIF orientations that ImageOps.exif_transpose acts on (any other value leaves the image as is).
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset(range(2, 9))


def _fast_uint8(im: Image.Image, cfg: PreprocessConfig, name: str) -> Any:
    """The common case without copies: an 8-bit ``RGB`` (without a ``transparency`` entry) or
    ``RGBA`` image already of ``cfg.size`` and without a transposing EXIF orientation becomes
    ``(H, W, 3) uint8`` directly; anything else goes through :func:`_to_rgb` (a PIL image is
    returned). The pixels are the same as ``to_uint8(_to_rgb(im))``: for these images
    exif_transpose and convert only copy, and the alpha composite is the same arithmetic."""
    h, w = cfg.size
    mode = im.mode
    if im.size == (w, h) and (mode == "RGBA" or (mode == "RGB" and "transparency" not in im.info)):
        transposing = False
        if cfg.exif_transpose:
            try:
                transposing = im.getexif().get(_EXIF_ORIENTATION_TAG, 1) in _TRANSPOSING_ORIENTATIONS
            except Exception:  # noqa: BLE001 - unreadable EXIF: the general path logs and ignores it
                transposing = True
        if not transposing:
            arr = np.asarray(im, dtype=np.uint8)
            if mode == "RGBA":
                return _composite(arr, cfg.alpha_background)
            return np.ascontiguousarray(arr)
    return _to_rgb(im, cfg, name)


def load_uint8(src: ImageSource, cfg: PreprocessConfig) -> np.ndarray:
    """``to_uint8(load_image(src, cfg), cfg)``: one image source -> ``(H, W, 3) uint8``.

    Same pixels, errors and messages, but a file that is already plain 8-bit RGB or RGBA at
    ``cfg.size`` (the usual case when indexing a folder of model-sized images) is turned into
    the array without the intermediate image copies.
    """
    if isinstance(src, (str, os.PathLike)):
        out = _load_path(src, _describe(src), cfg, _fast_uint8)
        return out if isinstance(out, np.ndarray) else to_uint8(out, cfg)
    return to_uint8(load_image(src, cfg), cfg)


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """``(H, W, 4) uint8`` over a solid background -> ``(H, W, 3) uint8`` (integer rounding)."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32).reshape(1, 1, 3)
    out = (rgb * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb(im: Image.Image, cfg: PreprocessConfig, name: str) -> Image.Image:
    """Orientation + colour conversion; always returns a new image, never ``im`` itself."""
    from PIL import Image, ImageOps

    if cfg.exif_transpose:
        try:
            im = ImageOps.exif_transpose(im)  # a transposed copy, or a plain copy
        except Exception as exc:  # noqa: BLE001 - broken EXIF: keep the stored orientation
            logger.warning("ignoring unreadable EXIF orientation of %s: %s", name, exc)
    mode = im.mode
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if mode in _SIXTEEN_BIT_MODES or mode == "I" or mode == "F":
        arr = np.asarray(im)
        if mode == "F":
            grey = np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)
        else:
            v = np.clip(arr.astype(np.int64), 0, 65535)
            grey = ((v + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)), mode="RGB")
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"))
        return Image.fromarray(_composite(rgba, cfg.alpha_background), mode="RGB")
    try:
        out = im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"cannot read image {name}: colour mode {mode!r} cannot be converted to RGB") from exc
    return out if out is not im else im.copy()


# --------------------------------------------------------------------------- tensors


def to_uint8(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize an RGB image to ``cfg.size`` and return ``(H, W, 3) uint8`` (C-contiguous).

    The image is resized (aspect ratio not kept) with ``cfg.resize_filter`` only when it is
    not already ``(H, W)``. A non-RGB image is converted with :func:`load_image`'s rules first.
    """
    if img.mode != "RGB":
        img = _to_rgb(img, cfg, _describe(img))
    h, w = cfg.size
    if img.size != (w, h):
        img = img.resize((w, h), resample=_resize_filters()[cfg.resize_filter])
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (h, w, 3):  # pragma: no cover - guarded by the conversion above
        raise ImageError(f"unexpected pixel array shape {arr.shape}, expected {(h, w, 3)}")
    return np.ascontiguousarray(arr)


def normalize(batch: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """``(B, H, W, 3) uint8 -> (B, 3, H, W) float32`` computed as ``(x / 255 - mean) / std``.

    The arithmetic is done in float32 in this exact order, so every caller gets the same bits.
    """
    arr = np.asarray(batch)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise UsageError(f"normalize expects a (B, H, W, 3) uint8 batch, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise UsageError(f"normalize expects uint8 pixels, got {arr.dtype}")
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(1, 3, 1, 1)
    # Channels first before the arithmetic (same operations on the same values, so the same
    # bits), in place: the inner loops then run over whole planes instead of 3 channels.
    x = arr.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    np.divide(x, np.float32(255.0), out=x)
    np.subtract(x, mean, out=x)
    np.divide(x, std, out=x)
    return x


def is_single_source(images: Any) -> bool:
    """True when ``images`` is one image source (path, bytes, file object, PIL image), not a batch."""
    return (
        isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview))
        or _is_pil_image(images)
        or hasattr(images, "read")
    )


def preprocess(images: Sequence[ImageSource] | ImageSource, cfg: PreprocessConfig) -> np.ndarray:
    """Load, resize and normalise images: ``B`` sources -> ``(B, 3, H, W) float32``.

    A single source (path, bytes, file object or PIL image) is treated as a batch of one.
    An empty sequence gives ``(0, 3, H, W)``. Errors: :class:`~mmedge.errors.ImageError`; more
    than :data:`MAX_IMAGE_BATCH` images: :class:`~mmedge.errors.UsageError`.
    """
    if is_single_source(images):
        images = [images]  # type: ignore[list-item]
    if len(images) > MAX_IMAGE_BATCH:  # type: ignore[arg-type]
        raise UsageError(
            f"{len(images)} images in one batch, over the limit of {MAX_IMAGE_BATCH} (MAX_IMAGE_BATCH)"  # type: ignore[arg-type]
        )
    h, w = cfg.size
    if len(images) == 0:  # type: ignore[arg-type]
        return np.zeros((0, 3, h, w), dtype=np.float32)
    stack = np.stack([load_uint8(src, cfg) for src in images])  # type: ignore[union-attr]
    return normalize(stack, cfg)
