"""Hyper-parameter experiments of the training recipe, on a validation split only.

The split (``val`` in quality_data.py): twitter images of ``split=train`` emoji; 20 % of
their base emoji (by a hash of ``base_id``) are held out as validation concepts (617 pairs),
the rest (2426 pairs) train. No google image and no ``split=test`` emoji is used, so neither
protocol's test set is touched. Scores: exact R@K of the PyTorch embeddings (one positive each) on the held-out concepts,
and ("fit") on the training pairs themselves: unseen-style asks the model to know every
training concept in a new artwork, which it cannot do for concepts it has not even fitted.

    python benchmarks/quality_val.py --out /tmp/val [--only NAME ...]      # the full-pair runs
    python benchmarks/quality_val.py --out /tmp/val --low [--only NAME ...] # the 10 %-pair runs

Each experiment is a name and a list of ``section.field=value`` overrides of ``TrainConfig()``.
Results are appended to ``OUT/val.jsonl``; docs/RECIPE.md lists what they gave.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality_data as qd  # noqa: E402

LEGACY = ["image.arch=conv4", "image.width=16", "image.blocks=1", "stage2.multi_positive=0", "stage2.alt_prob=0",
          "stage2.aug_scale=0", "stage2.aug_translate=0", "stage2.aug_rotate=0", "stage2.aug_blur=0"]
AUG1 = ["stage2.aug_scale=0.15", "stage2.aug_translate=0.08", "stage2.aug_rotate=10", "stage2.aug_blur=0.2"]
ALT = ["stage2.multi_positive=1", "stage2.alt_prob=0.3"]
PATCH16 = ["image.arch=patchres", "image.width=16", "image.blocks=0"]

# (name, overrides): the order they were run in while choosing the recipe; the first ones ran
# with batch 256 (the default then)
B256 = ["stage2.batch_size=256"]
EXPERIMENTS: list[tuple[str, list[str]]] = [
    ("legacy-8ep-stage1", B256 + LEGACY + ["stage2.epochs=8", "stage1.enabled=1", "stage1.image_epochs=1",
                                    "stage1.text_epochs=2"]),
    ("legacy-8ep", B256 + LEGACY + ["stage2.epochs=8"]),
    ("legacy-30ep", B256 + LEGACY + ["stage2.epochs=30"]),
    ("legacy-30ep-aug", B256 + LEGACY + ["stage2.epochs=30"] + AUG1),
    ("legacy-30ep-aug-alt", B256 + LEGACY + ["stage2.epochs=30"] + AUG1 + ALT),
    ("patchres32-30ep-aug-alt", B256 + LEGACY + ["stage2.epochs=30"] + AUG1 + ALT + ["image.arch=patchres", "image.width=32"]),
    ("patchres32both-30ep-aug-alt", B256 + LEGACY + ["stage2.epochs=30"] + AUG1 + ALT
     + ["image.arch=patchres", "image.width=32", "image.pool=both"]),
    ("patch16-30ep-aug-alt", B256 + LEGACY + ["stage2.epochs=30"] + AUG1 + ALT + PATCH16),
    ("legacy-30ep-aug-alt-stage1", B256 + LEGACY + ["stage2.epochs=30"] + AUG1 + ALT
     + ["stage1.enabled=1", "stage1.image_epochs=1", "stage1.text_epochs=2"]),
    ("legacy-30ep-aug-alt-textdrop", B256 + LEGACY + ["stage2.epochs=30"] + AUG1 + ALT + ["stage2.text_drop=0.1"]),
    ("patch16-20ep", B256 + PATCH16 + AUG1 + ALT + ["stage2.epochs=20"]),
    ("patch16-20ep-stage1", B256 + PATCH16 + AUG1 + ALT + ["stage2.epochs=20", "stage1.enabled=1",
                                                    "stage1.image_epochs=1", "stage1.text_epochs=2"]),
    ("patch16-20ep-hardneg", B256 + PATCH16 + AUG1 + ALT + ["stage2.epochs=20", "stage2.hard_negative_beta=0.5"]),
    ("patch16-20ep-strongaug", B256 + PATCH16 + ALT + ["stage2.epochs=20"]),  # TrainConfig()'s augmentation
    ("patch16-20ep-alt0.6", B256 + PATCH16 + AUG1 + ["stage2.multi_positive=1", "stage2.alt_prob=0.6", "stage2.epochs=20"]),
    ("patch16-30ep", B256 + PATCH16 + AUG1 + ALT + ["stage2.epochs=30"]),
    # after the first full benchmark run: the 20-epoch, batch-256 recipe fitted only 0.68 R@10
    # of its own (style) training pairs; the fit on the val training pairs is reported from here on
    ("patch16-20ep-vocab1500", B256 + PATCH16 + ALT + ["stage2.epochs=20", "text.tokenizer_vocab=1500"]),
    ("patch16-20ep-batch64", PATCH16 + ALT + ["stage2.epochs=20", "stage2.batch_size=64"]),
    ("conv4-20ep-batch64", ALT + ["image.arch=conv4", "image.width=16", "stage2.epochs=20", "stage2.batch_size=64"]),
    ("patch16-30ep-batch128", PATCH16 + ALT + ["stage2.epochs=30", "stage2.batch_size=128"]),  # TrainConfig() until conv4w32 below
    # wider / deeper image towers with more optimiser steps
    ("conv4w32-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "stage2.epochs=30",
                                     "stage2.batch_size=64"]),  # TrainConfig() from here on
    ("patch16b1-30ep-batch64", PATCH16[:2] + ALT + ["image.blocks=1", "stage2.epochs=30", "stage2.batch_size=64"]),
    ("conv4w48-30ep-batch64", ALT + ["image.arch=conv4", "image.width=48", "stage2.epochs=30", "stage2.batch_size=64"]),
    ("conv4w32-text128-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "text.width=128", "stage2.epochs=30",
                                             "stage2.batch_size=64"]),
    # position-free pooling (artwork styles place the same parts differently)
    ("conv4w32mean-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "image.pool=mean", "stage2.epochs=30",
                                         "stage2.batch_size=64"]),
    ("conv4w32both-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "image.pool=both", "stage2.epochs=30",
                                         "stage2.batch_size=64"]),
    # lower input resolution (fine artwork detail is style, coarse colour layout is content)
    ("conv4w32-32px-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "image.image_size=32",
                                          "stage2.epochs=30", "stage2.batch_size=64"]),
    ("conv4w32-48px-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "image.image_size=48",
                                          "stage2.epochs=30", "stage2.batch_size=64"]),
    # regularisation against memorising one artwork style
    ("conv4w32-strongaug-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "stage2.aug_scale=0.35",
                                               "stage2.aug_translate=0.15", "stage2.aug_rotate=25", "stage2.aug_blur=0.5",
                                               "stage2.epochs=30", "stage2.batch_size=64"]),
    ("conv4w32-wd0.3-30ep-batch64", ALT + ["image.arch=conv4", "image.width=32", "stage2.weight_decay=0.3",
                                           "stage2.epochs=30", "stage2.batch_size=64"]),
    # style augmentation (shading ramps, outlines, colour scaling) and MixStyle, against the
    # style gap (checked with --split valstyle first, then --split val)
    ("conv4w32-styleaug", ["stage2.aug_shade=0.5", "stage2.aug_outline=0.3", "stage2.aug_color=0.5"]),
    ("conv4w32-mixstyle", ["image.mixstyle=0.5"]),
    ("conv4w32-styleaug-mixstyle", ["stage2.aug_shade=0.5", "stage2.aug_outline=0.3", "stage2.aug_color=0.5",
                                    "image.mixstyle=0.5"]),
    ("conv4w32-styleaug-mixstyle-60ep", ["stage2.aug_shade=0.5", "stage2.aug_outline=0.3", "stage2.aug_color=0.5",
                                         "image.mixstyle=0.5", "stage2.epochs=60"]),
    ("conv4w32-60ep", ["stage2.epochs=60"]),
    ("conv4w32-styleaug-mixstyle-ema", ["stage2.aug_shade=0.5", "stage2.aug_outline=0.3", "stage2.aug_color=0.5",
                                        "image.mixstyle=0.5", "stage2.ema=0.995"]),
    ("conv4w32-styleaug+-mixstyle", ["stage2.aug_shade=0.8", "stage2.aug_outline=0.5", "stage2.aug_color=0.8",
                                     "image.mixstyle=0.8"]),
]

# The experiments above ran when TrainConfig() trained 30 epochs without style augmentation or
# MixStyle; they keep those settings, so each name still means what it measured then.
BEFORE_STYLE = ["stage2.epochs=30", "stage2.aug_shade=0", "stage2.aug_outline=0", "stage2.aug_color=0",
                "image.mixstyle=0"]
EXPERIMENTS = [(name, BEFORE_STYLE + ov) for name, ov in EXPERIMENTS]
EXPERIMENTS.append(("default", []))  # TrainConfig() as it is now
# variants of the 60-epoch default (TrainConfig() until default-120ep below won; "default" in these
# names is that recipe, which the overrides below pin)
EPOCHS60 = ["stage2.epochs=60"]
EXPERIMENTS += [(name, EPOCHS60 + ov) for name, ov in [
    ("default-nomixstyle", ["image.mixstyle=0"]),
    ("default-ema", ["stage2.ema=0.998"]),
    ("default-90ep", ["stage2.epochs=90"]),
    ("default-ibn", ["image.ibn=true"]),
    ("default-gray0.2", ["stage2.aug_gray=0.2"]),
    ("default-randconv0.3", ["stage2.aug_randconv=0.3"]),
    ("default-seed1", ["seed=1"]),
    ("default-textbow", ["text.arch=bow"]),
    ("default-textbow-w192", ["text.arch=bow", "text.width=192"]),
    ("default-textbow-seed1", ["text.arch=bow", "seed=1"]),  # the default again with another seed: the noise of one run
    # geometric augmentation against "the same object drawn otherwise": a smooth local warp,
    # and random erasing of a part
    ("default-elastic0.5", ["stage2.aug_elastic=0.5"]),
    ("default-erase0.3", ["stage2.aug_erase=0.3"]),
    # more compute: a residual conv at the 8x8 and 4x4 grids (1.9x the multiply-adds), or 120 epochs
    ("default-extra2", ["image.extra_convs=2"]),
]]
# longer training, and the 120-epoch recipe that won (TrainConfig() from here on)
EXPERIMENTS += [
    ("default-120ep", ["stage2.epochs=120"]),
    ("default-120ep-seed1", ["stage2.epochs=120", "seed=1"]),
    ("default-240ep", ["stage2.epochs=240"]),  # does doubling again still pay?
]

# 10 % of the val training pairs as pairs, everything else unpaired; (c) vs (d) vs (e) with
# variants of stage 1 (the towers come from one stage-1 run on all val training data)
LOW_BASE = BEFORE_STYLE + ["stage2.batch_size=256"] + PATCH16 + AUG1 + ALT + ["stage2.epochs=60"]
LOW_EXPERIMENTS: list[tuple[str, list[str], str]] = [
    ("stage1-1/2ep", ["stage1.image_epochs=1", "stage1.text_epochs=2"], "cde"),
    ("stage1-1/2ep-ccaheads", ["stage1.image_epochs=1", "stage1.text_epochs=2", "stage2.head_init=cca"], "d"),
    ("stage1-image-only-20ep", ["stage1.image_epochs=20", "stage1.text_epochs=0"], "d"),
    ("stage1-20/10ep", ["stage1.image_epochs=20", "stage1.text_epochs=10"], "d"),
    ("stage1-20/10ep-lr0.2", ["stage1.image_epochs=20", "stage1.text_epochs=10", "stage2.pretrained_lr_mult=0.2"], "d"),
    ("stage1-20/10ep-ccaheads", ["stage1.image_epochs=20", "stage1.text_epochs=10", "stage2.head_init=cca"], "de"),
    ("stage1-text-only-10ep", ["stage1.image_epochs=0", "stage1.text_epochs=10"], "d"),
]


def set_field(cfg: Any, path: str, value: str) -> None:
    obj = cfg
    parts = path.split(".")
    for a in parts[:-1]:
        obj = getattr(obj, a)
    cur = getattr(obj, parts[-1])
    if isinstance(cur, bool):
        v: Any = value.lower() in ("1", "true")
    elif cur is None:
        v = int(value)
    else:
        v = type(cur)(value)
    setattr(obj, parts[-1], v)


def config(overrides: list[str], threads: int, seed: int = 0):
    from mmedge.train.config import TrainConfig

    cfg = TrainConfig(threads=threads, seed=seed)
    for o in overrides:
        k, v = o.split("=", 1)
        set_field(cfg, k, v)
    return cfg


def evaluate(run: Path, test_csv: Path) -> dict[str, Any]:
    import torch

    from mmedge.runtime.tokenizer import TextTokenizer
    from mmedge.train import pipeline as P

    model, cfg, pcfg, tok = P.load_run(run)
    tz = TextTokenizer(tok, max_length=cfg.text.max_length, pad_id=0)
    spec = qd.eval_spec(qd.load(test_csv))
    px = P.load_images_uint8(spec.images, pcfg)
    ids, mask = P.tokenize_all(tz, spec.texts)
    with torch.no_grad():
        ie = torch.cat([model.encode_image(P._normalize(px[s : s + 512], pcfg)) for s in range(0, len(px), 512)])
        te = torch.cat([model.encode_text(*P._trim(ids[s : s + 512], mask[s : s + 512]))
                        for s in range(0, len(ids), 512)])
    m = qd.metrics(ie.numpy(), te.numpy(), spec)
    return {d: {k: round(m[d][k], 3) for k in ("R@1", "R@5", "R@10", "median_rank")} for d in m}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=qd.DEFAULT_ROOT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--low", action="store_true", help="the 10 %%-pair experiments")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--track", action="store_true",
                    help="also score the held-out pairs after every stage-2 epoch (paired R@10, logged as 'curve')")
    ap.add_argument("--split", choices=["val", "valstyle", "val2"], default="val",
                    help="val: held-out concepts (twitter); valstyle: the val training concepts, trained on "
                         "google artwork and evaluated on twitter artwork (a new style, seen concepts); val2: "
                         "held-out concepts (twitter) after training on both vendors' artwork of the training "
                         "concepts")
    args = ap.parse_args()
    import quality

    from mmedge.train.pipeline import train

    csvs = qd.write_protocol_csvs(args.out / "data", args.data)
    tr, test = qd.load(csvs[f"{args.split}_train"]), csvs[f"{args.split}_test"]
    log = (args.out / "val.jsonl").open("a")
    if not args.low:
        for name, ov in EXPERIMENTS:
            if args.only and name not in args.only:
                continue
            run = args.out / "runs" / name
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            curve: list[list[float]] = []

            def progress(stage: str, step: int, total: int, m: dict[str, float]) -> None:
                if stage == "stage2" and "val_t2i_R@10" in m and (not curve or curve[-1][0] != step):
                    curve.append([step, round(m["val_t2i_R@10"], 3), round(m["val_i2t_R@10"], 3)])

            train(tr, run, config(ov, args.threads), val_data=qd.load(test) if args.track else None,
                  on_progress=progress if args.track else None)
            row = {"name": name, "overrides": ov, "train_s": round(time.perf_counter() - t), **evaluate(run, test),
                   "split": args.split, "fit": evaluate(run, csvs[f"{args.split}_train"])}
            if curve:
                row["curve"] = curve
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
        return 0
    paired, u_img, u_txt = quality.subset(tr, 0.1, 0)
    for name, s1, methods in LOW_EXPERIMENTS:
        if args.only and name not in args.only:
            continue
        src = args.out / "runs" / f"stage1-{name}"
        if any(m in methods for m in "de") and not (src / "stage1" / "text.pt").exists():
            cfg = config(LOW_BASE + s1 + ["stage1.enabled=1", "stage2.method=cca", "stage2.embed_dim=96"], args.threads)
            train(tr, src, cfg)
        for m in methods:
            ov = LOW_BASE + s1 + [f"stage1.enabled={int(m != 'c')}", f"stage2.adversarial={int(m == 'e')}"]
            run = args.out / "runs" / f"low-{name}-{m}"
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            train(paired, run, config(ov, args.threads), unpaired_images=u_img, unpaired_texts=u_txt,
                  stage1_from=src if m != "c" else None)
            row = {"name": name, "method": m, "overrides": ov, "train_s": round(time.perf_counter() - t),
                   **evaluate(run, test)}
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
