"""Throughput of the distributed paths on this machine: corpus embedding with 1 vs 2
Ray workers (vs the single-process `mmedge index build`), and training with 1 vs 2
torchrun processes (gloo, CPU).

    python benchmarks/distributed.py --out benchmarks/results [--images 4000]

Needs a bundle and 64x64 images: by default it runs `mmedge demo`'s data generator
and trains a small model for the bundle (or pass --bundle/--data). Writes
distributed.json and distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg": os.getloadavg()}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for n in ("mmedge", "torch", "onnxruntime", "ray", "hnswlib", "numpy"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def bench_ray(bundle: Path, data: Path, n_images: int, work: Path) -> list[dict]:
    import ray

    from mmedge.cli.main import main as cli_main  # noqa: F401  (import cost outside the timings)
    from mmedge.data import load_pairs
    from mmedge.distributed.ray_index import build_index_ray
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder
    from mmedge.runtime.index import Index, Item
    from mmedge.runtime.preprocess import preprocess

    pairs = load_pairs(data).pairs[:n_images]
    rows = []
    # single process, the local engine's path (decode + preprocess + encode + insert + save)
    b = Bundle.load(bundle)
    for threads in (1, 2):
        enc = ImageEncoder(b, threads=threads)
        t = time.perf_counter()
        idx = Index.create(work / f"local-{threads}", dim=b.dim, fingerprint=b.fingerprint, overwrite=True)
        for s in range(0, len(pairs), 256):
            chunk = pairs[s : s + 256]
            vec = enc.encode_pixels(preprocess([p.image for p in chunk], b.preprocess))
            idx.add([Item(key=p.key, path=str(p.image)) for p in chunk], vec)
        idx.save()
        dt = time.perf_counter() - t
        rows.append({"engine": "local (one process)", "workers": 1, "ort_threads": threads, "images": len(pairs),
                     "seconds": dt, "images_per_s": len(pairs) / dt})
    for workers in (1, 2):
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            # warm-up: actor start-up and bundle load, then the measured run
            build_index_ray(bundle, pairs[:64], work / "warm", workers=workers, batch_size=32, overwrite=True)
            t = time.perf_counter()
            st = build_index_ray(bundle, pairs, work / f"ray-{workers}", workers=workers, batch_size=256,
                                 overwrite=True)
            dt = time.perf_counter() - t
        finally:
            ray.shutdown()
        rows.append({"engine": "ray", "workers": workers, "ort_threads": 1, "images": len(pairs), "seconds": dt,
                     "images_per_s": len(pairs) / dt, "embed_images_per_s": st["per_second"]})
    return rows


def bench_torchrun(data: Path, val: Path, work: Path, steps_note: str) -> list[dict]:
    """Stage-2 training throughput (pairs/s) for 1 and 2 torchrun processes."""
    rows = []
    script = ROOT / "benchmarks" / "_train_small.py"
    for nproc in (1, 2):
        out = work / f"run-{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(script), str(data), str(out), str(nproc)]
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // nproc)))
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            rows.append({"engine": "torchrun", "processes": nproc, "error": proc.stderr[-2000:]})
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        s2 = metrics["timings"]["stage2_s"]
        n = metrics["n_train"] * metrics.get("stage2_epochs", 1)
        rows.append({"engine": "torchrun (gloo, CPU)", "processes": nproc, "threads_per_process": max(1, 2 // nproc),
                     "wall_s": dt, "stage2_s": s2, "pairs_per_s": n / s2, "note": steps_note})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--data", type=Path, help="captions.csv of 64x64 images")
    ap.add_argument("--skip-torchrun", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmedge-dist-"))
    from mmedge.data.synthetic import generate

    csvs = generate(work / "data", seed=0, n_train=max(args.images, 2000), n_val=200, n_test=200)
    data = args.data or csvs["train"]
    bundle = args.bundle
    if bundle is None:
        from mmedge.export.bundle import export
        from mmedge.train.config import synthetic_recipe
        from mmedge.train.pipeline import train

        cfg = synthetic_recipe(0)
        cfg.stage1.enabled = False
        cfg.stage2.epochs = 1
        train(csvs["train"], work / "run", cfg)
        bundle = export(work / "run", work / "bundle-int8", quantize="int8").bundle_dir
    result = {"command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "versions": versions(), "ray": bench_ray(bundle, data, args.images, work)}
    if not args.skip_torchrun:
        result["torchrun"] = bench_torchrun(csvs["train"], csvs["val"], work,
                                            "synthetic_recipe, stage 1 off, 2 epochs, global batch 256")
    result["machine"]["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=2))
    lines = ["# Distributed throughput on this machine", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, Python "
             f"{result['machine']['python']}; load average at start {result['machine']['load_avg']}, "
             f"at end {result['machine']['load_avg_end']}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             "## Corpus embedding (64x64 PNG -> int8 bundle -> HNSW index)", "",
             "| engine | workers | ORT threads | images | seconds | images/s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["ray"]:
        lines.append(f"| {r['engine']} | {r['workers']} | {r['ort_threads']} | {r['images']} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.0f} |")
    lines += ["", "Ray rows include the driver's HNSW build and save; actor start-up and bundle load are "
              "excluded by a warm-up build. With 2 cores, 2 Ray workers compete with the driver and "
              "Ray's own processes, so per-core figures matter more than the speed-up here.", ""]
    if "torchrun" in result:
        lines += ["## Training (stage 2) under torchrun", "",
                  "| processes | threads each | stage-2 s | pairs/s | wall s |", "| --- | --- | --- | --- | --- |"]
        for r in result["torchrun"]:
            if "error" in r:
                lines.append(f"| {r['processes']} | failed: see distributed.json | | | |")
            else:
                lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['stage2_s']:.1f} | "
                             f"{r['pairs_per_s']:.0f} | {r['wall_s']:.1f} |")
        lines += ["", "Both runs use the same global batch (the 2-process run has half the batch per "
                  "process, contrastive loss over the all-gathered global batch), so they train the same "
                  "model; on one 2-core machine the processes share the cores."]
    (args.out / "distributed.md").write_text("\n".join(lines) + "\n")
    print((args.out / "distributed.md").read_text())


if __name__ == "__main__":
    main()
