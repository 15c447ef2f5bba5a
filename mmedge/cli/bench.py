"""``mmedge bench BUNDLE [--index INDEX]``: latency, throughput, cold start and memory on this device.

The figures come from :func:`mmedge.runtime.benchmark.run_bench`: text encoding at batch 1,
image throughput (decode + preprocess + encode), end-to-end queries against the index when one
is given, a cold ``mmedge query`` as a fresh process (wall time, CPU time, peak RSS) and the
bundle's sizes. Query inputs are the bundle's golden texts and images unless ``--data`` names
a dataset whose captions and images are used instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from mmedge.errors import UsageError


def _ms(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['p50_ms']:.3f} / {summary['p95_ms']:.3f} / {summary['p99_ms']:.3f}"


def format_table(res: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_bench`'s result."""
    m = res["machine"]
    b = res["bundle"]
    rows: list[tuple[str, str]] = [
        ("machine", f"{m['cpu']}, {m['usable_cores']} cores, {' '.join(m['cpu_flags']) or '-'}"),
        ("load average", f"{m['load_average']} -> {m.get('load_average_end', '')}"),
        ("bundle", f"{b['path']} ({', '.join(f'{k} {v}' for k, v in b['quantization'].items())}), "
                   f"{b['bytes']:,} bytes (image {b['image_model_bytes']:,}, text {b['text_model_bytes']:,})"),
        ("text encode, batch 1 (ms p50/p95/p99)", _ms(res["text_encoder"])),
    ]
    ie = res.get("image_encoder")
    if ie:
        rows.append(("image throughput (decode+preprocess+encode)", f"{ie['images_per_s']:.0f} images/s (batch {ie['batch']})"))
        rows.append(("image encode, batch 1 (ms p50/p95/p99)", _ms(ie.get("batch1"))))
    q = res.get("query")
    if q:
        rows.append(("index", f"{q['items']:,} items, {q['index_bytes_per_item']:.0f} bytes/item, params {q['params']}"))
        rows.append((f"text query top-{q['k']} (ms p50/p95/p99)", _ms(q["text"])))
        if q.get("image"):
            rows.append((f"image query top-{q['k']} (ms p50/p95/p99)", _ms(q["image"])))
    c = res["cold_start"]
    if "error" in c:
        rows.append(("cold start", f"failed: {c['error']}"))
    else:
        rows.append(("cold start (s, wall p50 / CPU p50)", f"{c['wall_p50_s']:.3f} / {c['cpu_p50_s']:.3f} ({c['runs']} runs)"))
        rows.append(("query process peak RSS", f"{c['peak_rss_mb']:.0f} MB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def bench(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help="Index folder: adds end-to-end queries."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset whose captions and images are the queries."),
    queries: int = typer.Option(200, help="Queries per measurement."),
    images: int = typer.Option(256, help="Images for the throughput measurement."),
    cold_runs: int = typer.Option(5, help="Fresh processes for the cold-start measurement."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads."),
    k: int = typer.Option(10, "-k", help="Results per query."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Measure latency, throughput, cold start and memory of a bundle (and index) on this device."""
    if queries < 1 or images < 1 or cold_runs < 1 or k < 1:
        raise UsageError("--queries, --images, --cold-runs and -k must be at least 1")
    from mmedge.runtime.benchmark import run_bench

    texts = image_files = None
    if data is not None:
        from mmedge.data import load_pairs

        pairs = load_pairs(data).pairs
        texts = [p.caption for p in pairs]
        image_files = list(dict.fromkeys(p.image for p in pairs))
    res = run_bench(bundle, index, texts=texts, images=image_files, queries=queries, image_count=images,
                    cold_runs=cold_runs, threads=threads, k=k,
                    on_step=None if as_json else (lambda s: typer.echo(f"measuring {s} ...", err=True)))
    if as_json:
        typer.echo(json.dumps(res, indent=2, default=float))
    else:
        typer.echo(format_table(res))
