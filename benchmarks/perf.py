#!/usr/bin/env python
"""mmedge performance benchmark: latency, start-up, memory and size against what a user would
otherwise run, measured in one run on one machine.

    python benchmarks/perf.py --out benchmarks/results            # the full run (~20 min on 2 cores)
    python benchmarks/perf.py --out /tmp/perf-quick --quick       # a few minutes: small sizes

Writes ``perf.json`` (every figure), ``perf.md`` (summary with the targets) and
``perf_recall_qps.png`` (recall@10 against queries per second, one line per library) into
``--out``. Needs the ``train`` extra (the PyTorch baseline) and the ``bench`` extra (faiss-cpu,
usearch, matplotlib, psutil). Data: the output of ``mmedge demo`` (made in ``--work`` if
``--demo`` is not given); see ``perf_data.py`` for how corpora beyond its 11,500 images are
made. The machine is shared, so every section records the load averages, and comparisons are
measured interleaved or back to back in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# torch and faiss both use OpenMP in this one process; idle OpenMP workers that spin (the default)
# took whole cores from the other libraries measured after them on this 2-core machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import perf_data as D  # noqa: E402
import perf_index as P  # noqa: E402
from mmedge.runtime import benchmark as B  # noqa: E402

K = 10
RECALL_TARGET = 0.98
KNOBS = [10, 12, 14, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256]
QUERY_TEXT = "a large red circle at the top left"

# What was tried for each target and what is left, shown in perf.md for the targets this run missed.
NOTES: dict[str, tuple[str, str]] = {
    "text_p50": (
        "one ONNX Runtime thread for the text tower (faster at batch 1 than two), HNSW defaults picked from the "
        "recall/latency curve (M=16, ef_construction=100, ef=64), the index opened read-only, one tokenizers "
        "encode call for a single text (not encode_batch), query vectors checked and normalised in one pass; "
        "ONNX Runtime session options (no memory pattern, no arena, extended instead of all optimisations) "
        "changed nothing measurable",
        "measured in-process on this machine (thread CPU time, 1,000 demo captions of 19 tokens on average): "
        "the int8 text encoder about 0.44 ms (ONNX Runtime's run 0.25-0.35 ms, the rest tokenisation and "
        "checks), Index.search about 0.44 ms (hnswlib 0.14-0.20 ms, the SQLite row fetch about 0.11 ms, "
        "Python for the hits and checks about 0.1 ms). The encoder's run grows with the tokens: shorter "
        "queries than these captions (most typed queries) are well under 1 ms. Next: fewer FLOPs per token in "
        "the text tower (quality first), and the SQLite fetch for the hits of a query"),
    "speedup": (
        "the baseline is given its best setting (one torch thread; numpy exact search); mmedge's side is the "
        "text->image p50 (int8 text tower on one ONNX Runtime thread, HNSW at the defaults)",
        "on a quiet machine the ratio is bounded by the text encoder, which both sides run: the baseline at "
        "100,000 items is about 1.8 ms of PyTorch-eager encoding plus about 3.5 ms of exact search, mmedge about "
        "0.6-0.7 ms of ONNX Runtime encoding plus about 0.05 ms of HNSW search and the metadata (see Encoders and "
        "Index libraries); 20x would need mmedge under 0.3 ms, below its encoder alone (runs on a loaded machine "
        "showed 16x because load hurt the baseline more; at 1,000,000 items, where exact search dominates, the "
        "ratio is in the table above). The encoder's time is arithmetic, not graph overhead: it grows with the "
        "tokens (about 140 us at 8 tokens, 250 us at 20, one thread), and a hand-written graph of the same "
        "tower with a quarter fewer nodes after optimisation (constant reshapes, no shape arithmetic) was no "
        "faster. Next: fewer FLOPs per token (a narrower or shallower text tower, or one distilled from the "
        "current), which the quality benchmark has to accept first"),
    "peers": (
        "each peer at mmedge's M and ef_construction and at its own defaults, measured interleaved knob by knob",
        "faiss's HNSW with the same M and ef_construction answers 3-5 us sooner per query at equal recall "
        "(1.04-1.10x; under 1 % of an end-to-end query) - the per-call overhead of the Python binding and its "
        "distance kernels, not the graph; usearch is slower here. Proposal: keep hnswlib, whose file format is "
        "the documented, language-neutral index format of mmedge, and reconsider only if search, not encoding, "
        "becomes the larger part of a query"),
    "cold": (
        "a typer-free console entry for plain queries (no typer, click or pydantic at start-up), the HNSW file "
        "check vectorised and read in 4 MiB blocks, np.unique (which imports numpy.ma) replaced, Pillow imported "
        "only for image queries, one OpenBLAS thread on the plain query path (numpy's import then starts no "
        "thread pool), mmedge's bytecode compiled as an installed package has it; that brought N<=10,000 under "
        "0.5 s",
        "what grows with N is opening the index: at 100,000 items about 0.21 s (hnswlib.load_index 0.155 s, "
        "mmedge's structural check of the graph file 0.035 s, SQLite 0.02 s) on top of about 0.39 s of "
        "interpreter, numpy (0.1 s), onnxruntime and tokenizers start-up and the encoder session; hnswlib always "
        "reads and allocates the whole graph, holding the GIL (so it cannot overlap start-up in a thread). Next: "
        "for large indexes a memory-mapped graph (usearch serves one from disk with Index.restore(view=True)), "
        "or a long-lived query process (the Python API) where start-up matters"),
    "size": (
        "the token-embedding table of the text tower is int8 too; golden data written compactly (JSON without "
        "whitespace, float32-shortest values, half-size sample images: 67.5 KB -> 27.5 KB in each bundle)",
        "ship the golden files beside the bundle rather than in it"),
    "size_models": ("int8 token-embedding table", "4-bit weights for the image tower's fully connected layer"),
    "int8_speed": (
        "per-tower choice by measurement (see the encoders table): the text tower dynamic int8; the image tower "
        "int8 weights computed in fp32 (Cast * scale, folded when the session is created), because static QDQ "
        "int8 ran at about 60 % of fp32's throughput with 2 threads on this CPU (no VNNI)",
        "after folding, the int8-weight graph runs the same fp32 kernels as the fp32 graph on weights rounded "
        "to 8 bits, so a gap of a few per cent either way is the machine's noise (this run: slower at 2 threads, "
        "faster at 1); figures of one graph swing 15-50 % between runs here"),
    "build": (
        "normalise once per batch (and 9x faster, bit-identical), decode in the main thread while the previous "
        "batch is encoded and inserted in a worker thread, one non-spinning ONNX Runtime pool, cheaper HNSW "
        "insertion (ef_construction=100, M=16), decoding without intermediate copies for plain RGB/RGBA files at "
        "the model's size (0.337 -> 0.287 ms per image), the dataset loaded with one Path per row (0.45 -> 0.25 s "
        "per 10,000 rows); tried and dropped: a 2-process decoding pool and 2 decoding threads (slower on 2 cores: "
        "Pillow's per-file work holds the GIL, and workers compete with the encoder and HNSW insertion), one "
        "ONNX Runtime thread for the encoder during builds (no difference beyond noise)",
        "per image the CPU cost is about 0.25-0.3 ms of Pillow decoding (mostly Python-level per-file overhead), "
        "0.15-0.3 ms of encoding and 0.2 ms of HNSW insertion (see the index table's build times), so 2,000/s "
        "needs nearly perfect use of both cores. The same command rerun by hand between benchmark runs took "
        "4.3-7.2 s for the 10,000 images (about 1,400-2,300 images/s), so the figure sits at the target and moves "
        "with the machine's state; about 0.5 s of it is the CLI's start-up (typer and rich). Left: a C-level "
        "PNG decoder, a lighter start-up for `index build`"),
    "rss": (
        "the graph check reads 4 MiB blocks instead of mapping the file, M=16 instead of 32 (660 instead of 788 "
        "bytes per item)",
        "float16 vectors in the graph (usearch's f16 halves the vector bytes, see the index table)"),
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [load {' '.join(f'{v:.1f}' for v in B.load_average())}] {msg}", flush=True)


def mmedge_exe() -> list[str]:
    exe = Path(sys.executable).parent / "mmedge"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mmedge.cli.entry"]


# ------------------------------------------------------------------------------------ encoders


def bench_encoders(ctx: dict[str, Any], res: dict[str, Any]) -> None:
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder
    from mmedge.runtime.preprocess import preprocess
    from perf_baseline import TorchEager

    log("encoders")
    out: dict[str, Any] = {"load_average_start": B.load_average()}
    texts = ctx["query_texts"][: ctx["args"].queries]
    img_paths = [p for p, s in zip(ctx["corpus"].paths, ctx["corpus"].split) if s == "train"][: ctx["args"].images]
    bundles = {q: Bundle.load(ctx["demo"] / f"bundle-{q}") for q in ("fp32", "int8")}
    torch_model = TorchEager(ctx["demo"] / "run")
    clock = time.perf_counter_ns

    # Every variant is measured on the same input before the next input (interleaved), so that
    # the other jobs on the machine weigh on all of them alike. Torch threads are global, so the
    # torch variants switch them per call (a few microseconds).
    def variants(make_onnx: Any, torch_fn: Any) -> dict[str, Any]:
        v: dict[str, Any] = {}
        for q, b in bundles.items():
            for th in (1, 2):
                v[f"onnx-{q}-{th}t"] = make_onnx(b, th)
        for th in (1, 2):
            v[f"torch-eager-{th}t"] = (lambda th_: (lambda x: (torch_model.set_threads(th_), torch_fn(x))[1]))(th)
        return v

    # text, batch 1: tokenise + encode
    text_fns = variants(lambda b, th: TextEncoder(b, threads=th).encode, torch_model.encode_text)
    samples: dict[str, list[float]] = {k: [] for k in text_fns}
    for t in texts[:30]:
        for fn in text_fns.values():
            fn(t)
    for t in texts:
        for name, fn in text_fns.items():
            t0 = clock()
            fn(t)
            samples[name].append((clock() - t0) / 1e9)
    out["text_batch1"] = {k: B.summarize(v) for k, v in samples.items()}
    log("  text: " + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in out["text_batch1"].items()))

    # images: decode + preprocess + encode of 64 files per call, from the 64x64 PNG files
    batch = 64
    chunks = [img_paths[i:i + batch] for i in range(0, len(img_paths), batch)]

    def onnx_images(b: Any, th: int) -> Any:
        enc = ImageEncoder(b, threads=th)
        return lambda paths: enc.encode_pixels(preprocess(paths, b.preprocess))

    img_fns = variants(onnx_images, torch_model.encode_images)
    per_call: dict[str, list[float]] = {k: [] for k in img_fns}
    for fn in img_fns.values():
        fn(chunks[0])
    for rnd in range(2):
        for ch in chunks:
            for name, fn in img_fns.items():
                t0 = clock()
                fn(ch)
                per_call[name].append((clock() - t0) / 1e9 / len(ch))
    # model only: the same preprocessed batch
    pix = preprocess(chunks[0], bundles["fp32"].preprocess)
    model_fns = variants(lambda b, th: ImageEncoder(b, threads=th).encode_pixels, torch_model.encode_pixels)
    model_only: dict[str, list[float]] = {k: [] for k in model_fns}
    for rnd in range(20):
        for name, fn in model_fns.items():
            t0 = clock()
            fn(pix)
            model_only[name].append((clock() - t0) / 1e9 / len(pix))
    out["image_throughput"] = {k: {"images_per_s": 1.0 / float(np.median(per_call[k])),
                                   "model_only_images_per_s": 1.0 / float(np.median(model_only[k])),
                                   "images": len(img_paths), "batch": batch} for k in img_fns}
    log("  images/s: " + ", ".join(f"{k} {v['images_per_s']:.0f}" for k, v in out["image_throughput"].items()))
    torch_model.set_threads(os.cpu_count() or 1)

    sizes = {q: B.file_sizes(ctx["demo"] / f"bundle-{q}") for q in ("fp32", "int8")}
    models = {q: sizes[q]["image.onnx"] + sizes[q]["text.onnx"] for q in sizes}
    out["sizes"] = {
        "fp32": sizes["fp32"], "int8": sizes["int8"],
        "models_bytes": models,
        "ratio_models": models["int8"] / models["fp32"],
        "ratio_bundle": sizes["int8"]["total"] / sizes["fp32"]["total"],
        "ratio_per_tower": {t: sizes["int8"][f"{t}.onnx"] / sizes["fp32"][f"{t}.onnx"] for t in ("image", "text")},
        "quantization": {q: dict(bundles[q].quantization) for q in bundles},
    }
    # per-tower choice: int8 where it is no slower than fp32 at the thread count mmedge uses by
    # default (text: 1, image: ONNX Runtime's default, one per core), same run, interleaved
    choice = {}
    # (the image tower by its model-only throughput: decoding is the same work for both)
    for tower, key, th, better in (("text", "text_batch1", 1, "lower"), ("image", "image_throughput", 2, "higher")):
        f, i = out[key][f"onnx-fp32-{th}t"], out[key][f"onnx-int8-{th}t"]
        ok = ((i["p50_ms"] <= f["p50_ms"] * 1.02) if better == "lower"
              else (i["model_only_images_per_s"] >= f["model_only_images_per_s"] * 0.98))
        choice[tower] = "int8" if ok else "fp32"
    out["per_tower_choice"] = choice
    out["default_threads"] = {"text": 1, "image": 2}
    out["load_average_end"] = B.load_average()
    res["encoders"] = out


# ------------------------------------------------------------------------------------ index


def bench_index(ctx: dict[str, Any], res: dict[str, Any]) -> None:
    from mmedge.runtime.index import IndexParams

    args = ctx["args"]
    n = args.peer_size
    log(f"index libraries at N={n}")
    x, _ = D.expand(ctx["img"], n, ctx["scale"])
    queries = ctx["q_int8"][: args.queries]
    truth = D.exact_topk(x, queries, K)
    d = IndexParams()
    m, efc = d.M, d.ef_construction
    # each peer at mmedge's M / ef_construction (same graph budget) and at its own defaults
    # (what a user gets without tuning); hnswlib also at mmedge's previous defaults (32, 200)
    configs: list[P.Adapter] = [P.Hnswlib(M=m, ef_construction=efc)]
    if (m, efc) != (32, 200):
        configs.append(P.Hnswlib(M=32, ef_construction=200))
    if P.available("faiss"):
        configs += [P.FaissHNSW(M=m, ef_construction=efc), P.FaissHNSW(M=32), P.FaissFlat()]
    if P.available("usearch"):
        configs += [P.Usearch(M=m, ef_construction=efc), P.Usearch(), P.Usearch(M=m, ef_construction=efc, dtype="f16")]
    configs.append(P.NumpyExact())
    built = []
    for a in configs:
        gc.collect()
        a.build(x, threads=os.cpu_count() or 2)
        built.append(a)
        log(f"  built {a.label()} in {a.build_s:.1f} s, {a.bytes() / n:.0f} B/item")
    # interleaved rounds: each knob value is measured for every library before the next,
    # so that load changes on the shared machine hit all libraries alike
    per: dict[str, dict[int, list[dict[str, Any]]]] = {a.label(): {} for a in built}
    for rnd in range(args.rounds):
        for knob in KNOBS:
            for a in built:
                if not a.knob and knob != KNOBS[0]:
                    continue
                row = P.measure(a, queries, truth, [knob] if a.knob else [], k=K, warmup=20)[0]
                per[a.label()].setdefault(knob, []).append(row)
        log(f"  round {rnd + 1}/{args.rounds} done")
    out_cfgs = []
    for a in built:
        curve = []
        for knob, rows in sorted(per[a.label()].items()):
            curve.append({"knob": knob if a.knob else None, "recall_at_10": rows[0]["recall_at_10"],
                          **{f: float(np.median([r[f] for r in rows])) for f in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")}})
            curve[-1]["qps"] = 1e3 / curve[-1]["mean_ms"]
        out_cfgs.append({"library": a.library, "name": a.name, "label": a.label(), "params": a.params,
                         "knob": a.knob, "build_s": a.build_s, "build_items_per_s": n / a.build_s,
                         "bytes_per_item": a.bytes() / n, "build_rss_bytes_per_item": a.build_rss_bytes / n,
                         "curve": curve})
    at = {}
    for r in (RECALL_TARGET, 0.99, 0.995, 0.999):
        at[str(r)] = {}
        for c in out_cfgs:
            best = P.latency_at_recall(c["curve"], r)
            at[str(r)][c["label"]] = None if best is None else {"knob": best["knob"], "p50_ms": best["p50_ms"],
                                                               "qps": best["qps"], "recall_at_10": best["recall_at_10"]}
    res["index"] = {"n": n, "queries": len(queries), "k": K, "rounds": args.rounds, "knobs": KNOBS,
                    "defaults": d.to_dict(), "configs": out_cfgs, "at_recall": at,
                    "load_average_end": B.load_average(),
                    "note": "one query at a time on one thread (Python call included for every library); "
                            "builds on all cores; recall against exact search over the same vectors"}
    del built, configs
    gc.collect()


# ------------------------------------------------------------------------------------ e2e


def build_mmedge_index(folder: Path, x: np.ndarray, src: np.ndarray, corpus: D.Corpus, modality: str,
                       fingerprint: str, dim: int) -> float:
    from mmedge.runtime.index import Index, Item

    if folder.exists():
        shutil.rmtree(folder)
    t = time.perf_counter()
    idx = Index.create(folder, dim=dim, fingerprint=fingerprint)
    step = 50_000
    for s in range(0, len(x), step):
        items = []
        for i in range(s, min(len(x), s + step)):
            j = int(src[i])
            key = corpus.keys[j] if i == j else f"{corpus.keys[j]}~{i}"
            items.append(Item(key=key, modality=modality, path=str(corpus.paths[j]), caption=corpus.captions[j]))
        idx.add(items, x[s:s + step])
    idx.save()
    idx.close()
    return time.perf_counter() - t


def key_to_row(key: str, corpus_index: dict[str, int]) -> int:
    if "~" in key:
        return int(key.rsplit("~", 1)[1])
    return corpus_index[key]


def bench_e2e(ctx: dict[str, Any], res: dict[str, Any]) -> None:
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.retriever import Retriever
    from perf_baseline import ExactSearch, TorchEager

    args = ctx["args"]
    corpus: D.Corpus = ctx["corpus"]
    kidx = {k: i for i, k in enumerate(corpus.keys)}
    texts = ctx["query_texts"][: args.queries]
    q_imgs = [p for p, s in zip(corpus.paths, corpus.split) if s == "test"][: args.image_queries]
    b8 = Bundle.load(ctx["demo"] / "bundle-int8")
    bf = Bundle.load(ctx["demo"] / "bundle-fp32")
    # one torch thread: faster than two for one query at a time (see the encoders section)
    torch_model = TorchEager(ctx["demo"] / "run", threads=1)
    out: dict[str, Any] = {"load_average_start": B.load_average(), "sizes": {}, "baseline_torch_threads": 1}
    # single-query embeddings (what the retriever computes per query) for the exact truth
    q_text = {"int8": ctx["q_int8"][: len(texts)], "fp32": ctx["q_fp32"][: len(texts)]}
    q_img = Retriever(b8).encode_image(q_imgs)
    for n in ctx["sizes"]:
        log(f"e2e N={n}")
        row: dict[str, Any] = {"load_average_start": B.load_average()}
        x, src = D.expand(ctx["img"], n, ctx["scale"])
        folder = ctx["work"] / f"index-images-{n}"
        row["build_s"] = build_mmedge_index(folder, x, src, corpus, "image", b8.fingerprint, b8.dim)
        row["build_items_per_s"] = n / row["build_s"]
        row["index_params"] = json.loads((folder / "index.json").read_text())
        row["synthetic_items"] = max(0, n - len(ctx["img"]))
        log(f"  built mmedge index in {row['build_s']:.1f} s")
        files = B.file_sizes(folder)
        row["index_files"] = files
        row["index_bytes_per_item"] = files["total"] / n
        ctx.setdefault("indexes", {})[n] = folder

        for q, bundle in (("int8", b8), ("fp32", bf)):
            truth = D.exact_topk(x, q_text[q], K)
            r = Retriever(bundle, folder, readonly=True)
            for t in texts[:50]:
                r.search(text=t, k=K)
            found, times, cpu = [], [], []
            clock, tclock = time.perf_counter_ns, time.thread_time_ns
            for t in texts:
                c0 = tclock()
                t0 = clock()
                hits = r.search(text=t, k=K)
                times.append((clock() - t0) / 1e9)
                cpu.append((tclock() - c0) / 1e9)
                found.append([key_to_row(h.key, kidx) for h in hits])
            # thread CPU time: the text tower runs on the calling thread (one ONNX Runtime
            # thread) and hnswlib searches one query inline, so this is the query's CPU cost,
            # which other processes on the machine do not inflate as much as the wall time
            row[f"text_to_image_{q}"] = {**B.summarize(times), "recall_at_10": D.recall_at_k(found, truth),
                                         "ef": r.index.params.ef, "cpu": B.summarize(cpu)}
            if q == "int8":
                # image -> image on the same index
                itruth = D.exact_topk(x, q_img, K)
                for p in q_imgs[:20]:
                    r.search(image=p, k=K)
                found, times = [], []
                for p in q_imgs:
                    t0 = clock()
                    hits = r.search(image=p, k=K)
                    times.append((clock() - t0) / 1e9)
                    found.append([key_to_row(h.key, kidx) for h in hits])
                row["image_to_image_int8"] = {**B.summarize(times), "recall_at_10": D.recall_at_k(found, itruth)}
            r.index.close()
            del r
        log(f"  text->image p50 {row['text_to_image_int8']['p50_ms']:.3f} ms recall {row['text_to_image_int8']['recall_at_10']:.4f}")

        # baseline: PyTorch eager + exact numpy + list metadata
        meta = [{"key": corpus.keys[int(j)], "path": str(corpus.paths[int(j)]), "caption": corpus.captions[int(j)]}
                for j in src]
        ex = ExactSearch(x, meta)
        nb = len(texts) if n <= 100_000 else min(len(texts), args.baseline_queries_large)
        for t in texts[:20]:
            ex.search(torch_model.encode_text(t), K)
        times = []
        for t in texts[:nb]:
            t0 = time.perf_counter_ns()
            ex.search(torch_model.encode_text(t), K)
            times.append((time.perf_counter_ns() - t0) / 1e9)
        row["baseline_text_to_image"] = {**B.summarize(times), "what": "torch eager + numpy exact + list metadata"}
        times = []
        for p in q_imgs[: min(len(q_imgs), nb)]:
            t0 = time.perf_counter_ns()
            ex.search(torch_model.encode_images([p]), K)
            times.append((time.perf_counter_ns() - t0) / 1e9)
        row["baseline_image_to_image"] = B.summarize(times)
        row["speedup_text_p50"] = row["baseline_text_to_image"]["p50_ms"] / row["text_to_image_int8"]["p50_ms"]
        log(f"  baseline p50 {row['baseline_text_to_image']['p50_ms']:.3f} ms -> x{row['speedup_text_p50']:.1f}")
        del ex, meta

        # image -> text: an index of caption embeddings (real, plus perturbed copies beyond them)
        if n <= args.text_index_max:
            tx, tsrc = D.expand(ctx["txt"], n, ctx["scale_txt"])
            tfolder = ctx["work"] / f"index-texts-{n}"
            row["text_index_build_s"] = build_mmedge_index(tfolder, tx, tsrc, corpus, "text", b8.fingerprint, b8.dim)
            ttruth = D.exact_topk(tx, q_img, K)
            r = Retriever(b8, tfolder, readonly=True)
            for p in q_imgs[:20]:
                r.search(image=p, k=K)
            found, times = [], []
            for p in q_imgs:
                t0 = time.perf_counter_ns()
                hits = r.search(image=p, k=K)
                times.append((time.perf_counter_ns() - t0) / 1e9)
                found.append([key_to_row(h.key, kidx) for h in hits])
            row["image_to_text_int8"] = {**B.summarize(times), "recall_at_10": D.recall_at_k(found, ttruth)}
            r.index.close()
            del r
            shutil.rmtree(tfolder, ignore_errors=True)

        # hnswlib alone on this graph, across ef (mmedge's defaults at this N)
        if n >= 100_000:
            import hnswlib

            hfile = next(folder.glob("hnsw.*.bin"))
            h = hnswlib.Index(space="ip", dim=b8.dim)
            h.load_index(str(hfile))
            h.set_num_threads(1)
            truth = D.exact_topk(x, q_text["int8"], K)

            class _Raw(P.Hnswlib):
                def __init__(self, index: Any) -> None:
                    super().__init__()
                    self.index = index

            row["hnswlib_curve"] = P.measure(_Raw(h), q_text["int8"], truth, [k for k in KNOBS if k <= 128], k=K)
            del h
        row["load_average_end"] = B.load_average()
        out["sizes"][str(n)] = row
        del x, src
        gc.collect()
    res["e2e"] = out


# ------------------------------------------------------------------------------------ cold start


def bench_cold(ctx: dict[str, Any], res: dict[str, Any]) -> None:
    args = ctx["args"]
    log("cold start and memory")
    out: dict[str, Any] = {"load_average_start": B.load_average(), "command": "mmedge query BUNDLE --index INDEX "
                           f"--text {QUERY_TEXT!r} -k 10", "sizes": {}}
    exe = mmedge_exe()
    bundle = ctx["demo"] / "bundle-int8"
    indexes = {1000: ctx["demo"] / "index-images", **ctx.get("indexes", {})}
    # a pip-installed package has its bytecode compiled at install time; a source checkout
    # run with PYTHONDONTWRITEBYTECODE=1 would recompile mmedge's modules on every start
    import mmedge

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(mmedge.__file__).parent)],
                   check=False, capture_output=True, timeout=300)
    out["bytecode"] = "mmedge's modules compiled (python -m compileall) before timing, as pip install leaves them"
    torch_cmd = [sys.executable, "-c", "import torch"]
    out["torch_import"] = B.cold_runs(torch_cmd, runs=max(3, args.cold_runs // 2))
    out["python_startup"] = B.cold_runs([sys.executable, "-c", "pass"], runs=args.cold_runs)
    for n, folder in sorted(indexes.items()):
        cmd = [*exe, "query", str(bundle), "--index", str(folder), "--text", QUERY_TEXT, "-k", "10"]
        # alternate with the torch reference, so both see the same load
        r = B.cold_runs(cmd, runs=args.cold_runs)
        r.pop("stdout", None)
        r["index"] = str(folder)
        try:
            doc = json.loads((folder / "index.json").read_text())
            r["index_params"] = {k: doc[k] for k in ("M", "ef_construction", "ef", "count")}
        except (OSError, KeyError, ValueError):
            pass
        out["sizes"][str(n)] = r
        log(f"  N={n}: wall p50 {r['wall_p50_s']:.3f} s, cpu {r['cpu_p50_s']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MB")
    out["torch_import_end"] = B.cold_runs(torch_cmd, runs=max(3, args.cold_runs // 2))
    for key in ("torch_import", "torch_import_end", "python_startup"):
        out[key].pop("stdout", None)
    cmd_args = ["-m", "mmedge.cli.entry", "query", str(bundle), "--index", str(indexes[1000]), "--text", QUERY_TEXT]
    out["imports"] = B.import_profile(cmd_args)
    out["load_average_end"] = B.load_average()
    res["cold_start"] = out


# ------------------------------------------------------------------------------------ folder build


def bench_folder_build(ctx: dict[str, Any], res: dict[str, Any]) -> None:
    log("mmedge index build from image files")
    data = ctx["demo"] / "data" / "train" / "captions.csv"
    n_images = sum(1 for s in ctx["corpus"].split if s == "train")
    out_dir = ctx["work"] / "folder-index"
    runs = []
    for _ in range(ctx["args"].build_runs):
        cmd = [*mmedge_exe(), "index", "build", str(ctx["demo"] / "bundle-int8"), "--data", str(data),
               "--out", str(out_dir), "--overwrite"]
        r = B.run_child(cmd)
        if r["returncode"] != 0:
            raise RuntimeError(r["stderr"])
        runs.append({"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "images_per_s": n_images / r["wall_s"],
                     "peak_rss_mb": r["peak_rss_mb"], "load_average": B.load_average()})
        log(f"  {n_images} images in {r['wall_s']:.2f} s: {n_images / r['wall_s']:.0f} images/s")
    best = max(runs, key=lambda r: r["images_per_s"])
    res["folder_build"] = {"command": "mmedge index build BUNDLE --data DEMO/data/train/captions.csv --out DIR",
                           "images": n_images, "image_size": "64x64 PNG", "runs": runs,
                           "images_per_s_median": float(np.median([r["images_per_s"] for r in runs])),
                           "images_per_s_best": best["images_per_s"],
                           "note": "wall time of the whole command from exec to exit (start-up, decode, "
                                   "preprocess, encode, insert, save)"}
    shutil.rmtree(out_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ targets


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(key: str, name: str, target: str, measured: str, met: bool | None) -> None:
        row = {"key": key, "name": name, "target": target, "measured": measured, "met": met}
        if not met and key in NOTES:
            row["tried"], row["next"] = NOTES[key]
        rows.append(row)

    e2e = res.get("e2e", {}).get("sizes", {})
    for n, lim in (("100000", 1.0), ("1000000", 2.0)):
        if n in e2e:
            r = e2e[n]["text_to_image_int8"]
            add("text_p50", f"text query p50 at N={int(n):,}", f"<= {lim} ms at recall@10 >= {RECALL_TARGET}",
                f"{r['p50_ms']:.3f} ms (CPU {r['cpu']['p50_ms']:.3f} ms), recall@10 {r['recall_at_10']:.4f}",
                r["p50_ms"] <= lim and r["recall_at_10"] >= RECALL_TARGET)
    if "100000" in e2e:
        s = e2e["100000"]["speedup_text_p50"]
        add("speedup", "speed-up over PyTorch eager + exact numpy at N=100,000", ">= 20x", f"{s:.1f}x (p50 "
            f"{e2e['100000']['baseline_text_to_image']['p50_ms']:.2f} ms vs {e2e['100000']['text_to_image_int8']['p50_ms']:.3f} ms)",
            s >= 20)
    idx = res.get("index")
    if idx:
        d = idx["defaults"]
        lab = f"hnswlib(M={d['M']}, ef_construction={d['ef_construction']})"
        worst = None
        for r in ("0.98", "0.99", "0.995"):
            mine = idx["at_recall"][r].get(lab)
            peers = {k: v for k, v in idx["at_recall"][r].items()
                     if v is not None and (k.startswith("faiss-hnsw") or k.startswith("usearch"))}
            if mine is None or not peers:
                continue
            best_name, best = min(peers.items(), key=lambda kv: kv[1]["p50_ms"])
            ratio = mine["p50_ms"] / best["p50_ms"]
            if worst is None or ratio > worst[0]:
                worst = (ratio, r, best_name, mine["p50_ms"], best["p50_ms"])
        if worst:
            ratio, r, best_name, mine_ms, best_ms = worst
            add("peers", "hnswlib at the defaults vs best of faiss HNSW / usearch at equal recall",
                "no slower", f"worst case at recall>={r}: {mine_ms * 1e3:.0f} us vs {best_name} {best_ms * 1e3:.0f} us "
                f"({ratio:.2f}x)", ratio <= 1.0)
    cold = res.get("cold_start", {}).get("sizes", {})
    for n, r in cold.items():
        add("cold", f"cold `mmedge query` wall (N={int(n):,})", "<= 0.5 s", f"{r['wall_p50_s']:.3f} s (cpu {r['cpu_p50_s']:.3f} s)",
            r["wall_p50_s"] <= 0.5)
    enc = res.get("encoders")
    if enc:
        s = enc["sizes"]
        add("size", "int8 bundle size / fp32 (whole folder)", "<= 30%", f"{100 * s['ratio_bundle']:.1f}%",
            s["ratio_bundle"] <= 0.30)
        add("size_models", "int8 model files / fp32 model files", "<= 30%", f"{100 * s['ratio_models']:.1f}%", s["ratio_models"] <= 0.30)
        for tower, key, f, th in (("text", "text_batch1", "p50_ms", 1), ("image", "image_throughput", "model_only_images_per_s", 2)):
            a, b = enc[key][f"onnx-fp32-{th}t"][f], enc[key][f"onnx-int8-{th}t"][f]
            ok = (b <= a * 1.02) if f == "p50_ms" else (b >= a * 0.98)
            other = 3 - th
            a2, b2 = enc[key][f"onnx-fp32-{other}t"][f], enc[key][f"onnx-int8-{other}t"][f]
            unit = "ms p50" if f == "p50_ms" else "images/s, model only (decoding is the same for both)"
            fmt = (lambda v: f"{v:.3f}") if f == "p50_ms" else (lambda v: f"{v:.0f}")
            add("int8_speed", f"int8 {tower} tower no slower than fp32 ({th} thread{'s' if th > 1 else ''}, mmedge's default)",
                "int8 no slower (2% noise allowance)",
                f"int8 {fmt(b)} vs fp32 {fmt(a)} {unit} (at {other} thread{'s' if other > 1 else ''}: {fmt(b2)} vs {fmt(a2)})", ok)
    fb = res.get("folder_build")
    if fb:
        add("build", "`mmedge index build` from 64x64 files", ">= 2,000 images/s",
            f"{fb['images_per_s_median']:.0f} images/s (median of {len(fb['runs'])}; best {fb['images_per_s_best']:.0f})",
            fb["images_per_s_median"] >= 2000)
    if "100000" in cold:
        r = cold["100000"]
        add("rss", "query process peak RSS at N=100,000", "<= 200 MB", f"{r['peak_rss_mb']:.0f} MB", r["peak_rss_mb"] <= 200)
    return rows


# ------------------------------------------------------------------------------------ report


def plot(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    idx = res["index"]
    d = idx["defaults"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = {"hnswlib": "C0", "faiss": "C1", "usearch": "C2", "numpy": "C3"}
    default_lab = f"hnswlib(M={d['M']}, ef_construction={d['ef_construction']})"
    for c in idx["configs"]:
        xs = [p["qps"] for p in c["curve"]]
        ys = [p["recall_at_10"] for p in c["curve"]]
        main = c["label"] == default_lab or (c["params"].get("M") == d["M"] and c["params"].get("ef_construction") == d["ef_construction"]
                                             and c["params"].get("dtype", "f32") == "f32")
        label = c["label"] + ("  [mmedge defaults]" if c["label"] == default_lab else "")
        if len(xs) == 1:
            ax.scatter(xs, ys, color=colours.get(c["library"], "k"), marker="s", label=label, zorder=3)
        else:
            ax.plot(xs, ys, marker="o", ms=3, lw=2.2 if main else 1.0, ls="-" if main else "--",
                    color=colours.get(c["library"], "k"), alpha=1.0 if main else 0.6, label=label)
    e1m = res.get("e2e", {}).get("sizes", {}).get("1000000", {}).get("hnswlib_curve")
    if e1m:
        ax.plot([1e3 / p["mean_ms"] for p in e1m], [p["recall_at_10"] for p in e1m], marker="^", ms=3, lw=1.5,
                color="C4", label=f"hnswlib at mmedge defaults, N=1,000,000")
    ax.axhline(RECALL_TARGET, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (one query at a time, one thread)")
    ax.set_ylabel("recall@10 (vs exact search)")
    ax.set_title(f"text->image, N={idx['n']:,} x {res['data']['dim']}-d, {idx['queries']} queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def index_discussion(res: dict[str, Any]) -> str:
    """Who wins at equal recall, by how much, and the memory side, from this run's figures."""
    idx = res["index"]
    d = idx["defaults"]
    mine = f"hnswlib(M={d['M']}, ef_construction={d['ef_construction']})"
    parts = []
    for r in ("0.98", "0.99", "0.995"):
        row = idx["at_recall"][r]
        if row.get(mine) is None:
            continue
        peers = sorted(((k, v) for k, v in row.items() if v is not None and (k.startswith("faiss-hnsw") or k.startswith("usearch"))),
                       key=lambda kv: kv[1]["p50_ms"])
        if not peers:
            continue
        best_k, best_v = peers[0]
        ratio = row[mine]["p50_ms"] / best_v["p50_ms"]
        verdict = (f"hnswlib at the defaults is {1 / ratio:.2f}x as fast as the best peer ({best_k})" if ratio <= 1
                   else f"{best_k} is {ratio:.2f}x faster than hnswlib at the defaults")
        parts.append(f"at recall@10 >= {r}: {verdict} ({row[mine]['p50_ms'] * 1e3:.0f} us against "
                     f"{best_v['p50_ms'] * 1e3:.0f} us p50)")
    cfg = {c["label"]: c for c in idx["configs"]}
    mem = ""
    f16 = [c for c in idx["configs"] if c["params"].get("dtype") == "f16"]
    if f16 and mine in cfg:
        mem = (f" Memory: {cfg[mine]['bytes_per_item']:.0f} bytes per item for hnswlib at the defaults against "
               f"{f16[0]['bytes_per_item']:.0f} for usearch with float16 vectors: the vectors (4 bytes x {res['data']['dim']}) "
               "are most of an item, and hnswlib stores only float32, so a half-size index means moving to usearch "
               "(f16 or i8) if memory, not latency, becomes the limit.")
    return ("Equal-recall comparison (cheapest measured point reaching each recall; one query per call, one thread): "
            + "; ".join(parts) + "." + mem)


def fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    L: list[str] = []
    L.append("# mmedge performance\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Run: {res['started']} to {res['finished']} ({res['duration_s'] / 60:.1f} min)  ")
    L.append(f"Machine: {m['cpu']}, {m['usable_cores']} cores, flags {' '.join(m['cpu_flags'])} "
             f"(VNNI: {'yes' if m['vnni'] else 'no'}), {m['memory_gib']} GiB, {m['os']}  ")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  ")
    L.append(f"Load averages (1/5/15 min, `uptime`): start {res['load_average']['start']}, "
             f"end {res['load_average']['end']}. "
             + ("The machine was shared with other jobs during the run; "
                if max(res["load_average"]["start"][0], res["load_average"]["end"][0]) > m["usable_cores"]
                else "No other heavy job ran during the run; ")
             + "every section records its own load averages in perf.json, and every comparison was measured "
             "in this run, interleaved or back to back.\n")
    L.append("## Targets\n")
    L.append("| target | required | measured | met |")
    L.append("| --- | --- | --- | --- |")
    for t in res["targets"]:
        met = "yes" if t["met"] else ("no" if t["met"] is not None else "n/a")
        L.append(f"| {t['name']} | {t['target']} | {t['measured']} | **{met}** |")
    L.append("")
    missed = [t for t in res["targets"] if t["met"] is False]
    if missed:
        L.append("### Misses: the figure, what was tried, what is left\n")
        for t in missed:
            L.append(f"- **{t['name']}**: {t['measured']} against {t['target']}. Tried: {t.get('tried', '-')}. "
                     f"Next: {t.get('next', '-')}.")
        L.append("")
    dd = res["data"]
    L.append("## Data\n")
    L.append(dd["description"] + "\n")
    e2e = res.get("e2e")
    if e2e:
        L.append("## End-to-end query (tokenise/decode -> encode -> HNSW top-10 -> SQLite metadata)\n")
        L.append("One query at a time, in-process `Retriever.search` (index opened read-only), latencies in ms. "
                 "Baseline: the same model in PyTorch eager + exact numpy search + metadata from a Python list.\n")
        L.append("| N | direction | mmedge p50 | p95 | p99 | CPU p50 | recall@10 | baseline p50 | baseline p95 | speed-up (p50) |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, r in e2e["sizes"].items():
            for key, lab, base in (("text_to_image_int8", "text->image (int8)", "baseline_text_to_image"),
                                   ("text_to_image_fp32", "text->image (fp32)", None),
                                   ("image_to_image_int8", "image->image (int8)", "baseline_image_to_image"),
                                   ("image_to_text_int8", "image->text (int8)", None)):
                if key not in r:
                    continue
                t = r[key]
                cpu = fmt_ms(t["cpu"]["p50_ms"]) if "cpu" in t else ""
                cells = f"| {int(n):,} | {lab} | {fmt_ms(t['p50_ms'])} | {fmt_ms(t['p95_ms'])} | {fmt_ms(t['p99_ms'])} | {cpu} | {t['recall_at_10']:.4f} |"
                if base:
                    b = r[base]
                    cells += f" {fmt_ms(b['p50_ms'])} | {fmt_ms(b['p95_ms'])} | {b['p50_ms'] / t['p50_ms']:.1f}x |"
                else:
                    cells += " | | |"
                L.append(cells)
        L.append("")
        L.append("Text queries: " + str(e2e["sizes"][next(iter(e2e["sizes"]))]["text_to_image_int8"]["n"])
                 + " captions of the test and validation splits; image queries: test images (decoded from their files). "
                 f"The baseline uses one torch thread (faster than two at batch 1, see Encoders); at N above 100,000 it runs "
                 f"{res['args']['baseline_queries_large']} queries (exact search there takes tens of ms each). CPU p50: the "
                 "querying thread's CPU time (the text tower runs one ONNX Runtime thread on it and hnswlib searches one "
                 "query inline), less inflated than wall time by the other jobs on the machine.\n")
        L.append("| N | mmedge index build (s) | items/s | index bytes per item (HNSW + SQLite) |")
        L.append("| --- | --- | --- | --- |")
        for n, r in e2e["sizes"].items():
            L.append(f"| {int(n):,} | {r['build_s']:.1f} | {r['build_items_per_s']:.0f} | {r['index_bytes_per_item']:.0f} |")
        L.append("")
    idx = res.get("index")
    if idx:
        L.append(f"## Index libraries at N={idx['n']:,} ({idx['queries']} text queries, k=10)\n")
        L.append(f"mmedge defaults: M={idx['defaults']['M']}, ef_construction={idx['defaults']['ef_construction']}, "
                 f"ef={idx['defaults']['ef']}. {idx['note']}. Curves: `perf_recall_qps.png`.\n")
        L.append("| index | build (s) | bytes/item | p50 at recall>=0.98 | >=0.99 | >=0.995 | >=0.999 | exact/max recall |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in idx["configs"]:
            cells = []
            for r in ("0.98", "0.99", "0.995", "0.999"):
                v = idx["at_recall"][r].get(c["label"])
                cells.append("not reached" if v is None else (f"{v['p50_ms'] * 1e3:.0f} us" + (f" ({c['knob']}={v['knob']})" if v["knob"] else "")))
            L.append(f"| {c['label']} | {c['build_s']:.1f} | {c['bytes_per_item']:.0f} | " + " | ".join(cells)
                     + f" | {max(p['recall_at_10'] for p in c['curve']):.4f} |")
        L.append("")
        L.append(index_discussion(res) + "\n")
    enc = res.get("encoders")
    if enc:
        L.append("## Encoders\n")
        L.append("| variant | text, batch 1: p50 (ms) | p95 | images/s (decode + preprocess + encode, batch 64) | images/s (model only) |")
        L.append("| --- | --- | --- | --- | --- |")
        for k in enc["text_batch1"]:
            t, i = enc["text_batch1"][k], enc["image_throughput"][k]
            L.append(f"| {k} | {t['p50_ms']:.3f} | {t['p95_ms']:.3f} | {i['images_per_s']:.0f} | {i['model_only_images_per_s']:.0f} |")
        s = enc["sizes"]
        L.append("")
        L.append("| bundle | image.onnx | text.onnx | whole folder |")
        L.append("| --- | --- | --- | --- |")
        for q in ("fp32", "int8"):
            L.append(f"| {q} ({', '.join(f'{k} {v}' for k, v in s['quantization'][q].items())}) | {s[q]['image.onnx']:,} | "
                     f"{s[q]['text.onnx']:,} | {s[q]['total']:,} |")
        L.append(f"| int8 / fp32 | {100 * s['ratio_per_tower']['image']:.1f}% | {100 * s['ratio_per_tower']['text']:.1f}% | "
                 f"{100 * s['ratio_bundle']:.1f}% (models only {100 * s['ratio_models']:.1f}%) |")
        L.append("")
        L.append(f"Per-tower choice by this run's measurement (int8 where it is no slower): {enc['per_tower_choice']}.\n")
    cold = res.get("cold_start")
    if cold:
        L.append("## Cold start and memory\n")
        L.append(f"`{cold['command']}` as a fresh process (median of {next(iter(cold['sizes'].values()))['runs']} runs after one "
                 "warm-up run that fills the page cache); peak RSS is the process's own high-water mark. "
                 + (cold.get("bytecode", "") + "." if cold.get("bytecode") else "") + "\n")
        L.append("| what | wall p50 (s) | CPU p50 (s) | peak RSS (MB) |")
        L.append("| --- | --- | --- | --- |")
        L.append(f"| `python -c pass` | {cold['python_startup']['wall_p50_s']:.3f} | {cold['python_startup']['cpu_p50_s']:.3f} | "
                 f"{cold['python_startup']['peak_rss_mb']:.0f} |")
        for key, lab in (("torch_import", "`python -c 'import torch'` (before)"), ("torch_import_end", "`python -c 'import torch'` (after)")):
            L.append(f"| {lab} | {cold[key]['wall_p50_s']:.3f} | {cold[key]['cpu_p50_s']:.3f} | {cold[key]['peak_rss_mb']:.0f} |")
        for n, r in cold["sizes"].items():
            mem = res.get("e2e", {}).get("sizes", {}).get(n, {}).get("index_bytes_per_item")
            L.append(f"| `mmedge query`, N={int(n):,} | {r['wall_p50_s']:.3f} | {r['cpu_p50_s']:.3f} | {r['peak_rss_mb']:.0f} |")
        L.append("")
        imp = cold["imports"]
        L.append(f"Start-up imports of `mmedge query` ({imp['n_modules']} modules): top-level packages "
                 f"{', '.join(imp['packages'])}. Heavy packages present: {', '.join(imp['heavy_present']) or 'none'}. "
                 "Slowest top-level imports (cumulative ms, one `-X importtime` run): "
                 + ", ".join(f"{n} {ms}" for n, ms in imp["slowest_top_level_ms"][:10]) + ".\n")
    fb = res.get("folder_build")
    if fb:
        L.append("## Indexing a folder\n")
        L.append(f"`{fb['command']}`: {fb['images']:,} {fb['image_size']} files; {fb['note']}.\n")
        L.append("| run | wall (s) | CPU (s) | images/s | peak RSS (MB) | load |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for i, r in enumerate(fb["runs"], 1):
            L.append(f"| {i} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['load_average']} |")
        L.append("")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmedge-perf"), help="indexes and caches (large at 1M)")
    ap.add_argument("--demo", type=Path, default=None, help="a finished `mmedge demo` folder (default: WORK/demo, made if missing)")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="end-to-end index sizes")
    ap.add_argument("--peer-size", type=int, default=100_000, help="N for the library comparison")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--image-queries", type=int, default=300)
    ap.add_argument("--images", type=int, default=2048, help="images for the encoder throughput")
    ap.add_argument("--baseline-queries-large", type=int, default=200, help="baseline text queries at N > 100,000")
    ap.add_argument("--text-index-max", type=int, default=100_000, help="largest N with an image->text index")
    ap.add_argument("--cold-runs", type=int, default=7)
    ap.add_argument("--build-runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the library comparison")
    ap.add_argument("--only", default="", help="comma list: encoders,index,e2e,cold,build (default all)")
    ap.add_argument("--quick", action="store_true", help="N=10,000 only, fewer queries and runs (a smoke run)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite perf.md from --out's perf.json (targets and their notes recomputed; no measuring)")
    args = ap.parse_args()
    if args.report_only:
        try:
            res = json.loads((args.out / "perf.json").read_text())
        except (OSError, ValueError) as exc:
            sys.exit(f"perf.py: cannot read {args.out / 'perf.json'} ({exc}); run without --report-only first")
        res["targets"] = targets(res)
        D.save_json(args.out / "perf.json", res)
        (args.out / "perf.md").write_text(markdown(res))
        return
    if args.quick:
        args.sizes, args.peer_size, args.queries, args.image_queries = "10000", 10_000, 300, 100
        args.images, args.cold_runs, args.build_runs, args.rounds = 512, 3, 1, 1
    sections = set(args.only.split(",")) if args.only else {"encoders", "index", "e2e", "cold", "build"}

    t_start = time.time()
    res: dict[str, Any] = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                           "environment": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
                           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "machine": B.machine(), "load_average": {"start": B.load_average()}}
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    demo = D.ensure_demo(args.demo or args.work / "demo", log)
    corpus = D.load_corpus(demo)
    img, txt = D.embed_corpus(corpus, demo / "bundle-int8", args.work / "cache", log)
    query_texts = [c for c, s in zip(corpus.captions, corpus.split) if s == "test"] + \
                  [c for c, s in zip(corpus.captions, corpus.split) if s == "val"]
    from mmedge.runtime.retriever import Retriever

    q_emb = {}
    for q in ("int8", "fp32"):  # one query at a time, as the retriever embeds them
        r = Retriever(demo / f"bundle-{q}")
        q_emb[q] = np.concatenate([r.encode_text(t) for t in query_texts[: args.queries]])
    target_cos = D.kth_neighbour_cosine(img)
    scale = D.perturbation_scale(img, target_cos)
    scale_txt = D.perturbation_scale(txt, D.kth_neighbour_cosine(txt))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    res["data"] = {
        "real_images": len(img), "dim": int(img.shape[1]), "query_texts": min(args.queries, len(query_texts)),
        "image_tenth_neighbour_cosine": target_cos, "perturbation_scale_images": scale,
        "perturbation_scale_texts": scale_txt, "sizes": sizes,
        "description": (
            f"Real items: the {len(img):,} images (64x64 PNG) of the built-in synthetic shapes dataset written by "
            "`mmedge demo` (train, val and test splits), embedded with the int8 bundle's image tower; queries: "
            f"{min(args.queries, len(query_texts))} captions of the test and validation splits, embedded one at a time. "
            f"For N beyond {len(img):,}, the corpus is the real embeddings plus perturbed copies: normalise(x_s + a (x_u - x_v)) "
            "for a random real source s and two random real items u, v (noise that follows the data's own covariance), "
            f"with a = {scale:.3f} so that a copy's median cosine to its source ({target_cos:.3f}) equals the median cosine "
            "between a real image and its 10th nearest real neighbour. Each copy keeps its source's path and caption. "
            "Exact top-10 over the same vectors is the ground truth for recall@10.")}
    ctx = {"args": args, "demo": demo, "work": args.work, "corpus": corpus, "img": img, "txt": txt,
           "query_texts": query_texts, "q_int8": q_emb["int8"], "q_fp32": q_emb["fp32"], "scale": scale,
           "scale_txt": scale_txt, "sizes": sizes}

    if "encoders" in sections:
        bench_encoders(ctx, res)
    if "index" in sections:
        bench_index(ctx, res)
    if "e2e" in sections:
        bench_e2e(ctx, res)
    if "cold" in sections:
        bench_cold(ctx, res)
    if "build" in sections:
        bench_folder_build(ctx, res)

    res["finished"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    res["duration_s"] = time.time() - t_start
    res["load_average"]["end"] = B.load_average()
    res["targets"] = targets(res)
    if "index" in res and plot(res, args.out / "perf_recall_qps.png"):
        res["plot"] = "perf_recall_qps.png"
    D.save_json(args.out / "perf.json", res)
    (args.out / "perf.md").write_text(markdown(res))
    log(f"wrote {args.out / 'perf.json'} and perf.md in {res['duration_s'] / 60:.1f} min")
    for t in res["targets"]:
        print(f"  [{'ok' if t['met'] else 'MISS'}] {t['name']}: {t['measured']} (target {t['target']})")


if __name__ == "__main__":
    main()
