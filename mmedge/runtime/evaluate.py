"""Retrieval evaluation of a bundle on a dataset, through the runtime encoders.

Galleries: the distinct images of the dataset (text->image) and every caption
(image->text). Positives: the image of a caption's row and the captions of an
image's rows, or, with ``positive_column``, every item whose row shares that
column's value (e.g. COCO's ``image_id`` or an emoji's ``emoji_id``).
Ranks come from exact cosine similarity over all items (not the HNSW index), so
the figures describe the model, not the index's approximation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmedge.data import Pair
from mmedge.errors import DatasetError
from mmedge.runtime.encoders import ImageEncoder, TextEncoder
from mmedge.runtime.metrics import retrieval_metrics

KS = (1, 5, 10)


def evaluate(
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    pairs: Sequence[Pair],
    positive_column: str | None = None,
) -> dict[str, Any]:
    """-> ``{"text_to_image": {"R@1", "R@5", "R@10", "median_rank", ...}, "image_to_text": {...}, "n_images", "n_texts"}``."""
    if not pairs:
        raise DatasetError("nothing to evaluate: the dataset has no pairs")
    img_index: dict[str, int] = {}
    row_image: list[int] = []
    groups: list[str] = []
    for row, p in enumerate(pairs):
        if positive_column is not None:
            if positive_column not in p.extra:
                raise DatasetError(f"row {row + 1} ({p.key}): no column {positive_column!r}")
            groups.append(p.extra[positive_column])
        row_image.append(img_index.setdefault(str(p.image), len(img_index)))
    images = list(img_index)
    img_emb = image_encoder.encode(images)  # (I, D)
    txt_emb = text_encoder.encode([p.caption for p in pairs])  # (T, D)

    if positive_column is None:
        t2i_pos = [{i} for i in row_image]
        texts_of_image: dict[int, set[int]] = defaultdict(set)
        for row, i in enumerate(row_image):
            texts_of_image[i].add(row)
        i2t_pos = [texts_of_image[i] for i in range(len(images))]
    else:
        imgs_of_group: dict[str, set[int]] = defaultdict(set)
        rows_of_group: dict[str, set[int]] = defaultdict(set)
        group_of_image: dict[int, str] = {}
        for row, (i, g) in enumerate(zip(row_image, groups)):
            imgs_of_group[g].add(i)
            rows_of_group[g].add(row)
            group_of_image.setdefault(i, g)
        t2i_pos = [imgs_of_group[g] for g in groups]
        i2t_pos = [rows_of_group[group_of_image[i]] for i in range(len(images))]
    return {
        "text_to_image": retrieval_metrics(txt_emb, img_emb, t2i_pos, ks=KS),
        "image_to_text": retrieval_metrics(img_emb, txt_emb, i2t_pos, ks=KS),
        "n_images": len(images),
        "n_texts": len(pairs),
    }
