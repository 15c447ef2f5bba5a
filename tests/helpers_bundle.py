"""Build a real, tiny bundle without torch: two hand-made ONNX graphs, a trained word-level
tokenizer, a manifest and golden vectors. Also numpy re-implementations of both graphs."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from mmedge.runtime.bundle import write_golden, write_manifest
from mmedge.runtime.preprocess import PreprocessConfig

DIM = 16
SIZE = (8, 8)
TEXT_HIDDEN = 8
MAX_LENGTH = 12
EPS = 1e-12
SEED = 1234

CORPUS = [
    "a red circle",
    "a blue square",
    "a green triangle on the left",
    "two red squares",
    "a small blue circle on the right",
    "three green shapes",
    "a big yellow star",
    "the red triangle above the blue circle",
]

PREPROCESS = PreprocessConfig(
    size=SIZE,
    resize_filter="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
)


def make_tokenizer(path: Path) -> int:
    """Train a word-level tokenizer ([PAD]=0, [UNK]=1, [CLS]=2 prepended); returns the vocab size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]"])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    cls_id = tok.token_to_id("[CLS]")
    assert tok.token_to_id("[PAD]") == 0 and cls_id == 2
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", cls_id)])
    tok.save(str(path))
    return int(tok.get_vocab_size())


def weights(vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    h, w = SIZE
    return {
        "w_img": rng.standard_normal((3 * h * w, DIM)).astype(np.float32),
        "emb": rng.standard_normal((vocab_size, TEXT_HIDDEN)).astype(np.float32),
        "w_txt": rng.standard_normal((TEXT_HIDDEN, DIM)).astype(np.float32),
    }


def _normalize_nodes(src: str, out: str, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    nodes = [
        helper.make_node("ReduceL2", [src], [f"{prefix}_norm"], axes=[1], keepdims=1),
        helper.make_node("Max", [f"{prefix}_norm", f"{prefix}_eps"], [f"{prefix}_norm_c"]),
        helper.make_node("Div", [src, f"{prefix}_norm_c"], [out]),
    ]
    inits = [numpy_helper.from_array(np.asarray([EPS], dtype=np.float32), f"{prefix}_eps")]
    return nodes, inits


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mmedge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_image_graph(path: Path, w: dict[str, np.ndarray]) -> None:
    h, wd = SIZE
    nodes = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w_img"], ["proj"]),
    ]
    norm_nodes, norm_inits = _normalize_nodes("proj", "embedding", "img")
    graph = helper.make_graph(
        nodes + norm_nodes,
        "tiny_image",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, h, wd])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", DIM])],
        [numpy_helper.from_array(w["w_img"], "w_img"), *norm_inits],
    )
    _save(graph, path)


def make_text_graph(path: Path, w: dict[str, np.ndarray]) -> None:
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"], axis=0),  # (B,T,H)
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),  # (B,T)
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),  # (B,T,1)
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),  # (B,H)
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),  # (B,1)
        helper.make_node("Max", ["count", "one"], ["count_c"]),
        helper.make_node("Div", ["summed", "count_c"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w_txt"], ["proj"]),
    ]
    norm_nodes, norm_inits = _normalize_nodes("proj", "embedding", "txt")
    graph = helper.make_graph(
        nodes + norm_nodes,
        "tiny_text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", DIM])],
        [
            numpy_helper.from_array(w["emb"], "emb"),
            numpy_helper.from_array(w["w_txt"], "w_txt"),
            numpy_helper.from_array(np.asarray([2], dtype=np.int64), "axis2"),
            numpy_helper.from_array(np.asarray([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.asarray([1.0], dtype=np.float32), "one"),
            *norm_inits,
        ],
    )
    _save(graph, path)


def ref_image(pixels: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """numpy version of the image graph: (B,3,H,W) float32 -> (B,D)."""
    proj = pixels.reshape(len(pixels), -1).astype(np.float64) @ w["w_img"].astype(np.float64)
    return proj / np.maximum(np.linalg.norm(proj, axis=1, keepdims=True), EPS)


def ref_text(ids: np.ndarray, mask: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """numpy version of the text graph: (B,T) ids and mask -> (B,D)."""
    tok = w["emb"].astype(np.float64)[ids]
    m = mask.astype(np.float64)[..., None]
    mean = (tok * m).sum(1) / np.maximum(m.sum(1), 1.0)
    proj = mean @ w["w_txt"].astype(np.float64)
    return proj / np.maximum(np.linalg.norm(proj, axis=1, keepdims=True), EPS)


def sample_png(seed: int, size: tuple[int, int] = (20, 12), mode: str = "RGB") -> bytes:
    """A random PNG of ``size`` (W, H) in ``mode`` (RGB, RGBA or P)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode != "RGBA":
        img = img.convert("RGB")
        if mode == "P":
            img = img.quantize(colors=16)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_bundle(out: Path) -> Path:
    """Write a complete bundle (manifest, graphs, tokenizer, golden) into ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out / "tokenizer.json")
    w = weights(vocab)
    make_image_graph(out / "image.onnx", w)
    make_text_graph(out / "text.onnx", w)
    fingerprint = hashlib.sha256((out / "image.onnx").read_bytes() + (out / "text.onnx").read_bytes()).hexdigest()
    manifest = {
        "format": "mmedge-bundle",
        "schema_version": 1,
        "mmedge_version": "0.1.0",
        "created": "2026-01-01T00:00:00Z",
        "embedding": {"dim": DIM, "metric": "cosine", "fingerprint": fingerprint},
        "image": {
            "model": "image.onnx",
            "input": "pixel_values",
            "output": "embedding",
            "preprocess": PREPROCESS.to_manifest(),
        },
        "text": {
            "model": "text.onnx",
            "inputs": ["input_ids", "attention_mask"],
            "output": "embedding",
            "tokenizer": "tokenizer.json",
            "max_length": MAX_LENGTH,
            "pad_id": 0,
        },
        "quantization": {"image": "fp32", "text": "fp32"},
        "parity": {
            "image": {"max_abs_diff": 0.0, "mean_cosine": 1.0, "min_cosine": 1.0},
            "text": {"max_abs_diff": 0.0, "mean_cosine": 1.0, "min_cosine": 1.0},
        },
        "model_config": {"dim": DIM, "kind": "tiny-test"},
        "golden": "golden/golden.json",
        "files": {},
    }
    write_manifest(out, manifest)
    write_golden(
        out,
        texts=["a red circle", "", "the blue square on the right and a big star"],
        images=[sample_png(0), sample_png(1, mode="RGBA"), sample_png(2, size=(8, 8), mode="P")],
    )
    return out


def tiny_weights(bundle_dir: Path) -> dict[str, np.ndarray]:
    """The weights baked into ``make_tiny_bundle(bundle_dir)``'s graphs."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(Path(bundle_dir) / "tokenizer.json")).get_vocab_size()
    return weights(vocab)
