"""Every bad input of docs/RELIABILITY.md, end to end through the command line (``main()``,
the console entry point, in-process) or the public API, on a tiny real bundle.

For each refused input the test checks: the exit code (usage errors 2, data errors 1), one
line on stderr that starts with ``error:``, names the file, row or argument and says why,
no traceback, nothing on stdout, and every file the command could touch (bundle, index,
dataset, the input itself) byte for byte and mtime as it was. Inputs that are odd but valid
(1x1, 16-bit, CMYK, animated, right-to-left text...) must be accepted and give a result.
A few cases also run as real subprocesses, for the process exit status and ``--debug``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_bundle import make_tiny_bundle, sample_png
from PIL import Image

from mmedge.cli.main import main
from mmedge.errors import BundleError, ImageError, SearchIndexError, TextError, UsageError
from mmedge.runtime import Bundle, Index, Item, Retriever
from mmedge.runtime.bundle import write_manifest
from mmedge.runtime.index import MAX_K
from mmedge.runtime.preprocess import MAX_IMAGE_BATCH, MAX_IMAGE_PIXELS, preprocess
from mmedge.runtime.tokenizer import MAX_BATCH, MAX_TEXT_CHARS

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 8


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny bundle, a dataset of 8 images with captions and an image index built from it by
    ``mmedge index build``. Read-only for tests: copy before changing."""
    root = tmp_path_factory.mktemp("bad-input")
    bundle = make_tiny_bundle(root / "bundle")
    data = root / "data"
    data.mkdir()
    rows = []
    for i in range(N_IMAGES):
        (data / f"{i}.png").write_bytes(sample_png(40 + i, size=(12 + i, 10)))
        rows.append((f"{i}.png", f"a red circle number {i}"))
    write_csv(data / "captions.csv", rows)
    index = root / "index"
    try:
        main(["index", "build", str(bundle), "--data", str(data / "captions.csv"), "--out", str(index),
              "--no-progress"])
    except SystemExit as e:  # pragma: no cover - reported by the assertion
        assert e.code in (0, None), e
    return {"root": root, "bundle": bundle, "data": data, "csv": data / "captions.csv", "index": index}


# ----------------------------------------------------------------------------- helpers


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("filepath", "caption")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def run_main(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def state(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``roots`` (files or folders); absent roots too."""
    out: dict[str, tuple[str, int]] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = ("absent", 0)
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            try:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                digest = "unreadable"
            out[str(p)] = (digest, p.stat().st_mtime_ns)
        if root.is_dir():
            out[str(root) + "/"] = ("dir", len(list(root.rglob("*"))))
    return out


def fails(capsys: pytest.CaptureFixture[str], args: list[Any], code: int, *needles: str,
          watch: tuple[Path, ...] = ()) -> str:
    """Run the CLI, expect exit ``code`` and one ``error:`` line containing every needle, with
    no traceback, nothing on stdout and the ``watch``ed files unchanged; returns the line."""
    before = state(*watch)
    rc, out, err = run_main(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, (rc, out, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in err
    assert out == ""
    for needle in needles:
        assert needle in line, (needle, line)
    assert state(*watch) == before, "a failed command changed files"
    return line


def succeeds(capsys: pytest.CaptureFixture[str], args: list[Any], watch: tuple[Path, ...] = ()) -> str:
    before = state(*watch)
    rc, out, err = run_main(capsys, *args)
    assert rc == 0, (rc, out, err)
    assert "Traceback" not in err
    assert state(*watch) == before
    return out


def query_image(env: dict[str, Path], image: Path | str) -> list[Any]:
    return ["query", env["bundle"], "--index", env["index"], "--image", image, "-k", 3, "--json"]


def query_text(env: dict[str, Path], text: str, k: int = 3) -> list[Any]:
    return ["query", env["bundle"], "--index", env["index"], "--text", text, "-k", k, "--json"]


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# ============================================================================ images: refused


def test_image_zero_bytes(capsys, env, tmp_path):
    p = tmp_path / "zero.png"
    p.write_bytes(b"")
    fails(capsys, query_image(env, p), 1, "zero.png", "empty (0 bytes)", watch=(p, env["bundle"], env["index"]))


def test_image_truncated_png(capsys, env, tmp_path):
    data = encode(Image.fromarray(noise(64, 64)), "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    fails(capsys, query_image(env, p), 1, "cut.png", "truncated", watch=(p, env["index"]))


def test_image_truncated_jpeg(capsys, env, tmp_path):
    data = encode(Image.fromarray(noise(64, 64)), "JPEG", quality=90)
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) * 2 // 3])
    fails(capsys, query_image(env, p), 1, "cut.jpg", "truncated", watch=(p, env["index"]))


def test_image_random_bytes_with_an_image_extension(capsys, env, tmp_path):
    p = tmp_path / "photo.jpg"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    fails(capsys, query_image(env, p), 1, "photo.jpg", "not a recognised image format", watch=(p,))


def test_image_text_file(capsys, env, tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("shopping list: milk, eggs\n")
    fails(capsys, query_image(env, p), 1, "notes.txt", "not a recognised image format", watch=(p,))


def test_image_directory(capsys, env, tmp_path):
    d = tmp_path / "album.png"
    d.mkdir()
    fails(capsys, query_image(env, d), 1, "album.png", "is a directory", watch=(d,))


def test_image_missing(capsys, env, tmp_path):
    fails(capsys, query_image(env, tmp_path / "gone.png"), 1, "gone.png", "no such file", watch=(env["index"],))


def test_image_decompression_bomb(capsys, env, tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_header(100_000, 100_000))  # 10 gigapixels declared in 100 bytes
    fails(capsys, query_image(env, p), 1, "bomb.png", "decompression bomb", watch=(p,))
    side = int((MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # over mmedge's limit, under Pillow's own
    p2 = tmp_path / "big.png"
    p2.write_bytes(png_header(side, side))
    fails(capsys, query_image(env, p2), 1, "big.png", "MAX_IMAGE_PIXELS", watch=(p2,))


def test_image_unreadable_permissions(capsys, env, tmp_path, monkeypatch):
    p = tmp_path / "locked.png"
    p.write_bytes(sample_png(3))
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        p.chmod(0)
        try:
            fails(capsys, query_image(env, p), 1, "locked.png", "permission denied")
        finally:
            p.chmod(0o644)
    import mmedge.runtime.preprocess as pre  # as root the OS refusal is simulated

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(pre, "open", refuse, raising=False)
    fails(capsys, query_image(env, p), 1, "locked.png", "permission denied", watch=(p,))


# ============================================================================ images: accepted


def accepted_image(capsys, env, path: Path) -> np.ndarray:
    """The CLI answers a query with it, and the API embeds it to a finite unit vector."""
    hits = json.loads(succeeds(capsys, query_image(env, path), watch=(path, env["index"])))
    assert len(hits) == 3
    v = Retriever(env["bundle"], providers="cpu").encode_image(path)
    assert v.shape == (1, Bundle.load(env["bundle"]).dim) and np.isfinite(v).all()
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    return v[0]


def test_image_one_by_one(capsys, env, tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(p)
    accepted_image(capsys, env, p)


@pytest.mark.parametrize("size", [(6000, 1), (1, 6000)], ids=["wide", "tall"])
def test_image_very_wide_or_tall(capsys, env, tmp_path, size):
    p = tmp_path / "strip.png"
    Image.fromarray(noise(*size)).save(p)
    accepted_image(capsys, env, p)


def test_image_16_bit(capsys, env, tmp_path):
    p = tmp_path / "deep.png"
    arr = (np.arange(32 * 16, dtype=np.uint16).reshape(16, 32) * 120).astype(np.uint16)
    Image.fromarray(arr).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    accepted_image(capsys, env, p)


def test_image_cmyk(capsys, env, tmp_path):
    p = tmp_path / "print.jpg"
    Image.fromarray(noise(24, 16)).convert("CMYK").save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    accepted_image(capsys, env, p)


def test_image_palette_with_transparency(capsys, env, tmp_path):
    p = tmp_path / "icon.png"
    img = Image.fromarray(noise(16, 16)).quantize(colors=8)
    img.info["transparency"] = 0
    img.save(p, transparency=0)
    with Image.open(p) as im:
        assert im.mode == "P" and "transparency" in im.info
    accepted_image(capsys, env, p)


def test_image_grey_with_alpha(capsys, env, tmp_path):
    p = tmp_path / "la.png"
    a = noise(16, 16)
    Image.fromarray(np.stack([a[..., 0], a[..., 1]], axis=-1), mode="LA").save(p)
    with Image.open(p) as im:
        assert im.mode == "LA"
    accepted_image(capsys, env, p)


def test_image_exif_rotated(capsys, env, tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 embeds like the upright picture."""
    upright = Image.fromarray(noise(20, 12, seed=4))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    stored.save(p, quality=100, exif=exif)
    q = tmp_path / "upright.png"
    with Image.open(p) as im:  # the same decoded pixels, turned by hand
        im.transpose(Image.Transpose.ROTATE_270).save(q)
    v = accepted_image(capsys, env, p)
    np.testing.assert_allclose(v, accepted_image(capsys, env, q), atol=1e-5)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"], ids=["animated-gif", "apng"])
def test_image_animated_first_frame(capsys, env, tmp_path, fmt):
    frames = [Image.fromarray(noise(16, 16, seed=s)) for s in (7, 8, 9)]
    if fmt == "GIF":
        frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    p = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)
    with Image.open(p) as im:
        assert getattr(im, "is_animated", False) and im.n_frames == 3
    first = tmp_path / "first.png"
    frames[0].convert("RGB").save(first)
    np.testing.assert_allclose(accepted_image(capsys, env, p), accepted_image(capsys, env, first), atol=1e-5)


# ============================================================================ texts


@pytest.mark.parametrize("text", ["", "   \t\n  ", "\x00\x00"], ids=["empty", "whitespace", "only-nul"])
def test_text_blank(capsys, env, text):
    fails(capsys, query_text(env, text), 1, "query text is empty or only whitespace",
          watch=(env["bundle"], env["index"]))
    with pytest.raises(TextError):
        Retriever(env["bundle"], env["index"], readonly=True).search(text=text)


def test_text_100k_characters(capsys, env):
    fails(capsys, query_text(env, "red " * 25_000), 1, "100000 characters", f"limit of {MAX_TEXT_CHARS}",
          "MAX_TEXT_CHARS", watch=(env["index"],))


def accepted_text(capsys, env, text: str) -> np.ndarray:
    hits = json.loads(succeeds(capsys, query_text(env, text), watch=(env["index"],)))
    assert len(hits) == 3 and all(np.isfinite(h["score"]) for h in hits)
    v = Retriever(env["bundle"], providers="cpu").encode_text(text)
    assert np.isfinite(v).all() and abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    return v[0]


def test_text_control_characters(capsys, env):
    accepted_text(capsys, env, "a red\x07 circle\x1b[31m\r\x7f\u200b\u2028")


def test_text_invalid_surrogates(capsys, env):
    v = accepted_text(capsys, env, "a red \ud800 circle \udfff")  # lone halves: replaced by '?'
    np.testing.assert_allclose(v, accepted_text(capsys, env, "a red ? circle ?"), atol=1e-6)


@pytest.mark.parametrize("text", ["דגל אדום ועיגול כחול", "دائرة حمراء", "红色的圆圈和蓝色的方块", "赤い丸"],
                         ids=["hebrew", "arabic", "chinese", "japanese"])
def test_text_right_to_left_and_cjk(capsys, env, text):
    accepted_text(capsys, env, text)


def test_text_emoji(capsys, env):
    accepted_text(capsys, env, "a red circle 🔴 and a blue square 🟦 👩‍👩‍👧‍👦")


def test_text_nul_bytes(capsys, env):
    v = accepted_text(capsys, env, "a red\x00 circle\x00")  # NUL characters are dropped
    np.testing.assert_allclose(v, accepted_text(capsys, env, "a red circle"), atol=1e-6)


# ============================================================================ datasets


def build_args(env: dict[str, Path], data: Path, out: Path, *extra: Any) -> list[Any]:
    return ["index", "build", env["bundle"], "--data", data, "--out", out, "--no-progress", *extra]


def no_build_left(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".building-" in p.name]


def test_dataset_missing_column(capsys, env, tmp_path):
    data = write_csv(tmp_path / "pairs.csv", [(str(env["data"] / "0.png"), "x")], header=("file", "caption"))
    fails(capsys, build_args(env, data, tmp_path / "out"), 1, "pairs.csv", "missing required column(s) 'filepath'",
          watch=(data,))
    no_build_left(tmp_path / "out")


def test_dataset_missing_image_file(capsys, env, tmp_path):
    rows = [(str(env["data"] / "0.png"), "first"), (str(tmp_path / "gone.png"), "second"),
            (str(env["data"] / "1.png"), "third")]
    data = write_csv(tmp_path / "pairs.csv", rows)
    out = tmp_path / "out"
    fails(capsys, build_args(env, data, out), 1, "pairs.csv row 2 (line 3)", "image not found", "gone.png",
          watch=(data,))
    no_build_left(out)
    rc, stdout, err = run_main(capsys, *build_args(env, data, out, "--skip-bad"))  # skip, count, index the rest
    assert rc == 0, err
    assert "skipped 1 bad rows" in err and "gone.png" in err
    with Index.open(out, readonly=True) as idx:
        assert len(idx) == 2


def test_dataset_file_missing(capsys, env, tmp_path):
    fails(capsys, build_args(env, tmp_path / "nope.csv", tmp_path / "out"), 1, "nope.csv", "no such file")
    no_build_left(tmp_path / "out")


def test_dataset_duplicate_keys(capsys, env, tmp_path):
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": str(env["data"] / "0.png")}],
        "annotations": [{"image_id": 1, "id": 5, "caption": "a red circle"},
                        {"image_id": 1, "id": 5, "caption": "a blue square"}],
    }))
    fails(capsys, build_args(env, coco, tmp_path / "out"), 1, "coco.json annotations[1] (id 5)", "duplicate key '1:5'",
          watch=(coco,))
    rows = [(str(env["data"] / "0.png"), "same"), (str(env["data"] / "0.png"), "same")]
    data = write_csv(tmp_path / "dup.csv", rows)
    fails(capsys, build_args(env, data, tmp_path / "out"), 1, "dup.csv row 2 (line 3)", "duplicate of dup.csv row 1")
    no_build_left(tmp_path / "out")


def test_dataset_duplicate_key_already_in_the_index(capsys, env, tmp_path):
    index = Path(shutil.copytree(env["index"], tmp_path / "index"))
    args = ["index", "add", index, "--bundle", env["bundle"], "--data", env["csv"], "--no-progress"]
    fails(capsys, args, 1, "is already in the index", watch=(index, env["data"]))
    succeeds(capsys, [*args, "--upsert"])  # replacing is explicit
    with Index.open(index, readonly=True) as idx:
        assert len(idx) == N_IMAGES
        idx.check()


def test_dataset_not_utf8(capsys, env, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"filepath,caption\n" + str(env["data"] / "0.png").encode() + b",caf\xe9 cr\xe8me\n")
    fails(capsys, build_args(env, data, tmp_path / "out"), 1, "latin1.csv", "not UTF-8", "line 2", watch=(data,))
    no_build_left(tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_dataset_empty_file(capsys, env, tmp_path, content):
    data = tmp_path / "empty.csv"
    data.write_bytes(content)
    fails(capsys, build_args(env, data, tmp_path / "out"), 1, "empty.csv", "empty file", watch=(data,))
    no_build_left(tmp_path / "out")


def test_dataset_folder_with_bad_images_skips_counts_and_indexes_the_rest(capsys, env, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shutil.copy(env["data"] / f"{i}.png", folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"a red circle {i}")
    (folder / "zero.png").write_bytes(b"")
    (folder / "zero.txt").write_text("nothing")
    (folder / "junk.jpg").write_bytes(b"this is no jpeg")
    (folder / "junk.txt").write_text("junk")
    out = tmp_path / "out"
    fails(capsys, build_args(env, folder, out), 1, "junk.jpg", "not a recognised image format", "--skip-bad",
          watch=(folder,))
    no_build_left(out)
    before = state(folder)
    rc, stdout, err = run_main(capsys, *build_args(env, folder, out, "--skip-bad"))
    assert rc == 0, err
    assert "indexed 3 images" in stdout and "skipped 2 unreadable" in stdout
    assert "junk.jpg" in err and "zero.png" in err
    assert state(folder) == before
    with Index.open(out, readonly=True) as idx:
        assert sorted(idx.keys()) == ["good0.png", "good1.png", "good2.png"]


def test_dataset_overwrite_keeps_the_old_index_when_the_new_build_fails(capsys, env, tmp_path):
    index = Path(shutil.copytree(env["index"], tmp_path / "index"))
    bad = write_csv(tmp_path / "bad.csv", [(str(tmp_path / "gone.png"), "x")])
    fails(capsys, build_args(env, bad, index, "--overwrite"), 1, "image not found", watch=(index,))
    (tmp_path / "junk.png").write_bytes(b"junk")
    bad_image = write_csv(tmp_path / "bad2.csv", [(str(env["data"] / "0.png"), "ok"), (str(tmp_path / "junk.png"), "x")])
    fails(capsys, build_args(env, bad_image, index, "--overwrite"), 1, "junk.png", watch=(index,))
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


# ============================================================================ bundles


def bundle_copy(env: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(env["bundle"], tmp_path / "bundle"))


def test_bundle_missing_file(capsys, env, tmp_path):
    b = bundle_copy(env, tmp_path)
    (b / "tokenizer.json").unlink()
    fails(capsys, ["verify", b], 1, "tokenizer.json", "missing", watch=(b,))
    fails(capsys, ["query", b, "--index", env["index"], "--text", "red"], 1, "tokenizer.json", watch=(b, env["index"]))


def test_bundle_missing_folder(capsys, env, tmp_path):
    fails(capsys, ["verify", tmp_path / "nobundle"], 1, "nobundle", "does not exist")


def test_bundle_checksum_mismatch(capsys, env, tmp_path):
    b = bundle_copy(env, tmp_path)
    onnx_file = b / "image.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    onnx_file.write_bytes(bytes(data))
    fails(capsys, ["verify", b], 1, "checksum mismatch for image.onnx", watch=(b,))
    fails(capsys, ["query", b, "--index", env["index"], "--text", "red"], 1, "checksum mismatch for image.onnx",
          watch=(b,))
    with pytest.raises(BundleError, match=r"checksum mismatch for image\.onnx"):
        Retriever(b)


def test_bundle_unknown_schema_version(capsys, env, tmp_path):
    b = bundle_copy(env, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    fails(capsys, ["verify", b], 1, "unknown schema version 99", watch=(b,))


@pytest.mark.parametrize("text", ["{ not json", "", "\xff\xfe garbage", "[1, 2]"], ids=["broken", "empty", "binary", "list"])
def test_bundle_manifest_not_json(capsys, env, tmp_path, text):
    b = bundle_copy(env, tmp_path)
    (b / "manifest.json").write_bytes(text.encode("latin-1"))
    fails(capsys, ["verify", b], 1, "manifest.json", watch=(b,))


def test_bundle_golden_vector_mismatch(capsys, env, tmp_path):
    b = bundle_copy(env, tmp_path)
    gpath = b / "golden" / "golden.json"
    g = json.loads(gpath.read_text())
    g["text_embeddings"][0][0] += 0.01
    gpath.write_text(json.dumps(g))
    write_manifest(b, dict(Bundle.load(b, verify_checksums=False).manifest))  # checksums match again
    Bundle.load(b)  # the bundle loads: only the golden check can tell
    fails(capsys, ["verify", b], 1, "golden check failed", "text embeddings differ", watch=(b,))


# ============================================================================ indexes


def index_copy(env: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(env["index"], tmp_path / "index"))


def hnsw_file(index: Path) -> Path:
    (f,) = index.glob("hnsw.*.bin")
    return f


def test_index_wrong_embedding_fingerprint(capsys, env, tmp_path):
    other = bundle_copy(env, tmp_path)
    m = json.loads((other / "manifest.json").read_text())
    m["embedding"]["fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    fails(capsys, ["query", other, "--index", env["index"], "--text", "red"], 1, "f" * 64, "was built for embedding space",
          watch=(other, env["index"]))
    fails(capsys, ["index", "add", env["index"], "--bundle", other, "--data", env["csv"], "--no-progress"], 1,
          "was built for embedding space", watch=(env["index"],))


def test_index_truncated_file(capsys, env, tmp_path):
    index = index_copy(env, tmp_path)
    f = hnsw_file(index)
    f.write_bytes(f.read_bytes()[:-100])
    fails(capsys, ["query", env["bundle"], "--index", index, "--text", "red"], 1, f.name, "corrupt or truncated",
          watch=(index,))
    fails(capsys, ["index", "info", index], 1, f.name, watch=(index,))
    fails(capsys, ["index", "add", index, "--bundle", env["bundle"], "--data", env["csv"], "--no-progress"], 1,
          f.name, watch=(index,))


def test_index_sqlite_and_hnsw_disagree(capsys, env, tmp_path):
    index = index_copy(env, tmp_path)
    with sqlite3.connect(index / "items.sqlite") as conn:  # an item row vanishes behind the index's back
        conn.execute("DELETE FROM items WHERE key = '3.png'")
    conn.close()
    fails(capsys, ["query", env["bundle"], "--index", index, "--text", "red"], 1,
          f"holds {N_IMAGES} live vectors but", f"has {N_IMAGES - 1} items", watch=(index,))
    fails(capsys, ["index", "remove", index, "0.png"], 1, "live vectors", watch=(index,))


def test_index_row_without_its_vector(capsys, env, tmp_path):
    index = index_copy(env, tmp_path)
    with sqlite3.connect(index / "items.sqlite") as conn:  # same count, but a row names a label the graph lacks
        conn.execute("UPDATE items SET label = 999 WHERE key = '2.png'")
        conn.execute("UPDATE meta SET v = '1000' WHERE k = 'next_label'")
    conn.close()
    for args in (["index", "info", index], ["query", env["bundle"], "--index", index, "--text", "red"]):
        fails(capsys, args, 1, "disagree", "label 999 is in", "not live in the graph", watch=(index,))


def test_index_graph_link_that_would_crash_hnswlib(capsys, env, tmp_path):
    """Upper-level links to an element that does not reach that level: hnswlib follows such a
    link without checking and reads through a null pointer (SIGSEGV, found by fuzzing; this
    very file crashes hnswlib 0.8 when searched for the vector of ``ground``). mmedge refuses
    the file before hnswlib loads it."""
    import mmedge.runtime.index as index_mod

    rng = np.random.default_rng(0)
    folder = tmp_path / "graph"
    with Index.create(folder, 8, "fp", index_mod.IndexParams(M=4, ef_construction=20, ef=10)) as idx:
        idx.add([Item(key=f"k{i}") for i in range(300)], rng.standard_normal((300, 8)).astype(np.float32))
        idx.save()
    f = hnsw_file(folder)
    data = bytearray(f.read_bytes())
    head = index_mod._HEADER.unpack_from(data)
    cur, sdpe, max_m = head[2], head[3], head[8]
    pos, levels, lists = index_mod._HEADER.size + cur * sdpe, [], []
    for _ in range(cur):  # walk the upper-level link lists
        (n,) = struct.unpack_from("<I", data, pos)
        levels.append(n // (max_m * 4 + 4))
        if n:
            lists.append(pos + 4)  # this element's level-1 list: count, then neighbour ids
        pos += 4 + n
    ground = levels.index(0)  # an element with no upper level
    for p in lists:  # every level-1 link now points at it
        for j in range(struct.unpack_from("<I", data, p)[0] & 0xFFFF):
            struct.pack_into("<I", data, p + 4 + 4 * j, ground)
    f.write_bytes(bytes(data))
    before = state(folder)
    with pytest.raises(SearchIndexError, match="links to a neighbour above that neighbour's level"):
        Index.open(folder)
    fails(capsys, ["index", "info", folder], 1, f.name, "corrupt", watch=(folder,))
    assert state(folder) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_index_item_store_damaged(capsys, env, tmp_path, damage):
    index = index_copy(env, tmp_path)
    db = index / "items.sqlite"
    if damage == "garbage":
        db.write_bytes(np.random.default_rng(2).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    else:
        db.write_bytes(db.read_bytes()[:3000])
    for args in (["query", env["bundle"], "--index", index, "--text", "red"], ["index", "info", index],
                 ["index", "remove", index, "0.png"]):
        fails(capsys, args, 1, "items.sqlite", watch=(index,))


def test_index_dimension_mismatch_on_add(env, tmp_path):
    index = index_copy(env, tmp_path)
    before = state(index)
    with Index.open(index) as idx:
        with pytest.raises(UsageError, match=rf"dimension 8, the index holds {idx.dim}-dimensional"):
            idx.add([Item(key="new")], np.ones((1, 8), np.float32))
        with pytest.raises(UsageError, match="query vectors have dimension 8"):
            idx.search(np.ones(8, np.float32))
        assert len(idx) == N_IMAGES and "new" not in idx
    assert state(index) == before


def test_index_missing(capsys, env, tmp_path):
    fails(capsys, ["query", env["bundle"], "--index", tmp_path / "noindex", "--text", "red"], 1, "noindex",
          "does not exist")


def test_index_description_not_json(capsys, env, tmp_path):
    index = index_copy(env, tmp_path)
    (index / "index.json").write_text("{{{")
    fails(capsys, ["query", env["bundle"], "--index", index, "--text", "red"], 1, "index.json", "not valid JSON",
          watch=(index,))


# ============================================================================ command line


def test_cli_unknown_flag(capsys, env):
    line = fails(capsys, ["query", env["bundle"], "--index", env["index"], "--text", "red", "--frobnicate"], 2,
                 "No such option: --frobnicate")
    assert "mmedge query --help" in line
    fails(capsys, ["frobnicate"], 2, "frobnicate")


@pytest.mark.parametrize("k", ["0", "-1", "-99999999999999999999"])
def test_cli_k_not_positive(capsys, env, k):
    fails(capsys, ["query", env["bundle"], "--index", env["index"], "--text", "red", "-k", k], 2, "-k must be at least 1")


@pytest.mark.parametrize("k", [str(MAX_K + 1), "99999999999999999999999"])
def test_cli_k_huge(capsys, env, k):
    fails(capsys, ["query", env["bundle"], "--index", env["index"], "--text", "red", "-k", k], 2, "MAX_K",
          watch=(env["index"],))


def test_cli_k_larger_than_the_index_is_fine(capsys, env):
    hits = json.loads(succeeds(capsys, query_text(env, "a red circle", k=MAX_K)))
    assert len(hits) == N_IMAGES


def test_cli_k_not_a_number(capsys, env):
    fails(capsys, ["query", env["bundle"], "--index", env["index"], "--text", "red", "-k", "ten"], 2, "'-k'")


def test_cli_both_text_and_image(capsys, env):
    fails(capsys, ["query", env["bundle"], "--index", env["index"], "--text", "red", "--image", env["data"] / "0.png"],
          2, "exactly one of --text or --image")


def test_cli_neither_text_nor_image(capsys, env):
    fails(capsys, ["query", env["bundle"], "--index", env["index"]], 2, "exactly one of --text or --image")


@pytest.mark.parametrize("size", ["0", "-5", str(MAX_IMAGE_BATCH + 1)])
def test_cli_batch_size_out_of_range(capsys, env, tmp_path, size):
    fails(capsys, build_args(env, env["csv"], tmp_path / "out", "--batch-size", size), 2, "--batch-size must be between 1")
    no_build_left(tmp_path / "out")


def test_cli_missing_argument(capsys, env):
    fails(capsys, ["index", "build", env["bundle"]], 2, "Missing option")


# ============================================================================ limits (API)


def test_limit_image_batch(env):
    with pytest.raises(UsageError, match="MAX_IMAGE_BATCH"):
        preprocess([env["data"] / "0.png"] * (MAX_IMAGE_BATCH + 1), Bundle.load(env["bundle"]).preprocess)
    with pytest.raises(UsageError, match="MAX_IMAGE_BATCH"):
        Retriever(env["bundle"], providers="cpu").encode_image([env["data"] / "0.png"], batch_size=MAX_IMAGE_BATCH + 1)


def test_limit_text_batch_and_type(env):
    r = Retriever(env["bundle"], providers="cpu")
    with pytest.raises(UsageError, match="MAX_BATCH"):
        r.encode_text(["red"] * (MAX_BATCH + 1), batch_size=MAX_BATCH + 1)
    assert r.encode_text(["red"] * (MAX_BATCH + 1)).shape[0] == MAX_BATCH + 1  # split into batches
    with pytest.raises(TextError, match="must be a str"):
        r.encode_text([b"bytes"])  # type: ignore[list-item]


def test_limit_blank_caption_refused_on_add(env, tmp_path):
    index = index_copy(env, tmp_path)
    before = state(index)
    with Index.open(index) as idx:
        r = Retriever(env["bundle"], idx, providers="cpu")
        with pytest.raises(TextError, match="'blank'"):
            r.add_texts(["fine text", "  "], keys=["fine", "blank"])
        assert "fine" not in idx
    assert state(index) == before


def test_limit_k_in_the_api(env):
    r = Retriever(env["bundle"], env["index"], readonly=True)
    with pytest.raises(UsageError, match="MAX_K"):
        r.search(text="red", k=MAX_K + 1)
    with pytest.raises(UsageError):
        r.search(text="red", k=0)
    assert len(r.search(text="red", k=MAX_K)) == N_IMAGES


def test_no_pickle_on_any_load_path():
    """Nothing under mmedge/ unpickles: torch.load always with weights_only=True, numpy
    never with allow_pickle=True, and no pickle/marshal/shelve imports."""
    offenders = []
    for path in sorted((ROOT / "mmedge").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for no, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if "allow_pickle=True" in code or any(f"import {m}" in code for m in ("pickle", "marshal", "shelve", "dill")):
                offenders.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
        for call in text.split("torch.load(")[1:]:
            if "weights_only=True" not in call.split(")")[0]:
                offenders.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not offenders, offenders


# ============================================================================ console entry point


@pytest.mark.parametrize("case", ["zero-image", "blank-text", "long-text", "k-huge", "k-zero", "both", "bad-index"])
def test_console_entry_answers_like_the_app(capsys, env, tmp_path, case):
    """The installed ``mmedge`` script (mmedge.cli.entry) answers plain queries without typer;
    it must give the same exit code and the same error line as the typer app."""
    from mmedge.cli.entry import main as entry_main

    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    args = {
        "zero-image": query_image(env, zero),
        "blank-text": query_text(env, "  "),
        "long-text": query_text(env, "x" * (MAX_TEXT_CHARS + 1)),
        "k-huge": query_text(env, "red", k=MAX_K + 1),
        "k-zero": query_text(env, "red", k=0),
        "both": ["query", env["bundle"], "--index", env["index"], "--text", "red", "--image", zero],
        "bad-index": ["query", env["bundle"], "--index", tmp_path / "noindex", "--text", "red"],
    }[case]
    results = []
    for entry in (main, entry_main):
        capsys.readouterr()
        try:
            entry([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        results.append((code, err.strip()))
    assert results[0] == results[1]
    assert results[0][0] in (1, 2) and results[0][1].startswith("error: ") and "\n" not in results[0][1]


# ============================================================================ real processes


_MODULES_AT_EXIT = r"""
import atexit, json, sys
atexit.register(lambda: sys.stderr.write("\nMODULES " + json.dumps(sorted(sys.modules)) + "\n"))
from mmedge.cli.entry import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("mode", ["text", "image"])
def test_text_query_process_never_imports_pillow(env, mode):
    """Pillow is imported only when an image is decoded: a text query process never loads it
    (it is part of a cold query's start-up); an image query does (the probe sees it)."""
    args = query_text(env, "a red circle") if mode == "text" else query_image(env, env["data"] / "0.png")
    base_env = {k: v for k, v in os.environ.items() if k != "MMEDGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", _MODULES_AT_EXIT, *map(str, args)], cwd=ROOT, env=base_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 3
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES ")][-1]
    pil = [m for m in json.loads(line[len("MODULES "):]) if m == "PIL" or m.startswith("PIL.")]
    if mode == "text":
        assert pil == []
    else:
        assert "PIL.Image" in pil


@pytest.mark.parametrize("module", ["mmedge.cli.entry", "mmedge.cli.main"])  # the console script, the app
@pytest.mark.parametrize(
    "case,code,needle",
    [("bad-image", 1, "not a recognised image format"), ("usage", 2, "exactly one of"),
     ("bad-bundle", 1, "does not exist"), ("bad-flag", 2, "No such option")],
)
def test_process_exit_status_and_debug(env, tmp_path, case, code, needle, module):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"junk")
    args = {
        "bad-image": ["query", env["bundle"], "--index", env["index"], "--image", junk],
        "usage": ["query", env["bundle"], "--index", env["index"]],
        "bad-bundle": ["verify", tmp_path / "missing-bundle"],
        "bad-flag": ["verify", env["bundle"], "--nope"],
    }[case]
    base_env = {k: v for k, v in os.environ.items() if k != "MMEDGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=base_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert proc.stdout == ""
    if case in ("bad-image", "bad-bundle"):  # --debug shows where it came from
        proc = subprocess.run([sys.executable, "-m", module, "--debug", *map(str, args)], cwd=ROOT,
                              env=base_env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" in proc.stderr
        assert ("ImageError" if case == "bad-image" else "BundleError") in proc.stderr
