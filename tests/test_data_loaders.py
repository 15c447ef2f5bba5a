"""Tests for mmedge.data.load_pairs: every format, every error, skip_bad, real data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmedge.data import LoadResult, Pair, load_pairs
from mmedge.errors import DatasetError, UsageError

REPO = Path(__file__).resolve().parents[1]
EMOJI = REPO.parent / "shared" / "data" / "emoji"


def make_png(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    make_png(tmp_path / "images" / "a.png")
    make_png(tmp_path / "images" / "b.png", (10, 10, 200))
    make_png(tmp_path / "images" / "c.png", (10, 200, 10))
    return tmp_path


# ---------------------------------------------------------------- round trips


def test_csv_round_trip(images: Path, tmp_path: Path) -> None:
    outside = make_png(tmp_path / "elsewhere" / "z.png")
    src = write(
        images / "captions.csv",
        "filepath,caption,group\n"
        "images/a.png,a red square,1\n"
        'images/b.png,"a blue square, quoted",2\n'
        f"{outside},an absolute path,3\n",
    )
    result = load_pairs(src)
    assert isinstance(result, LoadResult)
    assert result.source == src
    assert result.skipped == []
    assert [p.caption for p in result.pairs] == [
        "a red square",
        "a blue square, quoted",
        "an absolute path",
    ]
    first = result.pairs[0]
    assert isinstance(first, Pair)
    assert first.image == images / "images" / "a.png"
    assert first.image.is_absolute()
    assert first.key == "images/a.png"
    assert first.extra == {"group": "1"}
    assert result.pairs[2].image == outside
    assert result.pairs[2].key == str(outside)


def test_csv_relative_path_argument(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(images / "captions.csv", "filepath,caption\nimages/a.png,red\n")
    monkeypatch.chdir(images)
    result = load_pairs("captions.csv")
    assert result.pairs[0].image == images / "images" / "a.png"
    assert result.source == images / "captions.csv"


def test_csv_with_bom_and_crlf(images: Path) -> None:
    src = images / "captions.csv"
    src.write_bytes("filepath,caption\r\nimages/a.png,caf\u00e9 au lait\r\n".encode("utf-8-sig"))
    result = load_pairs(src)
    assert result.pairs[0].caption == "caf\u00e9 au lait"
    assert result.pairs[0].key == "images/a.png"


def test_tsv_round_trip(images: Path) -> None:
    src = write(images / "data.tsv", "caption\tfilepath\tsplit\na, b and c\timages/c.png\ttest\n")
    result = load_pairs(src)
    assert result.pairs == [
        Pair(images / "images" / "c.png", "a, b and c", "images/c.png", {"split": "test"})
    ]


def test_custom_columns_and_explicit_format(images: Path) -> None:
    src = write(images / "list.txt", "img,text\nimages/a.png,red\n")
    result = load_pairs(src, fmt="csv", image_column="img", caption_column="text")
    assert result.pairs[0].caption == "red"
    assert result.pairs[0].extra == {}


def test_jsonl_round_trip(images: Path) -> None:
    src = write(
        images / "pairs.jsonl",
        json.dumps({"filepath": "images/a.png", "caption": "red", "group": 7}) + "\n"
        "\n"
        + json.dumps({"filepath": "images/b.png", "caption": "blue", "note": "x"})
        + "\n",
    )
    result = load_pairs(src)
    assert [(p.key, p.caption) for p in result.pairs] == [("images/a.png", "red"), ("images/b.png", "blue")]
    assert result.pairs[0].extra == {"group": "7"}
    assert result.pairs[1].extra == {"note": "x"}
    assert result.pairs[1].image == images / "images" / "b.png"


def test_coco_round_trip(tmp_path: Path) -> None:
    make_png(tmp_path / "beside.png")
    make_png(tmp_path / "images" / "inside.png")
    doc = {
        "images": [{"id": 1, "file_name": "beside.png"}, {"id": 2, "file_name": "inside.png"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "first caption "},
            {"image_id": 1, "id": 11, "caption": "second caption"},
            {"image_id": 2, "id": 12, "caption": "third caption"},
        ],
    }
    src = write(tmp_path / "captions_val.json", json.dumps(doc))
    result = load_pairs(src)
    assert [p.key for p in result.pairs] == ["1:10", "1:11", "2:12"]
    assert [p.caption for p in result.pairs] == ["first caption", "second caption", "third caption"]
    assert result.pairs[0].image == tmp_path / "beside.png"
    assert result.pairs[2].image == tmp_path / "images" / "inside.png"
    assert [p.extra["image_id"] for p in result.pairs] == ["1", "1", "2"]


def test_folder_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_png(root / "a.png")
    write(root / "a.txt", "  a red square \n")
    make_png(root / "sub" / "b.PNG")
    write(root / "sub" / "b.txt", "a blue square")
    Image.new("RGB", (8, 8)).save(root / "c.jpg")  # no caption: skipped, not an error
    write(root / "notes.txt", "not a caption of anything")
    result = load_pairs(root)
    assert [(p.key, p.caption) for p in result.pairs] == [
        ("a.png", "a red square"),
        ("sub/b.PNG", "a blue square"),
    ]
    assert result.pairs[1].image == root / "sub" / "b.PNG"
    assert result.skipped == [("c.jpg", "no caption file c.txt")]


def test_same_image_with_several_captions_gets_unique_keys(images: Path) -> None:
    src = write(
        images / "captions.csv",
        "filepath,caption\nimages/a.png,one\nimages/a.png,two\nimages/b.png,x\nimages/a.png,three\n",
    )
    keys = [p.key for p in load_pairs(src).pairs]
    assert keys == ["images/a.png", "images/a.png#2", "images/b.png", "images/a.png#3"]
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------- errors


def test_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.csv: no such file"):
        load_pairs(tmp_path / "missing.csv")


def test_empty_file(tmp_path: Path) -> None:
    src = write(tmp_path / "captions.csv", "\n  \n")
    with pytest.raises(DatasetError, match=r"captions\.csv: empty file"):
        load_pairs(src, skip_bad=True)


def test_header_only(tmp_path: Path) -> None:
    src = write(tmp_path / "captions.csv", "filepath,caption\n")
    with pytest.raises(DatasetError, match=r"captions\.csv: no data rows"):
        load_pairs(src)


def test_missing_column_lists_columns_found(images: Path) -> None:
    src = write(images / "captions.csv", "image,text,group\nimages/a.png,red,1\n")
    with pytest.raises(
        DatasetError, match=r"captions\.csv: missing required column.*'filepath'.*found: 'image', 'text', 'group'"
    ):
        load_pairs(src, skip_bad=True)


def test_missing_image_names_row(images: Path) -> None:
    src = write(images / "captions.csv", "filepath,caption\nimages/a.png,red\nimages/x.png,gone\n")
    with pytest.raises(DatasetError, match=r"/captions\.csv row 2 \(line 3\): image not found: images/x\.png"):
        load_pairs(src)


def test_empty_caption_names_row(images: Path) -> None:
    src = write(images / "captions.csv", 'filepath,caption\nimages/a.png,red\nimages/b.png," "\n')
    with pytest.raises(DatasetError, match=r"row 2 \(line 3\): empty caption"):
        load_pairs(src)


def test_missing_field_in_short_row(images: Path) -> None:
    src = write(images / "captions.csv", "filepath,caption\nimages/a.png\n")
    with pytest.raises(DatasetError, match=r"row 1 \(line 2\): empty caption"):
        load_pairs(src)


def test_too_many_fields(images: Path) -> None:
    src = write(images / "captions.csv", "filepath,caption\nimages/a.png,red,extra\n")
    with pytest.raises(DatasetError, match=r"row 1 \(line 2\): 3 fields, but the header has 2"):
        load_pairs(src)


def test_duplicate_pair_names_both_rows(images: Path) -> None:
    src = write(
        images / "captions.csv",
        "filepath,caption\nimages/a.png,red\nimages/b.png,blue\nimages/a.png,red\n",
    )
    with pytest.raises(DatasetError, match=r"row 3 \(line 4\): duplicate of captions\.csv row 1"):
        load_pairs(src)


def test_not_utf8_names_offset_and_line(images: Path) -> None:
    src = images / "captions.csv"
    body = b"filepath,caption\nimages/a.png,red\nimages/b.png,caf\xe9\n"
    src.write_bytes(body)
    offset = body.index(b"\xe9")
    with pytest.raises(DatasetError, match=rf"captions\.csv: not UTF-8.*byte offset {offset} \(line 3\)"):
        load_pairs(src, skip_bad=True)


def test_malformed_json_line(images: Path) -> None:
    src = write(
        images / "pairs.jsonl",
        '{"filepath": "images/a.png", "caption": "red"}\n{"filepath": "images/b.png", caption}\n',
    )
    with pytest.raises(DatasetError, match=r"/pairs\.jsonl line 2: malformed JSON"):
        load_pairs(src)


def test_jsonl_missing_field_everywhere_is_file_level(images: Path) -> None:
    src = write(images / "pairs.jsonl", '{"image": "images/a.png", "caption": "red"}\n')
    with pytest.raises(DatasetError, match=r"missing required field.*'filepath'.*found: 'caption', 'image'"):
        load_pairs(src, skip_bad=True)


def test_jsonl_missing_field_on_one_line(images: Path) -> None:
    src = write(
        images / "pairs.jsonl",
        '{"filepath": "images/a.png", "caption": "red"}\n{"filepath": "images/b.png"}\n',
    )
    with pytest.raises(DatasetError, match=r"line 2: missing field\(s\) 'caption'"):
        load_pairs(src)


def test_coco_errors(tmp_path: Path) -> None:
    make_png(tmp_path / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "gone.png"}],
        "annotations": [
            {"image_id": 1, "id": 1, "caption": "red"},
            {"image_id": 2, "id": 2, "caption": "missing image"},
            {"image_id": 3, "id": 3, "caption": "unknown image id"},
            {"image_id": 1, "id": 4, "caption": ""},
            {"image_id": 1, "id": 5, "caption": "red"},
            {"image_id": 1, "id": 1, "caption": "same annotation id"},
        ],
    }
    src = write(tmp_path / "coco.json", json.dumps(doc))
    with pytest.raises(DatasetError, match=r"coco\.json annotations\[1\] \(id 2\): image not found: gone\.png"):
        load_pairs(src)
    result = load_pairs(src, skip_bad=True)
    assert [p.key for p in result.pairs] == ["1:1"]
    reasons = [reason for _, reason in result.skipped]
    assert [where for where, _ in result.skipped] == [
        f"coco.json annotations[{i}] (id {i + 1})" for i in range(1, 5)
    ] + ["coco.json annotations[5] (id 1)"]
    assert reasons[1] == "image_id 3 is not in 'images'"
    assert reasons[2] == "empty caption"
    assert reasons[3].startswith("duplicate of coco.json annotations[0] (id 1)")
    assert reasons[4] == "duplicate key '1:1'"


def test_coco_missing_keys_and_bad_json(tmp_path: Path) -> None:
    src = write(tmp_path / "coco.json", json.dumps({"images": []}))
    with pytest.raises(DatasetError, match=r"missing required key.*'annotations'.*found: 'images'"):
        load_pairs(src, skip_bad=True)
    write(src, '{"images": [],\n "annotations": [}')
    with pytest.raises(DatasetError, match=r"coco\.json: line 2 column .*malformed JSON"):
        load_pairs(src, skip_bad=True)


def test_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        load_pairs(root)
    make_png(root / "a.png")
    with pytest.raises(DatasetError, match=r"none of the 1 image\(s\) has a same-named \.txt"):
        load_pairs(root)
    write(root / "a.txt", "  \n")
    make_png(root / "b.png")
    write(root / "b.txt", "blue")
    with pytest.raises(DatasetError, match=r"data/a\.png: empty caption in a\.txt"):
        load_pairs(root)
    assert load_pairs(root, skip_bad=True).skipped == [("a.png", "empty caption in a.txt")]


def test_unknown_extension_and_bad_format(images: Path) -> None:
    src = write(images / "captions.xlsx", "x")
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        load_pairs(src)
    with pytest.raises(UsageError, match="unknown dataset format"):
        load_pairs(src, fmt="parquet")


# ---------------------------------------------------------------- skip_bad


def test_skip_bad_counts_row_problems(images: Path) -> None:
    src = write(
        images / "captions.csv",
        "filepath,caption\n"
        "images/a.png,red\n"
        "images/x.png,missing image\n"
        "images/b.png,\n"
        "images/a.png,red\n"
        "images/c.png,green\n",
    )
    result = load_pairs(src, skip_bad=True)
    assert [p.key for p in result.pairs] == ["images/a.png", "images/c.png"]
    assert len(result.skipped) == 3
    assert result.skipped[0] == ("captions.csv row 2 (line 3)", "image not found: images/x.png")
    assert result.skipped[1] == ("captions.csv row 3 (line 4)", "empty caption")
    assert result.skipped[2][0] == "captions.csv row 4 (line 5)"
    assert result.skipped[2][1].startswith("duplicate of captions.csv row 1 (line 2)")


def test_skip_bad_jsonl(images: Path) -> None:
    src = write(
        images / "pairs.jsonl",
        '{"filepath": "images/a.png", "caption": "red"}\nnot json\n[1, 2]\n'
        '{"filepath": "images/b.png", "caption": "blue"}\n',
    )
    result = load_pairs(src, skip_bad=True)
    assert len(result.pairs) == 2
    assert [w for w, _ in result.skipped] == ["pairs.jsonl line 2", "pairs.jsonl line 3"]
    assert result.skipped[0][1].startswith("malformed JSON")


# ---------------------------------------------------------------- real data


def test_emoji_slice(tmp_path: Path) -> None:
    src = EMOJI / "captions.csv"
    if not src.is_file():
        pytest.skip(f"{EMOJI} is not present")
    with src.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fieldnames = list(reader.fieldnames or [])
        rows = [row for _, row in zip(range(50), reader)]
    for row in rows:
        target = tmp_path / row["filepath"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EMOJI / row["filepath"], target)
    dst = tmp_path / "captions.csv"
    with dst.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    result = load_pairs(dst)
    assert len(result.pairs) == 50
    assert result.skipped == []
    for pair, row in zip(result.pairs, rows):
        assert pair.image == tmp_path / row["filepath"]
        assert pair.caption == row["caption"].strip()
        assert pair.key == row["filepath"]
        for column in ("emoji_id", "vendor", "group", "split"):
            assert pair.extra[column] == row[column]
        assert "filepath" not in pair.extra and "caption" not in pair.extra
