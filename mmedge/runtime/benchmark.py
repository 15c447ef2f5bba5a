"""Measuring helpers shared by ``mmedge bench`` and ``benchmarks/perf.py``.

Only the standard library, numpy and the runtime itself (never torch). Latencies are wall
clock (``time.perf_counter_ns``) per call, one call at a time; summaries give p50/p95/p99 in
milliseconds. Peak memory is the kernel's high-water mark of resident memory (``ru_maxrss``
of a finished child process, or ``VmHWM`` of this one).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Libraries whose versions a result records (missing ones are left out).
VERSIONED = ("mmedge", "numpy", "onnxruntime", "hnswlib", "tokenizers", "pillow", "typer", "torch",
             "faiss-cpu", "usearch")


def summarize(seconds: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Durations in seconds -> ``{"n", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "min_ms"}``."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0, "p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan"), "min_ms": float("nan")}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(a.mean()), "min_ms": float(a.min())}


def time_each(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = 20) -> dict[str, float]:
    """Call ``fn(x)`` for each input (after ``warmup`` untimed calls); summary of the durations."""
    for x in list(inputs)[:warmup]:
        fn(x)
    clock = time.perf_counter_ns
    out = np.empty(len(inputs), dtype=np.float64)
    for i, x in enumerate(inputs):
        t = clock()
        fn(x)
        out[i] = clock() - t
    return summarize(out / 1e9)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (``uptime``), or [] where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, in MB (10^6 bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:  # pragma: no cover - not Linux
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["model"] in ("", platform.machine(), platform.processor()):
            info["model"] = value.strip()
        elif key == "flags" and not info["flags"]:
            flags = set(value.split())
            wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                      "avx_vnni", "amx_int8")
            info["flags"] = [f for f in wanted if f in flags]
    info["vnni"] = any(f in info["flags"] for f in ("avx512_vnni", "avx_vnni"))
    return info


def versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    """CPU model and flags, core counts, memory, OS, library versions and load averages."""
    cpu = _cpu_info()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):  # pragma: no cover
        pass
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "vnni": cpu.get("vnni", False),
            "logical_cores": os.cpu_count(), "usable_cores": affinity, "memory_gib": mem,
            "os": platform.platform(), "versions": versions(), "load_average": load_average()}


# Spawned by run_child: starts the command, waits for it with wait4 and reports its wall time,
# CPU time and peak RSS on a last stderr line. The command is started from this small process
# rather than from the caller, because a child forked from a large process inherits that
# process's resident-memory high-water mark (ru_maxrss survives exec).
_LAUNCHER = r"""
import os, sys, time
t = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
sys.stderr.write("\n@@rusage %r %r %r\n" % (wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
_MARK = "@@rusage "


def run_child(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    """Run ``cmd`` as a fresh process: wall seconds from spawn to exit, its CPU seconds (user +
    system), its own peak RSS in MB, exit code, stdout and stderr."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, env=env,
                          timeout=timeout)
    err = proc.stderr.decode("utf-8", "replace")
    head, _, tail = err.rpartition("\n" + _MARK)
    wall = cpu = rss = float("nan")
    if tail:
        wall, cpu, maxrss = (float(v) for v in tail.split()[:3])
        scale = 1 if sys.platform == "darwin" else 1024
        rss = maxrss * scale / 1e6
        err = head
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss, "returncode": proc.returncode,
            "stdout": proc.stdout.decode("utf-8", "replace"), "stderr": err}


def cold_runs(cmd: Sequence[str], runs: int, warmup: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` ``warmup + runs`` times as fresh processes (the warm-up fills the page cache);
    wall and CPU time medians, peak RSS (max over runs) and the last output. A failing run raises
    RuntimeError with its stderr."""
    walls, cpus, rss = [], [], []
    last: dict[str, Any] = {}
    for i in range(warmup + runs):
        last = run_child(cmd, env=env)
        if last["returncode"] != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({last['returncode']}): {last['stderr'].strip()[-500:]}")
        if i >= warmup:
            walls.append(last["wall_s"])
            cpus.append(last["cpu_s"])
            rss.append(last["peak_rss_mb"])
    s = summarize(walls)
    return {"runs": runs, "wall_p50_s": s["p50_ms"] / 1e3, "wall_min_s": s["min_ms"] / 1e3,
            "wall_max_s": float(max(walls)), "cpu_p50_s": float(np.median(cpus)),
            "peak_rss_mb": float(max(rss)), "stdout": last.get("stdout", "")}


def import_profile(cmd_args: Sequence[str], python: str = sys.executable, top: int = 15) -> dict[str, Any]:
    """``python -X importtime`` of a command: every top-level package it imports and the
    slowest imports (cumulative microseconds)."""
    res = subprocess.run([python, "-X", "importtime", *cmd_args], capture_output=True, text=True, timeout=300)
    rows = []
    for line in res.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        parts = line[len("import time:"):].split("|")
        try:
            cum = int(parts[1])
        except ValueError:
            continue
        name = parts[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((name.strip(), cum, depth))
    packages = sorted({name.split(".")[0] for name, _, _ in rows if not name.startswith("_")})
    top_level = sorted(((n, c) for n, c, d in rows if d == 0), key=lambda r: -r[1])[:top]
    return {"packages": packages, "n_modules": len(rows),
            "slowest_top_level_ms": [[n, round(c / 1e3, 1)] for n, c in top_level],
            "heavy_present": [p for p in ("torch", "onnx", "onnxscript", "sympy", "matplotlib", "faiss", "usearch",
                                          "scipy", "pandas", "rich") if p in packages]}


def file_sizes(folder: Path) -> dict[str, int]:
    """Bytes of every file under ``folder`` (relative posix paths), plus ``"total"``."""
    out: dict[str, int] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = p.stat().st_size
    out["total"] = sum(out.values())
    return out


def mmedge_command() -> list[str]:
    """How to start ``mmedge`` as a fresh process with this interpreter's installation."""
    exe = Path(sys.executable).parent / ("mmedge.exe" if os.name == "nt" else "mmedge")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mmedge.cli.entry"]


def golden_inputs(bundle: Any) -> tuple[list[str], list[Path]]:
    """The bundle's golden texts (non-blank) and image files: sample inputs that every bundle has."""
    import json

    gpath = bundle.golden_path
    if gpath is None or not gpath.is_file():
        return [], []
    g = json.loads(gpath.read_text(encoding="utf-8"))
    texts = [t for t in g.get("texts", []) if isinstance(t, str) and t.strip()]
    images = [bundle.path / rel for rel in g.get("images", []) if isinstance(rel, str)]
    return texts, [p for p in images if p.is_file()]


def run_bench(
    bundle_path: str | os.PathLike[str],
    index_path: str | os.PathLike[str] | None = None,
    texts: Sequence[str] | None = None,
    images: Sequence[str | os.PathLike[str]] | None = None,
    queries: int = 200,
    image_count: int = 256,
    cold_runs: int = 5,
    threads: int | None = None,
    k: int = 10,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure a bundle (and optionally an index) on this machine; the figures of ``mmedge bench``.

    ``texts`` / ``images``: query inputs (default: the bundle's golden texts and images, cycled).
    Returns ``{"machine", "bundle", "text_encoder", "image_encoder", "query" (with an index),
    "cold_start", "memory"}``; latencies in ms, throughput in images per second.
    """
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.preprocess import preprocess
    from mmedge.runtime.retriever import Retriever

    say = on_step or (lambda _msg: None)
    bundle = Bundle.load(bundle_path)
    g_texts, g_images = golden_inputs(bundle)
    texts = [t for t in (texts or g_texts) if t.strip()]
    image_files = list(images or g_images)
    if not texts:
        texts = ["a photo"]
    qtexts = [texts[i % len(texts)] for i in range(max(1, queries))]
    out: dict[str, Any] = {"machine": machine()}
    sizes = file_sizes(bundle.path)
    out["bundle"] = {"path": str(bundle.path), "quantization": dict(bundle.quantization), "dim": bundle.dim,
                     "bytes": sizes["total"], "image_model_bytes": sizes.get(bundle.manifest["image"]["model"]),
                     "text_model_bytes": sizes.get(bundle.manifest["text"]["model"])}

    say("text encoder")
    r = Retriever(bundle, index_path, threads=threads, readonly=True)
    out["text_encoder"] = {**time_each(r.encode_text, qtexts), "threads": threads, "what": "tokenise + encode, batch 1"}

    if image_files:
        say("image encoder")
        files = [image_files[i % len(image_files)] for i in range(max(1, image_count))]
        enc = r.image_encoder
        batch = 64
        enc.encode_pixels(preprocess(files[:batch], enc.preprocess_config))
        t = time.perf_counter()
        for i in range(0, len(files), batch):
            enc.encode_pixels(preprocess(files[i:i + batch], enc.preprocess_config))
        out["image_encoder"] = {"images_per_s": len(files) / (time.perf_counter() - t), "images": len(files),
                                "batch": batch, "what": "decode + preprocess + encode"}
        out["image_encoder"]["batch1"] = time_each(lambda p: r.encode_image(p), files[: min(len(files), queries)])

    if index_path is not None:
        say("queries")
        index = r.index
        q: dict[str, Any] = {"items": len(index), "k": k}
        q["text"] = time_each(lambda t: r.search(text=t, k=k), qtexts)
        if image_files:
            files = [image_files[i % len(image_files)] for i in range(max(1, queries))]
            q["image"] = time_each(lambda p: r.search(image=p, k=k), files)
        info = index.info()
        q["index_bytes"] = sum(info.get("files", {}).values())
        q["index_bytes_per_item"] = q["index_bytes"] / max(1, len(index))
        q["params"] = info.get("params")
        out["query"] = q
        index.close()

    say("cold start")
    if index_path is not None:
        cmd = [*mmedge_command(), "query", str(bundle.path), "--index", str(index_path), "--text", qtexts[0],
               "-k", str(k)]
        what = "mmedge query BUNDLE --index INDEX --text TEXT, a fresh process"
    else:
        code = ("import sys; from mmedge.runtime.retriever import Retriever; "
                "Retriever(sys.argv[1]).encode_text(sys.argv[2])")
        cmd = [sys.executable, "-c", code, str(bundle.path), qtexts[0]]
        what = "a fresh Python process that loads the bundle and encodes one text (no index given)"
    cold = cold_runs_or_error(cmd, cold_runs)
    cold["what"] = what
    out["cold_start"] = cold
    out["memory"] = {"query_process_peak_rss_mb": cold.get("peak_rss_mb"), "this_process_peak_rss_mb": peak_rss_mb()}
    out["machine"]["load_average_end"] = load_average()
    return out


def cold_runs_or_error(cmd: Sequence[str], runs: int) -> dict[str, Any]:
    try:
        r = cold_runs(cmd, runs=max(1, runs))
    except RuntimeError as exc:
        return {"error": str(exc)}
    r.pop("stdout", None)
    return r
