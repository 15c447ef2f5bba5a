"""Tests for the built-in synthetic dataset (mmedge.data.synthetic)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmedge.data import load_pairs
from mmedge.data.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SPLITS,
    caption_scene,
    encode_png,
    generate,
    render_scene,
    sample_scene,
)
from mmedge.errors import UsageError

SMALL = {"n_train": 24, "n_val": 6, "n_test": 10}
SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset with a full-size (1000 image) test split."""
    return generate(tmp_path_factory.mktemp("big") / "synthetic", seed=0, n_train=10, n_val=5, n_test=1000)


def test_layout_and_sizes(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    calls: list[tuple[int, int]] = []
    paths = generate(out, seed=3, **SMALL, on_progress=lambda done, total: calls.append((done, total)))
    assert set(paths) == set(SPLITS)
    assert (out / "synthetic.json").is_file()
    for split, n in zip(SPLITS, SMALL.values()):
        assert paths[split] == out / split / "captions.csv"
        with paths[split].open(encoding="utf-8", newline="") as f:
            assert next(csv.reader(f)) == ["filepath", "caption", "n_objects"]
        rows = read_rows(paths[split])
        assert len(rows) == n
        assert [r["filepath"] for r in rows] == [f"images/{i:06d}.png" for i in range(n)]
        assert len(list((out / split / "images").iterdir())) == n
        for row in rows[:5]:
            with Image.open(out / split / row["filepath"]) as im:
                assert im.format == "PNG"
                assert im.mode == "RGB"
                assert im.size == (64, 64)
    total = sum(SMALL.values())
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # Nothing left behind next to the output folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_loads_through_load_pairs(tmp_path: Path) -> None:
    paths = generate(tmp_path / "s", seed=1, **SMALL)
    result = load_pairs(paths["train"])
    assert len(result.pairs) == SMALL["n_train"]
    assert result.skipped == []
    assert set(result.pairs[0].extra) == {"n_objects"}


def test_same_seed_is_byte_identical(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", seed=5, **SMALL)
    b = generate(tmp_path / "b", seed=5, **SMALL)
    c = generate(tmp_path / "c", seed=6, **SMALL)
    for split in SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
        for name in ("000000.png", "000003.png", "000005.png"):
            img_a = (a[split].parent / "images" / name).read_bytes()
            assert img_a == (b[split].parent / "images" / name).read_bytes()
            assert img_a != (c[split].parent / "images" / name).read_bytes()
    # Splits use different random streams.
    captions = {split: [r["caption"] for r in read_rows(a[split])][:6] for split in SPLITS}
    assert captions["train"] != captions["val"] != captions["test"] != captions["train"]


def test_split_content_depends_only_on_its_own_size(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", seed=2, n_train=5, n_val=5, n_test=8)
    b = generate(tmp_path / "b", seed=2, n_train=9, n_val=3, n_test=8)
    assert a["test"].read_bytes() == b["test"].read_bytes()
    # A smaller split is a prefix of a larger one.
    assert read_rows(a["train"]) == read_rows(b["train"])[:5]


def test_reuse_and_regenerate(tmp_path: Path) -> None:
    out = tmp_path / "s"
    paths = generate(out, seed=0, **SMALL)
    stamps = {s: paths[s].stat().st_mtime_ns for s in SPLITS}
    calls: list[tuple[int, int]] = []
    generate(out, seed=0, **SMALL, on_progress=lambda d, t: calls.append((d, t)))
    assert {s: paths[s].stat().st_mtime_ns for s in SPLITS} == stamps
    total = sum(SMALL.values())
    assert calls[-1] == (total, total)
    # Changing one split's size regenerates only that split.
    generate(out, seed=0, n_train=SMALL["n_train"], n_val=4, n_test=SMALL["n_test"])
    assert paths["train"].stat().st_mtime_ns == stamps["train"]
    assert paths["test"].stat().st_mtime_ns == stamps["test"]
    assert len(read_rows(paths["val"])) == 4
    assert len(list((out / "val" / "images").iterdir())) == 4
    # A damaged split is rebuilt.
    (out / "test" / "images" / "000001.png").unlink()
    generate(out, seed=0, n_train=SMALL["n_train"], n_val=4, n_test=SMALL["n_test"])
    assert (out / "test" / "images" / "000001.png").is_file()
    # A different seed rebuilds everything.
    before = paths["train"].read_bytes()
    generate(out, seed=1, n_train=SMALL["n_train"], n_val=4, n_test=SMALL["n_test"])
    assert paths["train"].read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="seed"):
        generate(tmp_path / "x", seed=-1)
    with pytest.raises(UsageError, match="n_val"):
        generate(tmp_path / "x", n_train=3, n_val=0, n_test=3)


def test_test_split_captions_are_unique(big: dict[str, Path]) -> None:
    captions = [r["caption"] for r in read_rows(big["test"])]
    assert len(captions) == 1000
    assert len(set(captions)) >= 990


def test_captions_mention_every_object(big: dict[str, Path]) -> None:
    rows = read_rows(big["test"])
    counts = {1: 0, 2: 0, 3: 0}
    for row in rows:
        n = int(row["n_objects"])
        counts[n] += 1
        caption = row["caption"]
        assert caption == caption.lower()
        assert len(SHAPE_RE.findall(caption)) == n, caption
        assert len(re.findall(r"\b(small|large)\b", caption)) == n, caption
        assert len(re.findall(r"\b(" + "|".join(COLOURS) + r")\b", caption)) == n, caption
    # Probabilities 0.2 / 0.4 / 0.4.
    assert 140 <= counts[1] <= 260
    assert 330 <= counts[2] <= 470
    assert 330 <= counts[3] <= 470


def test_scene_captions_describe_each_object() -> None:
    rng = np.random.default_rng(123)
    for _ in range(300):
        scene = sample_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        caption = caption_scene(scene, rng)
        for o in scene.objects:
            assert o.phrase() in caption
            assert o.position in caption
            assert all(200 <= c <= 255 for c in scene.background)


def _cell_of(caption: str) -> int:
    """Grid cell named in a one-object caption (longest position name first)."""
    for cell in sorted(range(9), key=lambda c: -len(POSITIONS[c])):
        if re.search(rf"\b{POSITIONS[cell]}\b", caption):
            return cell
    raise AssertionError(f"no position in {caption!r}")


def test_pixels_match_colour_and_position(big: dict[str, Path]) -> None:
    folder = big["test"].parent
    checked: dict[str, int] = {}
    for row in read_rows(big["test"]):
        if row["n_objects"] != "1":
            continue
        caption = row["caption"]
        colour = next(c for c in COLOURS if re.search(rf"\b{c}\b", caption))
        cell = _cell_of(caption)
        with Image.open(folder / row["filepath"]) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
        close = np.abs(pixels - np.array(COLOURS[colour])).max(axis=2) <= 40
        r, c = divmod(cell, 3)
        y0, y1 = max(0, int(r * 64 / 3) - 3), min(64, int((r + 1) * 64 / 3) + 3)
        x0, x1 = max(0, int(c * 64 / 3) - 3), min(64, int((c + 1) * 64 / 3) + 3)
        inside = int(close[y0:y1, x0:x1].sum())
        outside = int(close.sum()) - inside
        assert inside >= 15, (caption, inside)
        assert outside <= 2, (caption, outside)
        checked[colour] = checked.get(colour, 0) + 1
    assert checked.get("red", 0) >= 5
    assert set(checked) == set(COLOURS)


def test_render_and_encode_png() -> None:
    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    image = render_scene(scene, rng)
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image)
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), pixels)
