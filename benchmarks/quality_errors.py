"""Where a bundle's text->image misses come from, on one protocol of the emoji data.

    python benchmarks/quality_errors.py BUNDLE --protocol style [--data ../shared/data/emoji]

Encodes the protocol's test images and captions through the runtime (as quality.py does) and
reports text->image R@10 three ways: exact (the emoji itself, as quality.md counts it), by
family (any image of the same base emoji, i.e. skin tones confused), and within a family
(is the right tone first among its family's images), R@10 of queries with and without a word
that no training text contains, then R@10 per Unicode group. Prints
markdown; writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data as qd  # noqa: E402

from mmedge.errors import MmedgeError  # noqa: E402
from mmedge.runtime.encoders import ImageEncoder, TextEncoder  # noqa: E402


def _words(text: str) -> set[str]:
    return set(re.findall(r"[^\W_]+", text.lower()))


def analyse(bundle: Path, rows: list[dict[str, str]], train_rows: list[dict[str, str]]) -> dict[str, object]:
    ids = [r["emoji_id"] for r in rows]
    captions: dict[str, str] = {}
    for r in rows:
        captions.setdefault(r["emoji_id"], r["caption"])
    qids = list(captions)
    base_of = {r["emoji_id"]: r["base_id"] for r in rows}
    group_of = {r["emoji_id"]: r["group"] for r in rows}
    img = ImageEncoder(bundle).encode([r["filepath"] for r in rows])
    txt = TextEncoder(bundle).encode([captions[q] for q in qids])
    sims = txt @ img.T  # (queries, images)
    img_id = np.array(ids)
    img_base = np.array([base_of[i] for i in ids])
    exact, family, first_in_family, fam_sizes = [], [], [], []
    for qi, q in enumerate(qids):
        s = sims[qi]
        pos = img_id == q
        fam = img_base == base_of[q]
        exact.append(int((s[~pos] > s[pos].max()).sum()))
        family.append(int((s[~fam] > s[fam].max()).sum()))
        if fam.sum() > pos.sum():
            first_in_family.append(bool(s[fam & ~pos].max() < s[pos].max()))
            fam_sizes.append(int(fam.sum() / max(1, pos.sum())))
    exact_a, family_a = np.array(exact), np.array(family)
    # words of the training texts (captions and alternative texts): a query with a word outside
    # them names something the model never read about (a new animal, a new country's flag)
    seen: set[str] = set()
    for r in train_rows:
        seen |= _words(r["caption"]) | _words(r.get("alt_captions", ""))
    new_word = np.array([bool(_words(captions[q]) - seen) for q in qids])
    groups: dict[str, list[int]] = {}
    for qi, q in enumerate(qids):
        groups.setdefault(group_of[q], []).append(qi)
    return {
        "queries": len(qids), "images": len(rows),
        "r10": float((exact_a < 10).mean()), "family_r10": float((family_a < 10).mean()),
        "right_tone_first": float(np.mean(first_in_family)) if first_in_family else None,
        "chance_tone_first": float(np.mean([1 / n for n in fam_sizes])) if fam_sizes else None,
        "new_word_share": float(new_word.mean()),
        "r10_all_words_seen": float((exact_a[~new_word] < 10).mean()) if (~new_word).any() else None,
        "r10_new_word": float((exact_a[new_word] < 10).mean()) if new_word.any() else None,
        "groups": {g: (len(v), float((exact_a[v] < 10).mean()), float((family_a[v] < 10).mean()))
                   for g, v in sorted(groups.items())},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--protocol", choices=["style", "concept"], required=True)
    ap.add_argument("--data", type=Path, default=qd.DEFAULT_ROOT)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmedge-quality-errors"))
    args = ap.parse_args()
    if not (args.data / "captions.csv").is_file():
        print(f"error: {args.data} is not the emoji dataset folder (no captions.csv)", file=sys.stderr)
        return 2
    csvs = qd.write_protocol_csvs(args.work, args.data)
    with open(csvs[f"{args.protocol}_test"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(csvs[f"{args.protocol}_train"], newline="", encoding="utf-8") as f:
        train_rows = list(csv.DictReader(f))
    try:
        res = analyse(args.bundle, rows, train_rows)
    except MmedgeError as exc:  # a bad bundle or image: one line, nothing written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# text->image misses of {args.bundle} ({args.protocol} protocol)\n")
    print(f"{res['queries']} caption queries against {res['images']} images.\n")
    print(f"- R@10, the emoji itself: {res['r10']:.3f}")
    print(f"- R@10, any image of the same base emoji (tone confusions forgiven): {res['family_r10']:.3f}")
    if res["right_tone_first"] is not None:
        print(f"- queries with tone variants: the right one ranked first within its family "
              f"{res['right_tone_first']:.3f} (chance {res['chance_tone_first']:.3f})")
    if res["r10_new_word"] is not None:
        seen_r = res["r10_all_words_seen"]
        print(f"- queries with a word that no training caption or alternative text contains: "
              f"{res['new_word_share']:.1%}, R@10 {res['r10_new_word']:.3f}; the others R@10 "
              + (f"{seen_r:.3f}" if seen_r is not None else "-"))
    print("\n| group | queries | R@10 | family R@10 |\n| --- | ---: | ---: | ---: |")
    for g, (n, r, fr) in res["groups"].items():  # type: ignore[union-attr]
        print(f"| {g} | {n} | {r:.3f} | {fr:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
