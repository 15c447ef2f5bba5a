"""``mmedge demo``: the whole pipeline on the built-in synthetic dataset.

generate data -> train (stage 1, stage 2) -> export fp32 and int8 -> index the
test images and captions -> sample queries -> evaluate both bundles through the
runtime -> ``OUT/report.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

StepFn = Callable[[str, int, int], None]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_demo(
    out: str | Path,
    seed: int = 0,
    epochs: int | None = None,
    n_train: int = 10000,
    n_val: int = 500,
    n_test: int = 1000,
    on_train: Callable[[str, int, int, dict[str, float]], None] | None = None,
    on_step: StepFn | None = None,
) -> dict[str, Any]:
    from mmedge.data import load_pairs
    from mmedge.data.synthetic import generate
    from mmedge.export.bundle import export
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder
    from mmedge.runtime.evaluate import evaluate
    from mmedge.runtime.index import Index, Item
    from mmedge.runtime.retriever import Retriever
    from mmedge.train.config import synthetic_recipe
    from mmedge.train.pipeline import train

    step = on_step or (lambda *_: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    csvs = generate(out / "data", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                    on_progress=lambda d, n: step("generating data", d, n))
    timings["data_s"] = time.perf_counter() - t

    cfg = synthetic_recipe(seed)
    if epochs is not None:
        cfg.stage2.epochs = epochs
    t = time.perf_counter()
    result = train(csvs["train"], out / "run", cfg, val_data=csvs["val"], on_progress=on_train)
    timings["train_s"] = time.perf_counter() - t

    bundles: dict[str, Path] = {}
    for q in ("fp32", "int8"):
        t = time.perf_counter()
        step(f"export {q}", 0, 1)
        export(out / "run", out / f"bundle-{q}", quantize=q, overwrite=True)
        bundles[q] = out / f"bundle-{q}"
        step(f"export {q}", 1, 1)
        timings[f"export_{q}_s"] = time.perf_counter() - t

    test = load_pairs(csvs["test"]).pairs
    report: dict[str, Any] = {}
    t = time.perf_counter()
    for q, path in bundles.items():
        b = Bundle.load(path)
        step(f"evaluate {q}", 0, 1)
        res = evaluate(ImageEncoder(b), TextEncoder(b), test)
        report[q] = {d: {k: res[d][k] for k in ("R@1", "R@5", "R@10", "median_rank")}
                     for d in ("text_to_image", "image_to_text")}
        report[q]["n_images"], report[q]["n_texts"] = res["n_images"], res["n_texts"]
        step(f"evaluate {q}", 1, 1)
    timings["eval_s"] = time.perf_counter() - t

    # indexes of the test images and captions with the int8 bundle, and a few queries
    t = time.perf_counter()
    b8 = Bundle.load(bundles["int8"])
    r = Retriever(b8)
    img_vecs = r.encode_image([p.image for p in test])
    txt_vecs = r.encode_text([p.caption for p in test])
    indexes = {}
    for modality, vecs in (("image", img_vecs), ("text", txt_vecs)):
        idx = Index.create(out / f"index-{modality}s", dim=b8.dim, fingerprint=b8.fingerprint, overwrite=True)
        idx.add([Item(key=p.key, modality=modality, path=str(p.image), caption=p.caption) for p in test], vecs)
        idx.save()
        indexes[modality] = idx
    timings["index_s"] = time.perf_counter() - t

    samples = []
    text_r = Retriever(b8, indexes["image"])
    for p in test[:3]:
        hits = text_r.search(text=p.caption, k=5)
        samples.append({"query": p.caption, "expected": p.key, "direction": "text_to_image",
                        "hits": [{"key": h.key, "score": h.score, "label": f"{h.key}  ({h.caption})"
                                  + ("  <- the pair" if h.key == p.key else "")} for h in hits]})
    img_r = Retriever(b8, indexes["text"])
    p = test[3]
    hits = img_r.search(image=p.image, k=5)
    samples.append({"query": str(p.image.name), "expected": p.key, "direction": "image_to_text",
                    "hits": [{"key": h.key, "score": h.score, "label": f"{h.caption!r}"
                              + ("  <- the pair" if h.key == p.key else "")} for h in hits]})

    full = {
        **report,
        "samples": samples,
        "dataset": {"kind": "synthetic", "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test},
        "train_metrics": result.metrics,
        "timings_s": timings,
        "bundles": {q: str(pth) for q, pth in bundles.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
    }
    _atomic_json(out / "report.json", full)
    return full
