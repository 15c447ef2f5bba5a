"""The emoji retrieval data for the quality benchmark: protocol CSVs, alternative texts,
positives as the dataset README defines them.

The dataset folder (``../shared/data/emoji`` beside the checkout, read-only) is read with
the standard library for its side tables (``emoji.csv``, ``tags.csv``, ``names.csv``,
``identical_images.csv``) and ``captions.csv`` is written out per protocol as a user's CSV
would be (``filepath,caption`` + extra columns, absolute image paths), then read back with
:func:`mmedge.data.load_pairs`.

Protocols (README, "Benchmark protocols"):

* ``style`` (unseen-style): train on vendor twitter, every split; test on vendor google.
* ``concept`` (unseen-concept): train on ``split=train`` (both vendors); test on ``split=test``.
* ``val``: for choosing hyper-parameters without touching either test set: twitter images
  of ``split=train`` emoji only, 20 % of their base emoji (by a hash of ``base_id``) held
  out as validation concepts. No google image and no ``split=test`` emoji is used.

Galleries and positives: text->image queries are the distinct captions of the test rows,
the gallery is the test images, positives are all images of the caption's emoji_id;
image->text queries are the test images against the distinct captions, one positive each.
Byte-identical images of one vendor (``identical_images.csv``) count as equivalent: an
image identical to a positive is a positive too, and an image's positives include the
captions of the emoji drawn identically.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmedge.data import LoadResult, Pair, load_pairs

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emoji"
PROTOCOLS = ("style", "concept")
COLUMNS = ["filepath", "caption", "emoji_id", "base_id", "vendor", "group", "subgroup", "split", "alt_captions"]


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _val_holdout(base_id: str, percent: int = 20) -> bool:
    return int.from_bytes(hashlib.sha256(f"val:{base_id}".encode()).digest()[:8], "big") % 100 < percent


TAGS_PER_TEXT = 4


def alt_texts(root: Path) -> dict[str, list[str]]:
    """emoji_id -> alternative texts: the Unicode-style name, the short names and the CLDR
    keywords (in groups of ``TAGS_PER_TEXT``), lower case. Skin-tone variants inherit names and keywords from their base
    emoji, so their tone (the part of the caption after ': ') is appended to each, else
    one text would describe five different images."""
    meta = {r["emoji_id"]: r for r in _read(root / "emoji.csv")}
    tags = {r["emoji_id"]: r["tags"] for r in _read(root / "tags.csv")}
    names = {r["emoji_id"]: r for r in _read(root / "names.csv")}
    out: dict[str, list[str]] = {}
    for eid, m in meta.items():
        suffix = ""
        if m["skin_tones"] and ": " in m["caption"]:
            suffix = ": " + m["caption"].split(": ", 1)[1]
        texts = []
        n = names.get(eid)
        if n:
            base_name = n["name"].split(": SKIN-TONE")[0] if suffix else n["name"]
            texts.append(base_name.lower() + suffix)
            shorts = [s.split("::")[0].replace("_", " ") for s in n["short_names"].split("|") if s]
            shorts = list(dict.fromkeys(shorts))
            if shorts:
                texts.append(", ".join(shorts) + suffix)
        words = [w for w in tags.get(eid, "").split("|") if w]
        for i in range(0, len(words), TAGS_PER_TEXT):  # short texts: cheaper and more varied
            texts.append(", ".join(words[i : i + TAGS_PER_TEXT]) + suffix)
        out[eid] = [x for x in dict.fromkeys(texts) if x and x != m["caption"]]
    return out


def write_protocol_csvs(out: Path, root: Path = DEFAULT_ROOT, max_rows: int | None = None,
                        seed: int = 0) -> dict[str, Path]:
    """Write ``{style,concept,val}_{train,test}.csv`` under ``out``; returns name -> path.
    ``max_rows`` keeps a random subset of each (for smoke runs)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = _read(root / "captions.csv")
    meta = {r["emoji_id"]: r for r in _read(root / "emoji.csv")}
    alts = alt_texts(root)
    for r in rows:
        r["filepath"] = str((root / r["filepath"]).resolve())
        r["base_id"] = meta[r["emoji_id"]]["base_id"]
        r["alt_captions"] = "|".join(alts.get(r["emoji_id"], []))
    sel = {
        "style_train": [r for r in rows if r["vendor"] == "twitter"],
        "style_test": [r for r in rows if r["vendor"] == "google"],
        "concept_train": [r for r in rows if r["split"] == "train"],
        "concept_test": [r for r in rows if r["split"] == "test"],
        "val_train": [r for r in rows if r["vendor"] == "twitter" and r["split"] == "train"
                      and not _val_holdout(r["base_id"])],
        "val_test": [r for r in rows if r["vendor"] == "twitter" and r["split"] == "train"
                     and _val_holdout(r["base_id"])],
        # artwork-style transfer on seen concepts without any protocol's test image as a query:
        # train on google artwork of the val training concepts, evaluate on their twitter artwork
        "valstyle_train": [r for r in rows if r["vendor"] == "google" and r["split"] == "train"
                           and not _val_holdout(r["base_id"])],
        "valstyle_test": [r for r in rows if r["vendor"] == "twitter" and r["split"] == "train"
                          and not _val_holdout(r["base_id"])],
    }
    # held-out concepts with both artwork styles in training, as in the unseen-concept protocol:
    # both vendors' images of the val training concepts; queries are the twitter val concepts
    sel["val2_train"] = sel["val_train"] + sel["valstyle_train"]
    sel["val2_test"] = sel["val_test"]
    paths = {}
    for name, rs in sel.items():
        if max_rows is not None and len(rs) > max_rows:
            keep = set(random.Random(f"{seed}:{name}").sample(range(len(rs)), max_rows))
            rs = [r for i, r in enumerate(rs) if i in keep]
        p = out / f"{name}.csv"
        with p.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rs)
        paths[name] = p
    return paths


def identical_sets(root: Path = DEFAULT_ROOT) -> dict[tuple[str, str], str]:
    """(vendor, emoji_id) -> duplicate-set id, for images byte-identical to another emoji's."""
    return {(r["vendor"], r["emoji_id"]): f"{r['vendor']}:{r['duplicate_set']}"
            for r in _read(root / "identical_images.csv")}


@dataclass
class EvalSpec:
    """Galleries and positives of one test set (indices into ``images`` and ``texts``)."""

    images: list[Path]
    texts: list[str]
    t2i: list[set[int]] = field(default_factory=list)
    i2t: list[set[int]] = field(default_factory=list)
    image_rows: list[Pair] = field(default_factory=list)


def eval_spec(pairs: LoadResult | list[Pair], root: Path = DEFAULT_ROOT) -> EvalSpec:
    rows = pairs.pairs if isinstance(pairs, LoadResult) else pairs
    dup = identical_sets(root) if (root / "identical_images.csv").exists() else {}
    images: list[Path] = []
    image_rows: list[Pair] = []
    img_of: dict[str, int] = {}
    texts: list[str] = []
    text_of: dict[str, int] = {}
    emoji_images: dict[str, set[int]] = defaultdict(set)
    emoji_text: dict[str, int] = {}
    for p in rows:
        i = img_of.get(str(p.image))
        if i is None:
            i = img_of[str(p.image)] = len(images)
            images.append(p.image)
            image_rows.append(p)
        t = text_of.setdefault(p.caption, len(texts))
        if t == len(texts):
            texts.append(p.caption)
        eid = p.extra["emoji_id"]
        emoji_images[eid].add(i)
        emoji_text[eid] = t
    # equivalence classes of images: identical artwork within a vendor
    same: dict[int, set[int]] = {}
    by_set: dict[str, set[int]] = defaultdict(set)
    for i, p in enumerate(image_rows):
        d = dup.get((p.extra.get("vendor", ""), p.extra["emoji_id"]))
        if d:
            by_set[d].add(i)
    for members in by_set.values():
        for i in members:
            same[i] = members
    spec = EvalSpec(images, texts, image_rows=image_rows)
    text_emoji = {t: e for e, t in emoji_text.items()}
    for t in range(len(texts)):
        pos = set(emoji_images[text_emoji[t]])
        for i in list(pos):
            pos |= same.get(i, set())
        spec.t2i.append(pos)
    for i, p in enumerate(image_rows):
        spec.i2t.append({emoji_text[image_rows[j].extra["emoji_id"]] for j in same.get(i, {i})})
    return spec


def metrics(img_emb: np.ndarray, txt_emb: np.ndarray, spec: EvalSpec) -> dict[str, dict[str, float]]:
    """R@1/5/10, median and mean rank both ways, with mmedge's own metric code."""
    from mmedge.runtime.metrics import retrieval_metrics

    return {"text_to_image": retrieval_metrics(txt_emb, img_emb, spec.t2i),
            "image_to_text": retrieval_metrics(img_emb, txt_emb, spec.i2t)}


def load(path: Path) -> LoadResult:
    return load_pairs(path)
