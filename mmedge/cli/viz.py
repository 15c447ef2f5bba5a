"""``mmedge viz BUNDLE --data DATA --out map.png``: a 2-D map of a dataset's image and
text embeddings, to see whether the two modalities are aligned.

Images and captions are embedded with the bundle through the runtime encoders, projected
together to two dimensions (PCA, t-SNE or UMAP) and drawn with one marker per modality
(circles: images, triangles: texts) and one colour per group (a data column such as
``group``); thin lines join a sample of images to their captions. Needs the ``viz`` extra
(matplotlib, scikit-learn); UMAP also needs ``umap-learn``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from mmedge.errors import MissingDependencyError, UsageError

METHODS = ("pca", "tsne", "umap")
VIZ_HINT = "pip install 'mmedge[viz]'"
MAX_GROUPS = 12  # colours; the rarer groups are drawn as "other"


def _need(module: str, hint: str = VIZ_HINT) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"mmedge viz needs {module.split('.')[0]}: {hint}") from None


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with PCA (numpy), t-SNE (scikit-learn) or UMAP (umap-learn)."""
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        raise UsageError(f"need at least 3 points to draw a map, got {len(x)}")
    if method == "pca":
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        return xc @ vt[:2].T
    if method == "tsne":
        manifold = _need("sklearn.manifold")
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
        return manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                             metric="cosine").fit_transform(x)
    umap = _need("umap", "pip install umap-learn")
    return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(x)


def draw_map(
    img_emb: np.ndarray,
    txt_emb: np.ndarray,
    img_groups: Sequence[str],
    txt_groups: Sequence[str],
    links: Sequence[tuple[int, int]],
    out: Path,
    method: str = "pca",
    title: str = "",
    seed: int = 0,
    max_links: int = 150,
) -> dict[str, Any]:
    """Draw the map to ``out`` (PNG); returns figures describing the alignment."""
    _need("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xy = project_2d(np.concatenate([img_emb, txt_emb]), method, seed)
    ixy, txy = xy[: len(img_emb)], xy[len(img_emb):]
    counts = Counter(list(img_groups) + list(txt_groups))
    top = [g for g, _ in counts.most_common(MAX_GROUPS if len(counts) <= MAX_GROUPS else MAX_GROUPS - 1)]
    palette = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
        "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939",
    ]
    colour = {g: palette[i % len(palette)] for i, g in enumerate(top)}
    other = "#cccccc"

    fig = Figure(figsize=(9, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rng = random.Random(seed)
    shown = rng.sample(list(links), min(max_links, len(links)))
    for i, t in shown:
        ax.plot([ixy[i, 0], txy[t, 0]], [ixy[i, 1], txy[t, 1]], color="#999999", lw=0.4, alpha=0.5, zorder=1)
    ax.scatter(ixy[:, 0], ixy[:, 1], s=10, marker="o", c=[colour.get(g, other) for g in img_groups],
               alpha=0.75, linewidths=0, zorder=2)
    ax.scatter(txy[:, 0], txy[:, 1], s=16, marker="^", c=[colour.get(g, other) for g in txt_groups],
               alpha=0.75, linewidths=0.3, edgecolors="k", zorder=3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color="#555555", label="image"),
               Line2D([], [], marker="^", ls="", color="#555555", markeredgecolor="k", label="text")]
    handles += [Line2D([], [], marker="s", ls="", color=colour[g], label=str(g)[:28]) for g in top]
    if len(counts) > len(top):
        handles.append(Line2D([], [], marker="s", ls="", color=other, label="other"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    gap = float(np.linalg.norm(img_emb.mean(0) - txt_emb.mean(0)))
    paired = float(np.mean([img_emb[i] @ txt_emb[t] for i, t in links])) if links else float("nan")
    ax.set_title(f"{title}\n{method.upper()} of {len(img_emb)} images and {len(txt_emb)} texts; "
                 f"modality gap {gap:.3f}, mean paired cosine {paired:.3f}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return {"images": int(len(img_emb)), "texts": int(len(txt_emb)), "method": method,
            "modality_gap": gap, "mean_paired_cosine": paired, "groups": len(counts)}


def viz(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    data: Path = typer.Option(..., "--data", "-d", help="Pairs to draw (any loader format)."),
    out: Path = typer.Option(Path("map.png"), "--out", "-o", help="PNG file to write."),
    method: str = typer.Option("pca", help="2-D projection: pca, tsne or umap."),
    color_column: Optional[str] = typer.Option("group", help="Data column that colours the points "
                                               "(when absent, points are coloured by modality)."),
    max_points: int = typer.Option(1500, help="Most pairs drawn (a random sample of the data)."),
    seed: int = typer.Option(0, help="Sampling and projection seed."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads."),
    skip_bad: bool = typer.Option(False, help="Skip (and count) bad dataset rows."),
) -> None:
    """Draw a 2-D map of image and text embeddings, coloured by modality and group."""
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if max_points < 3:
        raise UsageError(f"--max-points must be at least 3, got {max_points}")
    _need("matplotlib")
    if method == "tsne":
        _need("sklearn")
    from mmedge.data import load_pairs
    from mmedge.runtime.bundle import Bundle
    from mmedge.runtime.encoders import ImageEncoder, TextEncoder

    b = Bundle.load(bundle)
    res = load_pairs(data, skip_bad=skip_bad)
    pairs = res.pairs
    if len(pairs) > max_points:
        pairs = random.Random(seed).sample(pairs, max_points)
    use_col = color_column if color_column and all(color_column in p.extra for p in pairs) else None
    img_index: dict[str, int] = {}
    txt_index: dict[str, int] = {}
    img_groups: list[str] = []
    txt_groups: list[str] = []
    links: list[tuple[int, int]] = []
    for p in pairs:
        g = p.extra[use_col] if use_col else ""
        i = img_index.get(str(p.image))
        if i is None:
            i = img_index[str(p.image)] = len(img_index)
            img_groups.append(g if use_col else "image")
        t = txt_index.get(p.caption)
        if t is None:
            t = txt_index[p.caption] = len(txt_index)
            txt_groups.append(g if use_col else "text")
        links.append((i, t))
    img = ImageEncoder(b, threads=threads).encode(list(img_index))
    txt = TextEncoder(b, threads=threads).encode(list(txt_index))
    title = f"{bundle.name}: {data.name}" + (f", colour = {use_col}" if use_col else "")
    figs = draw_map(img, txt, img_groups, txt_groups, links, out, method=method, title=title, seed=seed)
    typer.echo(f"wrote {out}: {figs['images']} images, {figs['texts']} texts, {method}; "
               f"modality gap {figs['modality_gap']:.3f}, mean paired cosine {figs['mean_paired_cosine']:.3f}")
