"""The ``mmedge`` command line.

Heavy modules (torch, onnxruntime, hnswlib) are imported inside the commands
that need them, so ``mmedge query`` never loads the training stack. Library
errors (:class:`mmedge.errors.MmedgeError`) become one line on stderr and the
error's exit code (data errors 1, usage errors 2); ``--debug`` (anywhere on the
command line) or ``MMEDGE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from mmedge.errors import MmedgeError, MissingDependencyError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="On-device image<->text retrieval: train, export, index, query, evaluate.")
index_app = typer.Typer(no_args_is_help=True, help="Build and edit search indexes.")
app.add_typer(index_app, name="index")


# ----------------------------------------------------------------------------- output helpers


def _out(msg: str = "") -> None:
    typer.echo(msg)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def _need_train() -> None:
    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        raise MissingDependencyError("this command needs the training extra: pip install 'mmedge[train]'") from None


def _check_batch_size(batch_size: int, modality: str) -> None:
    from mmedge.runtime.preprocess import MAX_IMAGE_BATCH
    from mmedge.runtime.tokenizer import MAX_BATCH

    limit = MAX_BATCH if modality == "text" else MAX_IMAGE_BATCH
    if not 1 <= batch_size <= limit:
        raise UsageError(f"--batch-size must be between 1 and {limit} for {modality}s, got {batch_size}")


@contextmanager
def _building(out: Path, overwrite: bool):
    """A fresh sibling folder to build an index in; moved to ``out`` only when the body
    succeeds, deleted otherwise, so a failed build leaves ``out`` as it was."""
    from mmedge.runtime.index import install_index

    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        install_index(tmp, out, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Bar:
    """A rich progress bar fed by the library's progress callbacks."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 disable=not enabled, transient=False, console=None)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "_Bar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, name: str, done: int, total: int, info: str = "") -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, info="")
        self.progress.update(self.tasks[name], completed=done, total=total, info=info)

    def train_callback(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        info = " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
        self.update(stage, step, total, info)


def _fmt_metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """rows: name -> evaluate() result; a plain-text table (stable for tests and logs)."""
    head = f"{'bundle':<8} {'direction':<14} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'med.rank':>9}"
    lines = [head, "-" * len(head)]
    for name, res in rows.items():
        for direction in ("text_to_image", "image_to_text"):
            m = res[direction]
            lines.append(f"{name:<8} {direction:<14} {m['R@1']:>6.3f} {m['R@5']:>6.3f} {m['R@10']:>6.3f} "
                         f"{m['median_rank']:>9.1f}")
    return "\n".join(lines)


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("R@1", "R@5", "R@10", "median_rank", "mean_rank", "n_queries")
    return {d: {k: res[d][k] for k in keep if k in res[d]} for d in ("text_to_image", "image_to_text")} | {
        "n_images": res["n_images"], "n_texts": res["n_texts"]}


# ----------------------------------------------------------------------------- train / export


@app.command()
def train(
    data: Path = typer.Argument(..., help="Training pairs: CSV/TSV, JSONL, COCO JSON or a folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (resumed if it exists)."),
    val: Optional[Path] = typer.Option(None, help="Validation pairs (reported each epoch)."),
    config: Optional[Path] = typer.Option(None, help="TrainConfig as JSON (see mmedge/train/config.py)."),
    epochs: Optional[int] = typer.Option(None, help="Stage-2 epochs (overrides the config)."),
    stage1: Optional[bool] = typer.Option(None, "--stage1/--no-stage1", help="Autoencoder pre-training."),
    adversarial: Optional[bool] = typer.Option(None, "--adversarial/--no-adversarial",
                                               help="Modality discriminator in stage 2."),
    pca_dim: Optional[int] = typer.Option(None, help="Reduce embeddings to this many dimensions with PCA."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    skip_bad: bool = typer.Option(False, help="Skip (and count) bad dataset rows instead of failing."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the two towers: autoencoders, contrastive alignment, PCA."""
    _need_train()
    from mmedge.data import load_pairs
    from mmedge.train.config import TrainConfig
    from mmedge.train.pipeline import train as run_train

    cfg = TrainConfig()
    if config is not None:
        try:
            cfg = TrainConfig.from_dict(json.loads(config.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"{config}: cannot read config ({e})") from None
    if epochs is not None:
        cfg.stage2.epochs = epochs
    if stage1 is not None:
        cfg.stage1.enabled = stage1
    if adversarial is not None:
        cfg.stage2.adversarial = adversarial
    if pca_dim is not None:
        cfg.pca_dim = pca_dim
    if seed is not None:
        cfg.seed = seed
    pairs = load_pairs(data, skip_bad=skip_bad)
    if pairs.skipped:
        _err(f"skipped {len(pairs.skipped)} bad rows of {data} (first: {pairs.skipped[0][0]}: {pairs.skipped[0][1]})")
    val_pairs = load_pairs(val, skip_bad=skip_bad) if val is not None else None
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    with _Bar(progress and rank0) as bar:
        res = run_train(pairs, out, cfg, val_data=val_pairs, on_progress=bar.train_callback)
    if not rank0:
        return
    _out(f"trained {res.run_dir} in {res.metrics['timings']['total_s']:.0f} s: "
         + " ".join(f"{k}={v:.3f}" for k, v in res.metrics.items() if isinstance(v, float)))


@app.command()
def export(
    run: Path = typer.Argument(..., help="A finished training run folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    quantize: str = typer.Option("fp32", help="fp32 or int8."),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle."),
) -> None:
    """Export a run to a bundle (ONNX + tokenizer + manifest), checking parity with PyTorch."""
    _need_train()
    from mmedge.export.bundle import export as run_export

    res = run_export(run, out, quantize=quantize, overwrite=overwrite)
    par = res.manifest["parity"]
    _out(f"wrote {res.bundle_dir} ({quantize}); parity image mean cos {par['image']['mean_cosine']:.5f}, "
         f"text mean cos {par['text']['mean_cosine']:.5f}")


# ----------------------------------------------------------------------------- runtime commands


@app.command()
def verify(bundle: Path = typer.Argument(..., help="Bundle folder.")) -> None:
    """Check a bundle's checksums and golden vectors with this runtime."""
    from mmedge.runtime.bundle import Bundle, verify_golden

    b = Bundle.load(bundle)
    figs = verify_golden(b)
    _out(f"{bundle}: ok ({json.dumps(figs, sort_keys=True)})")


def _load_data(data: Path, skip_bad: bool):  # -> LoadResult
    from mmedge.data import load_pairs

    res = load_pairs(data, skip_bad=skip_bad)
    if res.skipped:
        _err(f"skipped {len(res.skipped)} bad rows of {data} (first: {res.skipped[0][0]}: {res.skipped[0][1]})")
    return res


@app.command("eval")
def eval_(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    data: Path = typer.Option(..., "--data", "-d", help="Pairs to evaluate on (any loader format)."),
    positive_column: Optional[str] = typer.Option(None, help="Rows sharing this column's value are positives."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads."),
    skip_bad: bool = typer.Option(False, help="Skip (and count) bad dataset rows."),
) -> None:
    """R@1/5/10 and median rank, text->image and image->text."""
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder
    from mmedge.runtime.evaluate import evaluate

    b = Bundle.load(bundle)
    pairs = _load_data(data, skip_bad)
    res = evaluate(ImageEncoder(b, threads=threads), TextEncoder(b, threads=threads), pairs.pairs, positive_column)
    if as_json:
        _out(json.dumps(_summary(res), indent=2))
    else:
        _out(_fmt_metrics_table({b.quantization.get("image", "?")[:8]: res}))


@index_app.command("build")
def index_build(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    data: Path = typer.Option(..., "--data", "-d", help="Pairs (CSV/JSONL/COCO) or a folder of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to create."),
    modality: str = typer.Option("image", help="What to index: image (the pictures) or text (the captions)."),
    overwrite: bool = typer.Option(False, help="Replace an existing index."),
    skip_bad: bool = typer.Option(False, help="Skip (and count) unreadable rows and images."),
    batch_size: int = typer.Option(256, help="Items encoded per batch."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    engine: str = typer.Option("local", help="local (this process) or ray (Ray Data actors; mmedge[ray])."),
    workers: int = typer.Option(2, help="Ray: embedding actors (one CPU each)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray: cluster address (default: start a local Ray)."),
) -> None:
    """Embed a dataset's images (or captions) and write a new index."""
    _check_batch_size(batch_size, modality)
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.index import Index

    if modality not in ("image", "text"):
        raise UsageError(f"--modality must be image or text, got {modality!r}")
    if engine not in ("local", "ray"):
        raise UsageError(f"--engine must be local or ray, got {engine!r}")
    b = Bundle.load(bundle)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists (use --overwrite to replace it)")
    pairs = _pairs_or_images(data, skip_bad)
    if engine == "ray":
        from mmedge.distributed.ray_index import build_index_ray

        with _Bar(progress) as bar:
            st = build_index_ray(bundle, pairs, out, modality=modality, workers=workers, batch_size=batch_size,
                                 address=ray_address, overwrite=overwrite, skip_bad=skip_bad,
                                 on_progress=lambda d, n: bar.update(f"embedding {modality}s (ray)", d, n))
        _out(f"indexed {st['embedded']} {modality}s into {out} with {workers} Ray workers "
             f"({st['per_second']:.0f}/s embedding)" + (f"; skipped {st['skipped_count']} unreadable"
                                                         if st["skipped_count"] else ""))
        return
    with _building(out, overwrite) as tmp, Index.create(tmp, dim=b.dim, fingerprint=b.fingerprint) as idx:
        added, skipped = _add_pairs(idx, b, pairs, modality, batch_size, threads, skip_bad, progress)
        idx.save()
    _out(f"indexed {added} {modality}s into {out}" + (f"; skipped {skipped} unreadable" if skipped else ""))


@index_app.command("add")
def index_add(
    index: Path = typer.Argument(..., help="Index folder."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="Bundle the index was built with."),
    data: Path = typer.Option(..., "--data", "-d", help="Pairs or a folder of images."),
    modality: str = typer.Option("image", help="image or text."),
    upsert: bool = typer.Option(False, help="Replace items whose key exists."),
    skip_bad: bool = typer.Option(False, help="Skip (and count) unreadable rows and images."),
    batch_size: int = typer.Option(256),
    threads: Optional[int] = typer.Option(None),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Add items to an existing index (atomic: all or nothing on disk)."""
    _check_batch_size(batch_size, modality)
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.index import Index

    if modality not in ("image", "text"):
        raise UsageError(f"--modality must be image or text, got {modality!r}")
    b = Bundle.load(bundle)
    with Index.open(index, fingerprint=b.fingerprint) as idx:  # closed unsaved on error: nothing changes
        pairs = _pairs_or_images(data, skip_bad)
        added, skipped = _add_pairs(idx, b, pairs, modality, batch_size, threads, skip_bad, progress, upsert)
        idx.save()
        total = len(idx)
    _out(f"added {added} {modality}s to {index}; {total} items" + (f"; skipped {skipped}" if skipped else ""))


@index_app.command("remove")
def index_remove(
    index: Path = typer.Argument(..., help="Index folder."),
    keys: list[str] = typer.Argument(..., help="Keys to remove."),
    missing_ok: bool = typer.Option(False, help="Ignore keys that are not in the index."),
) -> None:
    """Remove items by key."""
    from mmedge.runtime.index import Index

    with Index.open(index) as idx:
        n = idx.remove(keys, missing_ok=missing_ok)
        idx.save()
        left = len(idx)
    _out(f"removed {n} items from {index}; {left} left")


@index_app.command("info")
def index_info(
    index: Path = typer.Argument(..., help="Index folder."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show an index's parameters, size and consistency."""
    from mmedge.runtime.index import Index

    with Index.open(index, readonly=True) as idx:
        idx.check()
        info = idx.info()
    if as_json:
        _out(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            _out(f"{k}: {v}")


def _pairs_or_images(data: Path, skip_bad: bool):  # -> list[Pair]
    return _load_data(data, skip_bad).pairs


def _add_pairs(idx, bundle, pairs, modality: str, batch_size: int, threads: Optional[int], skip_bad: bool,
               progress: bool, upsert: bool = False) -> tuple[int, int]:
    """Encode pairs in batches and add them; returns (added, skipped)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np

    from mmedge.errors import ImageError, TextError
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder
    from mmedge.runtime.index import Item
    from mmedge.runtime.preprocess import load_uint8, normalize

    enc = ImageEncoder(bundle, threads=threads) if modality == "image" else TextEncoder(bundle, threads=threads)
    todo = []
    seen: set[str] = set()
    for p in pairs:
        if modality == "image":  # an image with several captions is indexed once, under its first key
            if str(p.image) in seen:
                continue
            seen.add(str(p.image))
        todo.append(p)
    added = skipped = 0
    cfg = bundle.preprocess

    def encode_and_add(ok: list, pixels: list) -> int:
        # runs in a worker thread while the main thread decodes the next batch: ONNX Runtime
        # and hnswlib release the GIL, decoding mostly holds it
        vecs = enc.encode_pixels(normalize(np.stack(pixels), cfg))
        idx.add([Item(key=p.key, modality=modality, path=str(p.image), caption=p.caption,
                      metadata=dict(p.extra)) for p in ok], vecs, upsert=upsert)
        return len(ok)

    pending: Optional[Future] = None
    with _Bar(progress) as bar, ThreadPoolExecutor(max_workers=1) as pool:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            if modality == "text":
                try:
                    ok, vecs = chunk, enc.encode([p.caption for p in chunk])
                except TextError:
                    if not skip_bad:
                        raise
                    ok = []
                    for p in chunk:  # find the bad captions one by one
                        try:
                            enc.encode([p.caption])
                            ok.append(p)
                        except TextError as e:
                            skipped += 1
                            _err(f"skipped {p.key}: {e}")
                    vecs = enc.encode([p.caption for p in ok]) if ok else None
            else:
                ok, arrays = [], []
                for p in chunk:
                    try:
                        arrays.append(load_uint8(p.image, cfg))
                        ok.append(p)
                    except ImageError as e:
                        if not skip_bad:
                            raise ImageError(f"{e} (--skip-bad skips unreadable images)") from e
                        skipped += 1
                        _err(f"skipped {p.image}: {e}")
                if pending is not None:
                    added += pending.result()
                    bar.update(f"indexing {modality}s", s, len(todo))
                pending = pool.submit(encode_and_add, ok, arrays) if ok else None
                continue
            if ok and vecs is not None:
                items = [Item(key=p.key, modality=modality, path=str(p.image), caption=p.caption,
                              metadata=dict(p.extra)) for p in ok]
                idx.add(items, vecs, upsert=upsert)
                added += len(items)
            bar.update(f"indexing {modality}s", min(s + batch_size, len(todo)), len(todo))
        if pending is not None:
            added += pending.result()
        bar.update(f"indexing {modality}s", len(todo), len(todo))
    return added, skipped


def _hit_dict(h: Any) -> dict[str, Any]:
    return {"key": h.key, "score": round(float(h.score), 6), "modality": h.modality, "path": h.path,
            "caption": h.caption, "metadata": h.metadata}


@app.command()
def query(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Query text."),
    image: Optional[Path] = typer.Option(None, "--image", help="Query image file."),
    k: int = typer.Option(10, "-k", help="How many results."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads."),
    provider: Optional[str] = typer.Option(None, help="ONNX Runtime provider: cpu, cuda, ... (default: best available)."),
) -> None:
    """Search an index with a text or an image."""
    # the same code as the console entry's typer-free path for plain query invocations
    from mmedge.cli.entry import run_query

    run_query(bundle, index, text, image, k, as_json, threads, provider, out=_out)


from mmedge.cli.bench import bench as _bench  # noqa: E402 - `mmedge bench`, in its own module

app.command("bench")(_bench)


# ----------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Path = typer.Option(Path("mmedge-demo"), "--out", "-o", help="Folder for data, run, bundles, report."),
    seed: int = typer.Option(0, help="Seed for data and training."),
    epochs: Optional[int] = typer.Option(None, help="Stage-2 epochs (default: the recipe's)."),
    n_train: int = typer.Option(10000, help="Synthetic training pairs."),
    n_test: int = typer.Option(1000, help="Synthetic test pairs."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Generate data, train, export fp32 and int8, index, query, and evaluate."""
    _need_train()
    import time

    from mmedge.cli.demo import run_demo

    t0 = time.perf_counter()
    with _Bar(progress) as bar:
        report = run_demo(out, seed=seed, epochs=epochs, n_train=n_train, n_test=n_test,
                          on_train=bar.train_callback, on_step=lambda name, d, t: bar.update(name, d, t))
    _out("")
    _out("sample queries (int8 bundle):")
    for q in report["samples"]:
        _out(f"  {q['query']!r} ->")
        for h in q["hits"][:3]:
            _out(f"      {h['score']:.3f}  {h['label']}")
    _out("")
    _out(_fmt_metrics_table({k: report[k] for k in ("fp32", "int8")}))
    _out("")
    _out(f"report: {out / 'report.json'}  ({time.perf_counter() - t0:.0f} s)")


# ----------------------------------------------------------------------------- viz

from mmedge.cli.viz import viz as _viz  # noqa: E402 - the command lives in its own module

app.command("viz")(_viz)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning library errors into one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MMEDGE_DEBUG", "") not in ("", "0")
    if "--debug" in args:
        args.remove("--debug")
        debug = True
    try:
        app(args=args, prog_name="mmedge", standalone_mode=False)
    except MmedgeError as e:
        if debug:
            raise
        _err(f"error: {e}")
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors (typer may vendor its own click) and the unexpected
        if type(e).__name__ == "Abort":
            _err("aborted")
            sys.exit(1)
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            # click's usage errors (unknown flag, bad value, missing argument): one line
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            if e.format_message():  # empty when click has printed the help instead
                _err(f"error: {e.format_message()}{hint}")
            sys.exit(e.exit_code)
        if debug:
            raise
        _err(f"error: {e.__class__.__name__}: {e} (run with --debug for the traceback)")
        sys.exit(1)

if __name__ == "__main__":
    main()
