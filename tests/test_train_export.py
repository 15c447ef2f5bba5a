"""Training and export on a tiny model: PyTorch/ONNX parity, the manifest, determinism,
resuming and reusing stages, checkpoint safety, export errors, and a small end-to-end
search (fixtures in conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.data import load_pairs  # noqa: E402
from mmedge.errors import ExportError, TrainError  # noqa: E402
from mmedge.export.bundle import FP32_MAX_ABS, INT8_MIN_MEAN_COS, export, fingerprint_of  # noqa: E402
from mmedge.runtime.bundle import Bundle, sha256_file, verify_golden  # noqa: E402
from mmedge.runtime.encoders import ImageEncoder, TextEncoder  # noqa: E402
from mmedge.runtime.index import Index, Item  # noqa: E402
from mmedge.runtime.preprocess import preprocess  # noqa: E402
from mmedge.runtime.retriever import Retriever  # noqa: E402
from mmedge.train.config import TrainConfig  # noqa: E402
from mmedge.train.pipeline import load_run, train  # noqa: E402

CHECKPOINTS = ("model.pt", "stage1/image.pt", "stage1/text.pt", "stage1/image.ckpt", "stage1/text.ckpt",
               "stage2/checkpoint.pt")


# ----------------------------------------------------------------------------- helpers


def _weights(run: Path) -> dict[str, Any]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)


def _assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs"
        else:
            diff = (a[name] - b[name]).abs().max().item() if a[name].numel() else 0.0
            assert diff <= atol, f"{name} differs by {diff:.2e}"


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class _Steps:
    """An on_progress callback that records (stage, step, total, metrics)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, dict[str, float]]] = []

    def __call__(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        self.calls.append((stage, step, total, dict(metrics)))

    def stages(self) -> set[str]:
        return {c[0] for c in self.calls}

    def steps(self, stage: str) -> list[int]:
        return sorted({c[1] for c in self.calls if c[0] == stage})


def _test_pairs(synthetic_data: dict[str, Path], n: int = 24):
    return load_pairs(synthetic_data["test"]).pairs[:n]


def _torch_embeddings(run: Path, bundle: Bundle, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """PyTorch image and text embeddings of held-out pairs, fed exactly what the runtime feeds
    its graphs: pixels from ``preprocess`` with the bundle's config, ids/mask from its tokenizer."""
    model, _cfg, _pcfg, _tok = load_run(run)
    pixels = preprocess([p.image for p in pairs], bundle.preprocess)
    ids, mask = TextEncoder(bundle).tokenizer.encode([p.caption for p in pairs])
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(pixels)).numpy()
        txt = model.encode_text(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))).numpy()
    return img, txt, pixels, ids, mask


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ----------------------------------------------------------------------------- parity


def test_fp32_bundle_matches_pytorch_on_held_out_inputs(trained_run, fp32_bundle, synthetic_data):
    run = trained_run.run_dir
    b = Bundle.load(fp32_bundle)
    _model, _cfg, pcfg, _tok = load_run(run)
    assert b.preprocess == pcfg
    pairs = _test_pairs(synthetic_data)
    ref_img, ref_txt, pixels, ids, mask = _torch_embeddings(run, b, pairs)
    img_enc, txt_enc = ImageEncoder(b, threads=1), TextEncoder(b, threads=1)

    got_img = img_enc.encode_pixels(pixels)
    got_txt = txt_enc.encode_ids(ids, mask)
    dim = trained_run.config.pca_dim
    assert got_img.shape == ref_img.shape == (len(pairs), dim)
    assert got_txt.shape == ref_txt.shape == (len(pairs), dim)
    assert np.abs(got_img - ref_img).max() <= 1e-4
    assert np.abs(got_txt - ref_txt).max() <= 1e-4
    # the convenience paths (file names, raw strings) give the same vectors
    assert np.abs(img_enc.encode([p.image for p in pairs]) - ref_img).max() <= 1e-4
    assert np.abs(txt_enc.encode([p.caption for p in pairs]) - ref_txt).max() <= 1e-4
    # outputs are unit vectors
    np.testing.assert_allclose(np.linalg.norm(got_img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_txt, axis=1), 1.0, atol=1e-5)


def test_int8_bundle_keeps_mean_cosine_to_pytorch(trained_run, int8_bundle, synthetic_data):
    b = Bundle.load(int8_bundle)
    assert b.quantization == {"image": "int8-weights", "text": "int8-dynamic"}
    pairs = _test_pairs(synthetic_data, n=48)
    ref_img, ref_txt, pixels, ids, mask = _torch_embeddings(trained_run.run_dir, b, pairs)
    img_cos = _cosines(ref_img, ImageEncoder(b, threads=1).encode_pixels(pixels))
    txt_cos = _cosines(ref_txt, TextEncoder(b, threads=1).encode_ids(ids, mask))
    assert img_cos.mean() >= 0.99, f"image int8 mean cosine {img_cos.mean():.4f}"
    assert txt_cos.mean() >= 0.99, f"text int8 mean cosine {txt_cos.mean():.4f}"


def test_int8_image_graph_holds_int8_weights_and_computes_in_fp32(int8_bundle, fp32_bundle):
    """The int8 image graph: every Conv/Gemm weight is an int8 tensor with one scale per output
    channel (max |w| / 127), rebuilt by Cast * scale; no quantised activations. Oracle: the fp32
    bundle's weights rounded the same way in numpy."""
    import onnx
    from onnx import numpy_helper

    m8 = onnx.load(str(int8_bundle / "image.onnx"))
    m32 = onnx.load(str(fp32_bundle / "image.onnx"))
    ops = {n.op_type for n in m8.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "ConvInteger", "QLinearConv", "DynamicQuantizeLinear"}
    w8 = {t.name: numpy_helper.to_array(t) for t in m8.graph.initializer}
    w32 = {t.name: numpy_helper.to_array(t) for t in m32.graph.initializer}
    weights = [n.input[1] for n in m32.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in w32]
    assert weights and all(name not in w8 for name in weights)
    for name in weights:
        q, scale, w = w8[f"{name}.int8"], w8[f"{name}.scale"], w32[name]
        assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (w.shape[0],) + (1,) * (w.ndim - 1)
        want = np.abs(w).reshape(w.shape[0], -1).max(1) / 127.0
        np.testing.assert_allclose(scale.ravel(), want, rtol=1e-6)
        np.testing.assert_array_equal(q, np.clip(np.rint(w / scale), -127, 127).astype(np.int8))
        assert np.abs(q.astype(np.float32) * scale - w).max() <= scale.max() / 2 + 1e-7
    # much smaller than the fp32 graph (about 4x at real sizes; biases and the graph weigh more here)
    assert (int8_bundle / "image.onnx").stat().st_size < 0.4 * (fp32_bundle / "image.onnx").stat().st_size


# ----------------------------------------------------------------------------- manifest


def test_manifests_record_parity_quantization_dim_fingerprint_and_checksums(trained_run, fp32_bundle, int8_bundle):
    model, cfg, _pcfg, _tok = load_run(trained_run.run_dir)
    m32 = json.loads((fp32_bundle / "manifest.json").read_text())
    m8 = json.loads((int8_bundle / "manifest.json").read_text())

    assert m32["quantization"] == {"image": "fp32", "text": "fp32"}
    assert m8["quantization"] == {"image": "int8-weights", "text": "int8-dynamic"}
    for tower in ("image", "text"):
        p32, p8 = m32["parity"][tower], m8["parity"][tower]
        assert 0 <= p32["max_abs_diff"] <= FP32_MAX_ABS
        assert p32["mean_cosine"] >= 0.9999 and p32["min_cosine"] <= p32["mean_cosine"]
        assert p32["n"] >= 8
        assert p8["mean_cosine"] >= INT8_MIN_MEAN_COS
        assert p8["min_cosine"] <= p8["mean_cosine"] <= 1.0 + 1e-6
        assert 0 <= p8["fp32_max_abs_diff"] <= FP32_MAX_ABS

    assert m32["embedding"]["dim"] == m8["embedding"]["dim"] == cfg.pca_dim == 8
    assert m32["embedding"]["metric"] == "cosine"
    fp = m32["embedding"]["fingerprint"]
    assert fp and fp == m8["embedding"]["fingerprint"] == fingerprint_of(model)
    assert TrainConfig.from_dict(m32["model_config"]) == cfg
    assert m32["text"]["max_length"] == cfg.text.max_length

    for bundle_dir, m in ((fp32_bundle, m32), (int8_bundle, m8)):
        on_disk = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
        assert set(m["files"]) == on_disk - {"manifest.json"}
        assert {"image.onnx", "text.onnx", "tokenizer.json", "golden/golden.json"} <= set(m["files"])
        for rel, digest in m["files"].items():
            assert sha256_file(bundle_dir / rel) == digest, rel
        b = Bundle.load(bundle_dir)
        figs = verify_golden(b)
        assert figs["image_max_abs_diff"] <= figs["tolerance"]
        assert figs["text_max_abs_diff"] <= figs["tolerance"]
    # the int8 graphs really are different files from the fp32 ones
    assert m32["files"]["image.onnx"] != m8["files"]["image.onnx"]
    assert m32["files"]["text.onnx"] != m8["files"]["text.onnx"]


# ----------------------------------------------------------------------------- training behaviour


def test_training_twice_with_the_same_seed_gives_identical_weights(tmp_path, trained_run, synthetic_data,
                                                                   make_tiny_config):
    again = train(synthetic_data["train"], tmp_path / "again", make_tiny_config(), val_data=synthetic_data["val"])
    _assert_same_weights(_weights(trained_run.run_dir), _weights(again.run_dir))
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (trained_run.run_dir / "tokenizer.json").read_bytes()


def test_rerun_of_a_finished_run_trains_nothing_and_keeps_the_weights(tmp_path, trained_run, synthetic_data,
                                                                      make_tiny_config):
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    before = _weights(run)
    stage1_mtimes = {n: (run / n).stat().st_mtime_ns for n in ("stage1/image.pt", "stage1/text.pt")}
    steps = _Steps()
    res = train(synthetic_data["train"], run, make_tiny_config(), val_data=synthetic_data["val"], on_progress=steps)
    assert steps.calls == []  # no optimiser step in any stage
    _assert_same_weights(before, _weights(run))
    assert {n: (run / n).stat().st_mtime_ns for n in stage1_mtimes} == stage1_mtimes
    assert res.metrics["val_t2i_R@10"] == trained_run.metrics["val_t2i_R@10"]


class _Interrupt(Exception):
    pass


def test_interrupted_stage2_resumes_from_its_checkpoint_and_matches_a_straight_run(
        tmp_path, trained_run, synthetic_data, make_tiny_config):
    run = tmp_path / "run"

    def stop_in_second_epoch(stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if stage == "stage2" and step > total // 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(synthetic_data["train"], run, make_tiny_config(epochs=2), val_data=synthetic_data["val"],
              on_progress=stop_in_second_epoch)
    ck = torch.load(run / "stage2" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0
    assert not (run / "model.pt").exists()

    steps = _Steps()
    train(synthetic_data["train"], run, make_tiny_config(epochs=2), val_data=synthetic_data["val"], on_progress=steps)
    assert "stage1-image" not in steps.stages() and "stage1-text" not in steps.stages()
    s2 = steps.steps("stage2")
    total = next(c[2] for c in steps.calls if c[0] == "stage2")
    assert s2 == list(range(total // 2 + 1, total + 1)), "stage 2 did not resume after epoch 1"
    ck = torch.load(run / "stage2" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1
    _assert_same_weights(_weights(trained_run.run_dir), _weights(run), atol=1e-5)


def test_more_stage2_epochs_in_the_same_folder_matches_a_straight_run(tmp_path, trained_run, synthetic_data,
                                                                        make_tiny_config):
    # The stage-2 key covers the whole Stage2Config (epochs included, since the cosine
    # learning-rate schedule depends on the total), so going from 1 to 2 epochs starts
    # stage 2 again from the stage-1 weights instead of continuing the 1-epoch result;
    # stage 1 and the tokenizer are reused.
    run = tmp_path / "run"
    train(synthetic_data["train"], run, make_tiny_config(epochs=1), val_data=synthetic_data["val"])
    ck = torch.load(run / "stage2" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0
    stage1_mtime = (run / "stage1" / "image.pt").stat().st_mtime_ns
    one_epoch = _weights(run)

    steps = _Steps()
    train(synthetic_data["train"], run, make_tiny_config(epochs=2), val_data=synthetic_data["val"], on_progress=steps)
    ck = torch.load(run / "stage2" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1
    assert (run / "stage1" / "image.pt").stat().st_mtime_ns == stage1_mtime
    assert "stage1-image" not in steps.stages()
    assert any(not torch.equal(one_epoch[k], v) for k, v in _weights(run).items())
    _assert_same_weights(_weights(trained_run.run_dir), _weights(run), atol=1e-5)


@pytest.mark.parametrize("change", [{"adversarial": True}, {"lr": 1e-3}], ids=["adversarial", "lr"])
def test_changing_only_stage2_settings_reuses_stage1(tmp_path, trained_run, synthetic_data, make_tiny_config, change):
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    mtimes = {n: (run / n).stat().st_mtime_ns for n in ("stage1/image.pt", "stage1/text.pt", "tokenizer.json")}
    before = _weights(run)
    steps = _Steps()
    res = train(synthetic_data["train"], run, make_tiny_config(**change), val_data=synthetic_data["val"],
                on_progress=steps)
    assert {n: (run / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert steps.stages() == {"stage2"}
    total = steps.calls[0][2]
    assert steps.steps("stage2") == list(range(1, total + 1))  # stage 2 trained from its first step
    assert res.config.stage2.adversarial == change.get("adversarial", False)
    losses = [c[3] for c in steps.calls if c[0] == "stage2"]
    if change.get("adversarial"):
        assert all("adv" in m and np.isfinite(m["adv"]) for m in losses)
    else:
        assert all("adv" not in m for m in losses)
    assert all(np.isfinite(m["loss"]) for m in losses)
    assert any(not torch.equal(before[k], v) for k, v in _weights(run).items())


# ----------------------------------------------------------------------------- checkpoints


def test_every_checkpoint_loads_with_weights_only(trained_run):
    run = trained_run.run_dir
    for rel in CHECKPOINTS:
        ck = torch.load(run / rel, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and ck, rel
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    s2 = torch.load(run / "stage2" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert s2["epoch"] == 1 and {"key", "modules", "opt"} <= set(s2)


@pytest.mark.parametrize("rel", ["stage2/checkpoint.pt", "stage1/image.pt"])
def test_corrupt_training_checkpoint_gives_train_error(tmp_path, trained_run, synthetic_data, make_tiny_config, rel):
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    data = (run / rel).read_bytes()
    (run / rel).write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainError, match=rel.split("/")[-1]):
        train(synthetic_data["train"], run, make_tiny_config(), val_data=synthetic_data["val"])


def test_corrupt_model_weights_give_train_error_on_load_and_export(tmp_path, trained_run):
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    (run / "model.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(TrainError, match="model.pt"):
        load_run(run)
    with pytest.raises(TrainError, match="model.pt"):
        export(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path, trained_run):
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    torch.save({"weights": _weights(run), "evil": _Interrupt()}, run / "model.pt")  # needs unpickling of a class
    with pytest.raises(TrainError, match="model.pt"):
        load_run(run)


# ----------------------------------------------------------------------------- export errors


def test_export_of_a_folder_that_is_not_a_run(tmp_path):
    not_run = tmp_path / "not-a-run"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hello")
    with pytest.raises((TrainError, ExportError), match="config.json"):
        export(not_run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("missing", ["samples.npy", "samples.json", "tokenizer.json"])
def test_export_of_an_incomplete_run_names_the_missing_file(tmp_path, trained_run, missing):
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    (run / missing).unlink()
    with pytest.raises((TrainError, ExportError), match=missing):
        export(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_export_refuses_an_existing_folder_without_overwrite(tmp_path, trained_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    mtime = (out / "keep.txt").stat().st_mtime_ns
    with pytest.raises(ExportError, match="already exists"):
        export(trained_run.run_dir, out, quantize="fp32")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "keep.txt").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folders left


def test_export_rejects_unknown_quantization(tmp_path, trained_run):
    with pytest.raises(ExportError, match="quantize"):
        export(trained_run.run_dir, tmp_path / "b", quantize="int4")
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_text_search_and_hnsw_matches_exact_search(tmp_path, fp32_bundle, synthetic_data):
    b = Bundle.load(fp32_bundle)
    gallery = load_pairs(synthetic_data["train"]).pairs + load_pairs(synthetic_data["test"]).pairs
    items = [Item(key=f"{i}:{p.key}", modality="image", path=str(p.image), caption=p.caption)
             for i, p in enumerate(gallery)]
    with Index.create(tmp_path / "idx", dim=b.dim, fingerprint=b.fingerprint) as idx:
        r = Retriever(b, idx, threads=1)
        assert r.add_images(items) == len(items)
        idx.save()

        queries = [p.caption for p in load_pairs(synthetic_data["test"]).pairs]
        hits = r.search(text=queries[0], k=7)
        assert len(hits) == 7
        scores = [h.score for h in hits]
        assert all(np.isfinite(s) and -1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert all(h.modality == "image" for h in hits)

        # HNSW top-10 against exact top-10 over the same stored vectors
        keys = [it.key for it in items]
        gallery_vecs = idx.vectors(keys)
        q = r.encode_text(queries)
        exact = np.argsort(-(q @ gallery_vecs.T), axis=1, kind="stable")[:, :10]
        approx = idx.search(q, k=10)
        recall = np.mean([len({keys[j] for j in exact[i]} & {h.key for h in approx[i]}) / 10
                          for i in range(len(queries))])
        assert recall >= 0.95, f"HNSW recall@10 {recall:.3f}"
        # the scores HNSW reports are the cosines
        for i in range(3):
            for h in approx[i]:
                assert abs(h.score - float(q[i] @ gallery_vecs[keys.index(h.key)])) <= 1e-4

    # reopened from disk, the index answers the same
    with Index.open(tmp_path / "idx", fingerprint=b.fingerprint, readonly=True) as idx2:
        again = Retriever(b, idx2, threads=1).search(text=queries[0], k=7)
        assert [h.key for h in again] == [h.key for h in hits]
