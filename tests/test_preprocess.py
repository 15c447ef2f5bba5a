"""mmedge.runtime.preprocess on real files written with Pillow."""

from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmedge.errors import BundleError, ImageError, UsageError
from mmedge.runtime.preprocess import (
    MAX_IMAGE_PIXELS,
    PreprocessConfig,
    load_image,
    load_uint8,
    normalize,
    preprocess,
    to_uint8,
)

BG = (10, 20, 30)
CFG = PreprocessConfig(size=(8, 6), resize_filter="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                       alpha_background=BG)
EMOJI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emoji"


def rgb_of(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


# --------------------------------------------------------------------------- config


def test_config_roundtrip_and_validation() -> None:
    d = CFG.to_manifest()
    assert d["size"] == [8, 6] and d["layout"] == "NCHW"
    assert PreprocessConfig.from_manifest(d) == CFG
    from_lists = PreprocessConfig(size=[8, 6], resize_filter="bicubic", mean=[0.5, 0.4, 0.3],
                                  std=[0.2, 0.25, 0.3], alpha_background=list(BG))
    assert from_lists == CFG and hash(from_lists) == hash(CFG)
    with pytest.raises(BundleError, match="resize_filter"):
        PreprocessConfig.from_manifest({**d, "resize_filter": "super-sharp"})
    with pytest.raises(BundleError, match="missing"):
        PreprocessConfig.from_manifest({"size": [8, 8]})
    with pytest.raises(BundleError):
        PreprocessConfig.from_manifest({**d, "std": [0.2, 0.0, 0.3]})
    with pytest.raises(BundleError):
        PreprocessConfig.from_manifest({**d, "layout": "NHWC"})
    with pytest.raises(BundleError):
        PreprocessConfig.from_manifest({**d, "mean": [0.5, 0.5]})


def test_normalize_formula_and_layout() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    out = normalize(batch, CFG)
    assert out.shape == (2, 3, 8, 6) and out.dtype == np.float32 and out.flags.c_contiguous
    mean = np.asarray(CFG.mean, np.float32)
    std = np.asarray(CFG.std, np.float32)
    expected = ((batch.astype(np.float32) / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(CFG.normalize(batch), out)
    with pytest.raises(UsageError):
        normalize(batch[0], CFG)
    with pytest.raises(UsageError):
        normalize(batch.astype(np.float32), CFG)


def test_resize_and_shape(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    Image.new("RGB", (30, 17), (200, 100, 50)).save(p)
    arr = to_uint8(load_image(p, CFG), CFG)
    assert arr.shape == (8, 6, 3) and arr.dtype == np.uint8
    assert (arr == [200, 100, 50]).all()
    x = preprocess([p, p], CFG)
    assert x.shape == (2, 3, 8, 6) and x.dtype == np.float32
    assert preprocess(p, CFG).shape == (1, 3, 8, 6)
    assert preprocess([], CFG).shape == (0, 3, 8, 6)


def test_deterministic_and_filters_differ(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (33, 21, 3), dtype=np.uint8)).save(p)
    a = preprocess([p], CFG)
    np.testing.assert_array_equal(a, preprocess([p], CFG))
    nearest = PreprocessConfig(**{**CFG.__dict__, "resize_filter": "nearest"})
    assert not np.array_equal(a, preprocess([p], nearest))


# --------------------------------------------------------------------------- orientation, frames


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    img.save(p, "JPEG", exif=exif.tobytes(), quality=95)

    out = rgb_of(load_image(p, CFG))
    assert out.shape == (40, 20, 3)  # (H, W): now portrait
    top, bottom = out[5, 10], out[35, 10]
    assert top[0] > 200 and top[2] < 60  # red went to the top
    assert bottom[2] > 200 and bottom[0] < 60

    raw_cfg = PreprocessConfig(**{**CFG.__dict__, "exif_transpose": False})
    assert rgb_of(load_image(p, raw_cfg)).shape == (20, 40, 3)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as check:
        assert check.n_frames == 2
    out = rgb_of(load_image(p, CFG))
    assert tuple(out[0, 0]) == (255, 0, 0)


# --------------------------------------------------------------------------- colour modes


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, index 1 green
    img.putpixel((0, 0), 0)
    p = tmp_path / "p.png"
    img.save(p, transparency=0)  # red is fully transparent
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = rgb_of(load_image(p, CFG))
    assert tuple(out[0, 0]) == BG
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_grey_modes(tmp_path: Path) -> None:
    p = tmp_path / "l.png"
    Image.new("L", (3, 3), 100).save(p)
    assert (rgb_of(load_image(p, CFG)) == 100).all()

    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (100, 0))
    p = tmp_path / "la.png"
    la.save(p)
    with Image.open(p) as check:
        assert check.mode == "LA"
    out = rgb_of(load_image(p, CFG))
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[0, 1]) == BG

    one = Image.new("1", (2, 2), 1)
    assert (rgb_of(load_image(one, CFG)) == 255).all()


def test_rgba_composited_on_background(tmp_path: Path) -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    p = tmp_path / "rgba.png"
    img.save(p)
    out = rgb_of(load_image(p, CFG))
    assert tuple(out[0, 0]) == BG
    assert tuple(out[0, 1]) == (255, 0, 0)
    half = [(c * 128 + b * 127 + 127) // 255 for c, b in zip((255, 0, 0), BG)]
    assert list(out[0, 2]) == half
    white = PreprocessConfig(size=(8, 6), resize_filter="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    assert tuple(rgb_of(load_image(p, white))[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, "JPEG", quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = rgb_of(load_image(p, CFG))
    r, g, b = (int(v) for v in out[4, 4])
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)
    p = tmp_path / "16.png"
    Image.fromarray(arr).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    out = rgb_of(load_image(p, CFG))
    assert out[0, :, 0].tolist() == [0, 255, 128, 4]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_int_and_float_modes() -> None:
    i = Image.fromarray(np.array([[-5, 70000, 257 * 9]], dtype=np.int32), "I")
    assert rgb_of(load_image(i, CFG))[0, :, 0].tolist() == [0, 255, 9]
    f = Image.fromarray(np.array([[-1.0, 12.4, 300.0]], dtype=np.float32), "F")
    assert rgb_of(load_image(f, CFG))[0, :, 0].tolist() == [0, 12, 255]


# --------------------------------------------------------------------------- sources


def test_bytes_fileobj_pil_and_path_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (13, 11, 4), dtype=np.uint8), "RGBA")
    p = tmp_path / "x.png"
    img.save(p)
    data = p.read_bytes()
    ref = preprocess([p], CFG)
    np.testing.assert_array_equal(preprocess([str(p)], CFG), ref)
    np.testing.assert_array_equal(preprocess([data], CFG), ref)
    np.testing.assert_array_equal(preprocess([io.BytesIO(data)], CFG), ref)
    with Image.open(p) as opened:
        np.testing.assert_array_equal(preprocess([opened], CFG), ref)
    np.testing.assert_array_equal(preprocess([img], CFG), ref)


# --------------------------------------------------------------------------- errors


def _noise_png(path: Path) -> bytes:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def test_error_cases_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty"):
        load_image(empty, CFG)

    data = _noise_png(tmp_path / "full.png")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc\.png"):
        load_image(trunc, CFG)

    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes\.png.*not a recognised image"):
        load_image(text, CFG)

    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageError, match=r"folder\.png.*directory"):
        load_image(folder, CFG)

    with pytest.raises(ImageError, match=r"missing\.png.*no such file"):
        load_image(tmp_path / "missing.png", CFG)

    with pytest.raises(ImageError, match="empty"):
        load_image(b"", CFG)
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"garbage bytes", CFG)
    with pytest.raises(ImageError):
        load_image(12345, CFG)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match=r"trunc\.png"):
        preprocess([tmp_path / "full.png", trunc], CFG)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path: Path) -> None:
    p = tmp_path / "secret.png"
    _noise_png(p)
    p.chmod(0)
    try:
        with pytest.raises(ImageError, match=r"secret\.png.*permission"):
            load_image(p, CFG)
    finally:
        p.chmod(0o644)


def test_permission_error_is_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check as above, runnable as root: the OS refusal is simulated."""
    import mmedge.runtime.preprocess as pre

    p = tmp_path / "locked.png"
    _noise_png(p)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(pre, "open", refuse, raising=False)
    with pytest.raises(ImageError, match=r"locked\.png.*permission denied"):
        load_image(p, CFG)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bombs_refused(tmp_path: Path) -> None:
    huge = tmp_path / "bomb.png"
    huge.write_bytes(_png_header(100_000, 100_000))  # over Pillow's own hard limit
    with pytest.raises(ImageError, match=r"bomb\.png"):
        load_image(huge, CFG)

    side = int((MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # over our 64 Mpx limit, under Pillow's warning
    over = tmp_path / "over.png"
    over.write_bytes(_png_header(side, side))
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        load_image(over, CFG)
    with pytest.raises(ImageError):
        load_image(over.read_bytes(), CFG)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (EMOJI / "captions.csv").is_file(), reason="shared emoji data set not present")
def test_emoji_modes() -> None:
    wanted = {"P": None, "LA": None, "RGBA": None}
    with open(EMOJI / "captions.csv", newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i > 8000 or all(wanted.values()):
                break
            path = EMOJI / row["filepath"]
            with Image.open(path) as im:
                if im.mode in wanted and wanted[im.mode] is None:
                    wanted[im.mode] = path
    missing = [mode for mode, p in wanted.items() if p is None]
    assert not missing, f"no {missing} emoji found (the README lists P, LA and RGBA files)"
    found = [p for p in wanted.values() if p is not None]
    cfg = PreprocessConfig(size=(32, 32), resize_filter="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = preprocess(found, cfg)
    assert x.shape == (len(found), 3, 32, 32) and x.dtype == np.float32
    assert np.isfinite(x).all()
    for p in found:  # same pixels as compositing Pillow's RGBA conversion by hand
        with Image.open(p) as im:
            rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
        a = rgba[..., 3:4]
        expected = ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(load_image(p, cfg)), expected)


# --------------------------------------------------------------------------- load_uint8 (the copy-free path)


def _mode_zoo(tmp_path: Path, size: tuple[int, int]) -> list[Path]:
    """Files in many colour modes and containers, at ``size`` (W, H), some with EXIF orientation."""
    rng = np.random.default_rng(7)
    w, h = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (h, w), dtype=np.uint8)])
    out: list[Path] = []

    def save(img: Image.Image, name: str, fmt: str = "PNG", **kw: object) -> None:
        p = tmp_path / name
        img.save(p, fmt, **kw)
        out.append(p)

    save(Image.fromarray(rgb, "RGB"), "rgb.png")
    save(Image.fromarray(rgba, "RGBA"), "rgba.png")
    save(Image.fromarray(rgb, "RGB"), "rgb_transparency.png", transparency=tuple(int(v) for v in rgb[0, 0]))
    save(Image.fromarray(rgb, "RGB").quantize(16), "p.png")
    pt = Image.fromarray(rgb, "RGB").quantize(16)
    save(pt, "p_transparency.png", transparency=3)
    save(Image.fromarray(rgb[..., 0], "L"), "l.png")
    save(Image.fromarray(np.dstack([rgb[..., 0], rgba[..., 3]]), "LA"), "la.png")
    save(Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16)), "i16.png")
    save(Image.fromarray(rgb, "RGB").convert("CMYK"), "cmyk.jpg", "JPEG", quality=95)
    save(Image.fromarray(rgb, "RGB"), "rgb.jpg", "JPEG", quality=90)
    for orientation in (1, 3, 6, 8, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(Image.fromarray(rgb, "RGB"), f"rgb_exif{orientation}.png", exif=exif.tobytes())
        save(Image.fromarray(rgba, "RGBA"), f"rgba_exif{orientation}.png", exif=exif.tobytes())
        save(Image.fromarray(rgb, "RGB"), f"rgb_exif{orientation}.jpg", "JPEG", quality=90, exif=exif.tobytes())
    frames = [Image.fromarray(rgb, "RGB"), Image.fromarray(255 - rgb, "RGB")]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    out.append(tmp_path / "anim.png")
    return out


@pytest.mark.parametrize("exif_transpose", [True, False])
@pytest.mark.parametrize("size", [(6, 8), (5, 7), (8, 6)])  # (W, H): CFG's size (no resize), smaller, rotated
def test_load_uint8_is_bit_identical_to_load_image_and_to_uint8(tmp_path: Path, size: tuple[int, int],
                                                               exif_transpose: bool) -> None:
    cfg = PreprocessConfig(**{**CFG.__dict__, "exif_transpose": exif_transpose})
    files = _mode_zoo(tmp_path, size)
    for p in files:
        want = to_uint8(load_image(p, cfg), cfg)
        for src in (p, str(p), p.read_bytes()):
            got = load_uint8(src, cfg)
            assert got.dtype == np.uint8 and got.shape == (8, 6, 3) and got.flags.c_contiguous, p.name
            np.testing.assert_array_equal(got, want, err_msg=p.name)
    # and the batch function, which goes through load_uint8
    np.testing.assert_array_equal(preprocess(files, cfg), normalize(np.stack([to_uint8(load_image(p, cfg), cfg)
                                                                              for p in files]), cfg))


def test_load_uint8_errors_match_load_image(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"junk")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "truncated.png").write_bytes(_noise_png(tmp_path / "full.png")[:200])
    for name in ("empty.png", "junk.png", "dir.png", "truncated.png", "missing.png"):
        p = tmp_path / name
        with pytest.raises(ImageError) as old:
            load_image(p, CFG)
        with pytest.raises(ImageError) as new:
            load_uint8(p, CFG)
        assert str(new.value) == str(old.value) and name in str(new.value)


@pytest.mark.skipif(not (EMOJI / "captions.csv").is_file(), reason="shared emoji data set not present")
def test_load_uint8_on_real_files() -> None:
    cfg = PreprocessConfig(size=(64, 64), resize_filter="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with open(EMOJI / "captions.csv", newline="", encoding="utf-8") as f:
        paths = [EMOJI / row["filepath"] for i, row in zip(range(300), csv.DictReader(f))]
    for p in paths:
        np.testing.assert_array_equal(load_uint8(p, cfg), to_uint8(load_image(p, cfg), cfg), err_msg=str(p))
