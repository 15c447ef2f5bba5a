"""Bundle loading and validation, golden vectors, encoders and the Retriever, on a tiny real bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_bundle import DIM, MAX_LENGTH, make_tiny_bundle, ref_image, ref_text, sample_png, tiny_weights

from mmedge.errors import BundleError, SearchIndexError, TextError, UsageError
from mmedge.runtime import Bundle, Hit, ImageEncoder, Index, Item, Retriever, TextEncoder
from mmedge.runtime.bundle import SCHEMA_VERSION, sha256_file, verify_golden, write_manifest
from mmedge.runtime.encoders import available_providers, choose_providers
from mmedge.runtime.preprocess import preprocess
from mmedge.runtime.tokenizer import MAX_BATCH, MAX_TEXT_CHARS


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture()
def bundle_dir(built: Path, tmp_path: Path) -> Path:
    """A private copy that a test may tamper with."""
    return Path(shutil.copytree(built, tmp_path / "bundle"))


def read_manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def write_raw_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- loading


def test_load_ok(built: Path) -> None:
    b = Bundle.load(built)
    assert b.path == built
    assert b.dim == DIM
    assert len(b.fingerprint) == 64
    assert b.metric == "cosine"
    assert b.preprocess.size == (8, 8)
    assert b.image_model_path == built / "image.onnx"
    assert b.text_model_path == built / "text.onnx"
    assert b.tokenizer_path == built / "tokenizer.json"
    assert b.quantization == {"image": "fp32", "text": "fp32"}
    assert b.max_length == MAX_LENGTH and b.pad_id == 0
    assert b.text_inputs == ["input_ids", "attention_mask"]
    assert b.golden_path == built / "golden" / "golden.json"
    files = b.manifest["files"]
    assert "manifest.json" not in files
    assert {"image.onnx", "text.onnx", "tokenizer.json", "golden/golden.json", "golden/0.png"} <= set(files)
    assert all(sha256_file(built / rel) == digest for rel, digest in files.items())


def test_checksum_mismatch_names_file(bundle_dir: Path) -> None:
    p = bundle_dir / "image.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for image\.onnx"):
        Bundle.load(bundle_dir)
    Bundle.load(bundle_dir, verify_checksums=False)  # the check can be skipped


def test_missing_files(bundle_dir: Path) -> None:
    (bundle_dir / "golden" / "1.png").unlink()
    with pytest.raises(BundleError, match=r"golden/1\.png"):
        Bundle.load(bundle_dir)
    (bundle_dir / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json"):
        Bundle.load(bundle_dir, verify_checksums=False)
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.load(bundle_dir / "nope")
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json"):
        Bundle.load(bundle_dir)


def test_manifest_not_json(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").write_text("{ this is not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bundle_dir)
    (bundle_dir / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match="JSON object"):
        Bundle.load(bundle_dir)


def test_unknown_schema_version(bundle_dir: Path) -> None:
    m = read_manifest(bundle_dir)
    m["schema_version"] = 2
    write_raw_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=rf"unknown schema version 2 \(this mmedge reads {SCHEMA_VERSION}\)"):
        Bundle.load(bundle_dir)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("format"), "format"),
        (lambda m: m["embedding"].pop("dim"), "embedding.dim"),
        (lambda m: m["embedding"].update(dim="16"), "embedding.dim"),
        (lambda m: m["text"].pop("tokenizer"), "text.tokenizer"),
        (lambda m: m["image"]["preprocess"].update(resize_filter="magic"), "resize_filter"),
        (lambda m: m["quantization"].update(image="int3"), "quantization.image"),
        (lambda m: m["files"].update({"../evil": "0" * 64}), "relative path"),
        (lambda m: m["files"].pop("text.onnx"), r"no checksum for text\.onnx"),
    ],
)
def test_bad_fields(bundle_dir: Path, mutate, message: str) -> None:
    m = read_manifest(bundle_dir)
    mutate(m)
    write_raw_manifest(bundle_dir, m)
    with pytest.raises(BundleError, match=message):
        Bundle.load(bundle_dir)


def test_write_manifest_fills_checksums(bundle_dir: Path) -> None:
    m = read_manifest(bundle_dir)
    m["files"] = {}
    (bundle_dir / "extra.txt").write_text("hello")
    before = json.dumps(m)
    path = write_manifest(bundle_dir, m)
    assert path == bundle_dir / "manifest.json"
    assert json.dumps(m) == before  # the argument is not modified
    files = read_manifest(bundle_dir)["files"]
    assert files["extra.txt"] == sha256_file(bundle_dir / "extra.txt")
    assert "manifest.json" not in files
    assert not [p for p in bundle_dir.iterdir() if p.name.endswith(".tmp")]
    Bundle.load(bundle_dir)


# --------------------------------------------------------------------------- golden


def test_verify_golden_ok(built: Path) -> None:
    figures = verify_golden(Bundle.load(built))
    assert figures["text_max_abs_diff"] <= figures["tolerance"] == 1e-4
    assert figures["image_max_abs_diff"] <= 1e-4
    assert figures["n_texts"] == 3 and figures["n_images"] == 3
    golden = json.loads((built / "golden" / "golden.json").read_text())
    assert golden["images"] == ["golden/0.png", "golden/1.png", "golden/2.png"]
    assert (built / "golden" / "2.png").read_bytes() == sample_png(2, size=(8, 8), mode="P")  # PNG copied as is
    assert len(golden["pixel_sha256"][0]) == 64


def test_golden_mismatch(bundle_dir: Path) -> None:
    gpath = bundle_dir / "golden" / "golden.json"
    g = json.loads(gpath.read_text())
    g["image_embeddings"][1][3] += 0.01
    gpath.write_text(json.dumps(g))
    write_manifest(bundle_dir, read_manifest(bundle_dir))  # checksums now agree with the tampered file
    b = Bundle.load(bundle_dir)
    with pytest.raises(BundleError, match=r"image embeddings differ by max abs 0\.01"):
        verify_golden(b)


def test_golden_token_mismatch(bundle_dir: Path) -> None:
    gpath = bundle_dir / "golden" / "golden.json"
    g = json.loads(gpath.read_text())
    g["input_ids"][0][1] += 1
    gpath.write_text(json.dumps(g))
    write_manifest(bundle_dir, read_manifest(bundle_dir))
    with pytest.raises(BundleError, match="token ids"):
        verify_golden(Bundle.load(bundle_dir))


def test_corrupt_onnx_is_bundle_error(bundle_dir: Path) -> None:
    (bundle_dir / "image.onnx").write_bytes(b"not a protobuf at all" * 10)
    write_manifest(bundle_dir, read_manifest(bundle_dir))
    b = Bundle.load(bundle_dir)
    with pytest.raises(BundleError, match=r"image\.onnx"):
        ImageEncoder(b, providers="cpu")


# --------------------------------------------------------------------------- encoders


def test_encoders_match_numpy(built: Path) -> None:
    b = Bundle.load(built)
    w = tiny_weights(built)
    images = [sample_png(10 + i, size=(9 + i, 7)) for i in range(5)]
    ienc = ImageEncoder(b, providers="cpu", threads=1)
    emb = ienc.encode(images, batch_size=2)
    assert emb.shape == (5, DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, ref_image(preprocess(images, b.preprocess), w), atol=1e-5)
    assert ienc.encode([]).shape == (0, DIM)
    assert ienc.encode(images[0]).shape == (1, DIM)
    with pytest.raises(UsageError):
        ienc.encode_pixels(np.zeros((1, 3, 4, 4), np.float32))

    texts = ["a red circle", "", "two green squares and a big star on the left", "A RED CIRCLE"]
    tenc = TextEncoder(b, providers="cpu")
    temb = tenc.encode(texts, batch_size=3)
    assert temb.shape == (4, DIM) and temb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(temb, axis=1), 1.0, atol=1e-5)
    ids, mask = tenc.tokenizer.encode(texts)
    np.testing.assert_allclose(temb, ref_text(ids, mask, w), atol=1e-5)
    np.testing.assert_allclose(temb[0], temb[3], atol=1e-6)  # lower-cased by the tokenizer
    assert tenc.encode([]).shape == (0, DIM)
    np.testing.assert_allclose(tenc.encode("a red circle"), temb[:1], atol=1e-6)


def test_tokenizer_contract(built: Path) -> None:
    tok = TextEncoder(Bundle.load(built), providers="cpu").tokenizer
    ids, mask = tok.encode(["", "a red circle"])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist()[0] == [2, 0, 0, 0] and mask.tolist()[0] == [1, 0, 0, 0]  # [CLS] only
    long_ids, long_mask = tok.encode(["red " * 100])
    assert long_ids.shape == (1, MAX_LENGTH) and long_mask.all()
    assert np.array_equal(tok.encode(["a red\x00 circle"])[0], tok.encode(["a red circle"])[0])
    tok.encode(["broken \ud800 surrogate"])
    with pytest.raises(TextError, match=str(MAX_TEXT_CHARS)):
        tok.encode(["x" * (MAX_TEXT_CHARS + 1)])
    with pytest.raises(TextError):
        tok.encode([None])  # type: ignore[list-item]
    with pytest.raises(UsageError, match="MAX_BATCH"):
        tok.encode(["a"] * (MAX_BATCH + 1))
    assert tok.encode([])[0].shape == (0, 0)
    # one text (a query) takes its own path: the same ids and mask as its row in a batch
    texts = ["a red circle", "", "red " * 100, "blue square on the left", "broken \ud800 surrogate"]
    b_ids, b_mask = tok.encode(texts)
    for i, t in enumerate(texts):
        ids, mask = tok.encode(t)
        n = int(b_mask[i].sum())
        assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (1, n)
        assert ids[0].tolist() == b_ids[i, :n].tolist() and mask.all()


def test_choose_providers() -> None:
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(None)[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in available_providers():
        with pytest.raises(UsageError, match="CPUExecutionProvider"):
            choose_providers("cuda")
    with pytest.raises(UsageError):
        choose_providers("NoSuchExecutionProvider")


# --------------------------------------------------------------------------- retriever


def test_retriever_end_to_end(built: Path, tmp_path: Path) -> None:
    b = Bundle.load(built)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    paths = []
    for i in range(40):
        p = img_dir / f"{i:02d}.png"
        p.write_bytes(sample_png(100 + i, size=(8 + i % 5, 8)))
        paths.append(p)
    keys = [f"img{i:02d}" for i in range(40)]

    index = Index.create(tmp_path / "index", dim=b.dim, fingerprint=b.fingerprint)
    r = Retriever(b, index, providers="cpu")
    assert r.add_images(paths, keys=keys) == 40
    assert r.add_texts([Item(key="cap0", modality="text", caption="a red circle")]) == 1
    r.save()
    index.close()

    r2 = Retriever(built, tmp_path / "index", providers="cpu")
    assert len(r2.index) == 41
    queries = ["a red circle", "a blue square", "three green shapes on the right", "a big yellow star"]
    gallery = r2.encode_image(paths)
    qemb = r2.encode_text(queries)
    batched = r2.search(text=queries, k=6)
    assert len(batched) == len(queries)
    for qi, hits in enumerate(batched):
        image_hits = [h.key for h in hits if h.modality == "image"][:5]
        brute = [keys[j] for j in np.argsort(-(gallery @ qemb[qi]), kind="stable")[:5]]
        assert image_hits == brute
        assert all(isinstance(h, Hit) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    single = r2.search(text="a red circle", k=3)
    assert isinstance(single, list) and all(isinstance(h, Hit) for h in single)
    assert single[0].key == "cap0" and single[0].score == pytest.approx(1.0, abs=1e-5)

    img_hits = r2.search(image=paths[7], k=1)  # image -> image through the same path
    assert img_hits[0].key == keys[7]
    assert [hs[0].key for hs in r2.search(image=[paths[3], paths[9].read_bytes()], k=1)] == [keys[3], keys[9]]

    with pytest.raises(UsageError):
        r2.search(k=3)
    with pytest.raises(UsageError):
        r2.search(text="a", image=paths[0])
    with pytest.raises(UsageError):
        r2.search(text="a", k=0)
    assert r2.search(text=[], k=3) == []


def test_retriever_refuses_other_embedding_space(built: Path, tmp_path: Path) -> None:
    other = Index.create(tmp_path / "other", dim=DIM, fingerprint="f" * 64)
    other.close()
    with pytest.raises(SearchIndexError):
        Retriever(built, tmp_path / "other")
    with pytest.raises(UsageError):
        Retriever(built).search(text="a red circle")
