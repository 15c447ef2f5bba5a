"""Property-based tests (hypothesis): whatever text or bytes come in, mmedge either gives a
well-formed answer or raises its own typed error (never another exception, never a crash),
and never changes a file it was only asked to read.

Examples are derandomised (a fixed seed per test) so that CI runs are reproducible.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_bundle import make_tiny_bundle, sample_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmedge.data import load_pairs
from mmedge.errors import BundleError, DatasetError, ImageError, SearchIndexError, TextError, UsageError
from mmedge.runtime import Bundle, Index, IndexParams, Item, Retriever
from mmedge.runtime.preprocess import load_image, preprocess
from mmedge.runtime.tokenizer import MAX_TEXT_CHARS, clean_text

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

TRICKY = ["\x00", "\ud800", "\udfff", "\u202e", "\u200f", "\u0301", "\ufeff", "\u2028", "😀", "👩‍👩‍👧", "中", "ع",
          "\x1b", "\x7f", "\r", "\t", " ", "é"]
texts = st.lists(st.one_of(st.characters(), st.sampled_from(TRICKY)), max_size=200).map("".join)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("props")
    bundle = Bundle.load(make_tiny_bundle(root / "bundle"))
    rng = np.random.default_rng(0)
    index = Index.create(root / "index", bundle.dim, bundle.fingerprint)
    index.add([Item(key=f"k{i}") for i in range(30)], rng.standard_normal((30, bundle.dim)).astype(np.float32))
    index.save()
    r = Retriever(bundle, index, providers="cpu", threads=1)
    yield {"root": root, "bundle": bundle, "retriever": r}
    index.close()


# ----------------------------------------------------------------------------- text


@settings(max_examples=150, **SETTINGS)
@given(text=texts)
def test_any_text_is_embedded_or_refused_as_blank(tiny, text):
    r: Retriever = tiny["retriever"]
    ids, mask = r.text_encoder.tokenizer.encode([text])
    assert ids.shape == mask.shape and ids.shape[0] == 1 and 1 <= ids.shape[1] <= r.bundle.max_length
    assert ((ids >= 0) & (ids < r.text_encoder.tokenizer.vocab_size)).all()
    assert mask[0, 0] == 1 and (np.diff(mask[0]) <= 0).all()  # ones, then padding
    v = r.encode_text(text)
    assert v.shape == (1, r.bundle.dim) and np.isfinite(v).all()
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    if not clean_text(text).strip():
        with pytest.raises(TextError, match="empty or only whitespace"):
            r.search(text=text, k=3)
    else:
        hits = r.search(text=text, k=3)
        assert len(hits) == 3 and all(np.isfinite(h.score) for h in hits)


@settings(max_examples=20, **SETTINGS)
@given(extra=st.integers(-2, 2), fill=st.sampled_from(["a", "é", "😀", "\ud800", " "]))
def test_text_length_limit_is_exact(tiny, extra, fill):
    text = "a" + fill * (MAX_TEXT_CHARS - 1 + extra)
    tok = tiny["retriever"].text_encoder.tokenizer
    if len(text) > MAX_TEXT_CHARS:
        with pytest.raises(TextError, match="MAX_TEXT_CHARS"):
            tok.encode([text])
    else:
        ids, _mask = tok.encode([text])
        assert ids.shape[1] <= tok.max_length


@settings(max_examples=50, **SETTINGS)
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=10), st.lists(st.integers(), max_size=3)))
def test_non_text_is_a_text_error(tiny, value):
    with pytest.raises(TextError):
        tiny["retriever"].text_encoder.tokenizer.encode([value])


# ----------------------------------------------------------------------------- image bytes


def _valid_images() -> list[bytes]:
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    out = []
    for fmt, img, kw in [
        ("PNG", rgb, {}), ("JPEG", rgb, {"quality": 80}), ("GIF", rgb.convert("P"), {}), ("BMP", rgb, {}),
        ("WEBP", rgb, {"quality": 80}), ("TIFF", rgb, {}), ("PNG", rgb.convert("LA"), {}),
        ("PNG", rgb.convert("I;16"), {}), ("JPEG", rgb.convert("CMYK"), {}),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    for fmt in ("GIF", "PNG"):  # animated GIF, APNG
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50)
        out.append(buf.getvalue())
    return out


VALID_IMAGES = _valid_images()
mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=40))),
    st.tuples(st.just("header"), st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6)),
)


def mutate(data: bytes, op: tuple[str, Any]) -> bytes:
    b = bytearray(data)
    kind, arg = op
    if kind == "truncate":
        return bytes(b[: int(arg * len(b))])
    if kind == "flip":
        for where, x in arg:
            b[min(int(where * len(b)), len(b) - 1)] ^= x
    elif kind == "insert":
        where, extra = arg
        b[int(where * len(b)):int(where * len(b))] = extra
    else:
        for pos, value in arg:
            b[min(pos, len(b) - 1)] = value
    return bytes(b)


def assert_loads_or_image_error(tiny: dict[str, Any], source: Any) -> None:
    cfg = tiny["bundle"].preprocess
    try:
        img = load_image(source, cfg)
    except ImageError:
        return
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1
    x = preprocess([img], cfg)
    assert x.shape == (1, 3, *cfg.size) and np.isfinite(x).all()


@settings(max_examples=200, **SETTINGS)
@given(data=st.binary(max_size=3000))
def test_any_bytes_are_an_image_or_an_image_error(tiny, data):
    assert_loads_or_image_error(tiny, data)


@settings(max_examples=300, **SETTINGS)
@given(which=st.integers(0, len(VALID_IMAGES) - 1), op=mutation, as_file=st.booleans())
def test_damaged_image_files_are_read_or_refused(tiny, tmp_path_factory, which, op, as_file):
    data = mutate(VALID_IMAGES[which], op)
    if as_file:
        path = tmp_path_factory.mktemp("img") / "photo.jpg"
        path.write_bytes(data)
        assert_loads_or_image_error(tiny, path)
        assert path.read_bytes() == data  # read only
    else:
        assert_loads_or_image_error(tiny, data)


# ----------------------------------------------------------------------------- dataset files


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pairs")
    for i in range(3):
        (d / f"{i}.png").write_bytes(sample_png(i))
    return d


csv_cell = st.one_of(st.sampled_from(["0.png", "1.png", "2.png", "missing.png", "", " ", "a,b", '"q"', "x\ny"]),
                     st.text(max_size=12))
csv_text = st.builds(
    lambda header, rows: "\n".join([header] + [",".join(r) for r in rows]),
    st.sampled_from(["filepath,caption", "caption,filepath", "filepath", "file,caption", "filepath,caption,group", ""]),
    st.lists(st.lists(csv_cell, min_size=0, max_size=4), max_size=6),
)


def assert_loads_or_dataset_error(path: Path) -> None:
    before = path.read_bytes()
    for skip_bad in (False, True):
        try:
            res = load_pairs(path, skip_bad=skip_bad)
        except DatasetError:
            continue
        keys = [p.key for p in res.pairs]
        assert len(set(keys)) == len(keys)
        assert all(p.image.is_file() and p.caption.strip() == p.caption and p.caption for p in res.pairs)
    assert path.read_bytes() == before


@settings(max_examples=100, **SETTINGS)
@given(content=st.one_of(csv_text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300)))
def test_any_csv_loads_or_is_a_dataset_error(data_dir, content):
    path = data_dir / "pairs.csv"
    path.write_bytes(content)
    assert_loads_or_dataset_error(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
              st.sampled_from(["0.png", "1.png", "missing.png"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["filepath", "caption", "images", "annotations", "id",
                                                             "image_id", "file_name", "x"]), inner, max_size=5)),
    max_leaves=20,
)


@settings(max_examples=150, **SETTINGS)
@given(doc=json_values, lines=st.lists(json_values, max_size=5))
def test_any_json_loads_or_is_a_dataset_error(data_dir, doc, lines):
    coco = data_dir / "coco.json"
    coco.write_text(json.dumps(doc))
    assert_loads_or_dataset_error(coco)
    jsonl = data_dir / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines))
    assert_loads_or_dataset_error(jsonl)


# ----------------------------------------------------------------------------- index files


@pytest.fixture(scope="module")
def base_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 items, M=4 (so many upper-level links), dim 8, some removed."""
    folder = tmp_path_factory.mktemp("base") / "index"
    rng = np.random.default_rng(4)
    with Index.create(folder, 8, "fp", IndexParams(M=4, ef_construction=20, ef=10)) as idx:
        idx.add([Item(key=f"k{i}", caption="c" * (i % 40), metadata={"i": i}) for i in range(300)],
                rng.standard_normal((300, 8)).astype(np.float32))
        idx.remove([f"k{i}" for i in range(0, 300, 7)])
        idx.save()
    return folder


def exercise(folder: Path, readonly: bool) -> None:
    """Open, search, read and (writable) change and save: SearchIndexError or a sane answer."""
    q = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    try:
        with Index.open(folder, readonly=readonly) as idx:
            n = len(idx)
            for row in idx.search(q, k=10):
                assert len(row) <= min(10, n) and all(np.isfinite(h.score) for h in row)
            idx.check()
            for key in idx.keys()[:20]:
                idx.get(key)
            if not readonly:
                idx.add([Item(key="new")], q[:1])
                idx.remove([idx.keys()[0]])
                idx.save()
    except SearchIndexError:
        pass


@settings(max_examples=300, **SETTINGS)
@given(flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)), region=st.sampled_from(["any", "upper"]), readonly=st.booleans())
def test_damaged_hnsw_file_is_refused_or_consistent(base_index, flips, cut, region, readonly):
    """The same game as hnswlib's own corruption tests, through mmedge: byte flips and cuts in
    the graph file, half of them in the upper-level link lists. A longer run of this kind
    (3,000 files) once found files that crashed hnswlib through mmedge; the deterministic
    reproduction is test_bad_input.py::test_index_graph_link_that_would_crash_hnswlib."""
    from mmedge.runtime.index import _HEADER

    work = Path(tempfile.mkdtemp())
    try:
        folder = Path(shutil.copytree(base_index, work / "index"))
        (f,) = folder.glob("hnsw.*.bin")
        b = bytearray(f.read_bytes())
        head = _HEADER.unpack_from(b)
        lo = _HEADER.size + head[2] * head[3] if region == "upper" else 0  # after level 0
        for where, x in flips:
            b[lo + min(int(where * (len(b) - lo)), len(b) - lo - 1)] ^= x
        if cut is not None:
            b = b[: int(cut * len(b))]
        f.write_bytes(bytes(b))
        exercise(folder, readonly)
    finally:
        shutil.rmtree(work)


@settings(max_examples=100, **SETTINGS)
@given(flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)), readonly=st.booleans())
def test_damaged_item_store_is_refused_or_consistent(base_index, flips, cut, readonly):
    work = Path(tempfile.mkdtemp())
    try:
        folder = Path(shutil.copytree(base_index, work / "index"))
        db = folder / "items.sqlite"
        b = bytearray(db.read_bytes())
        for where, x in flips:
            b[min(int(where * len(b)), len(b) - 1)] ^= x
        if cut is not None:
            b = b[: int(cut * len(b))]
        db.write_bytes(bytes(b))
        exercise(folder, readonly)
    finally:
        shutil.rmtree(work)


@settings(max_examples=100, **SETTINGS)
@given(doc=json_values, readonly=st.booleans())
def test_any_index_json_is_refused_or_ignored(base_index, doc, readonly):
    work = Path(tempfile.mkdtemp())
    try:
        folder = Path(shutil.copytree(base_index, work / "index"))
        good = json.loads((folder / "index.json").read_text())
        if isinstance(doc, dict):  # also: a few fields replaced in the real description
            doc = {**good, **{k: v for k, v in doc.items() if k in ("x", "id")}, **(
                {"dim": doc.get("id")} if "id" in doc else {})}
        (folder / "index.json").write_text(json.dumps(doc))
        exercise(folder, readonly)
    finally:
        shutil.rmtree(work)


# ----------------------------------------------------------------------------- bundle manifest


@settings(max_examples=100, **SETTINGS, )
@given(path=st.sampled_from(["format", "schema_version", "embedding", "embedding.dim", "embedding.fingerprint",
                             "image.preprocess", "image.preprocess.size", "image.preprocess.mean", "text.max_length",
                             "text.inputs", "quantization", "files", "golden", "image.model"]),
       value=json_values)
def test_any_manifest_field_value_loads_or_is_a_bundle_error(tiny, path, value):
    work = Path(tempfile.mkdtemp())
    try:
        b = Path(shutil.copytree(tiny["bundle"].path, work / "bundle"))
        m = json.loads((b / "manifest.json").read_text())
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        node[last] = value
        (b / "manifest.json").write_text(json.dumps(m))
        try:
            loaded = Bundle.load(b)
        except BundleError:
            return
        assert loaded.dim >= 1 and loaded.fingerprint
    finally:
        shutil.rmtree(work)


def test_usage_errors_are_not_swallowed(tiny):
    """The typed errors above are the only ones: a wrong call is still a UsageError."""
    with pytest.raises(UsageError):
        tiny["retriever"].search(text="a", image=b"x")
