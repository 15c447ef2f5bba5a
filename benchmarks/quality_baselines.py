"""Method (a) of the quality benchmark: a classic unsupervised baseline without neural
networks. PCA of raw pixels and TF-IDF + SVD (LSA) of the captions, aligned by CCA.

numpy only. The embeddings are scored with mmedge's own metric code and the same galleries
and positives as the bundles, but they do not go through the runtime (there is no ONNX
graph for TF-IDF); the report says so.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmedge.train.pipeline import fit_cca

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Tfidf:
    vocab: dict[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, texts: Sequence[str], min_df: int = 1) -> "Tfidf":
        df: Counter[str] = Counter()
        for t in texts:
            df.update(set(words(t)))
        vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= min_df))}
        n = len(texts)
        idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in vocab], dtype=np.float64)
        return cls(vocab, idf)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.vocab)), dtype=np.float64)
        for r, t in enumerate(texts):
            for w, c in Counter(words(t)).items():
                j = self.vocab.get(w)
                if j is not None:
                    x[r, j] = 1.0 + math.log(c)
        x *= self.idf
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def randomized_pca(x: np.ndarray, k: int, seed: int = 0, iters: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and top-k principal directions (D, k) of rows ``x`` (randomised SVD with
    ``iters`` power iterations, in ``x``'s precision)."""
    mean = x.mean(0)
    xc = x - mean
    k = min(k, *xc.shape)
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(xc.T @ rng.standard_normal((xc.shape[0], k + 10)).astype(x.dtype))[0]  # (D, k+10)
    for _ in range(iters):
        q = np.linalg.qr(xc.T @ (xc @ q))[0]
    _, _, vt = np.linalg.svd(xc @ q, full_matrices=False)
    return mean, (q @ vt.T)[:, :k]


@dataclass
class PixelTextCCA:
    """Fitted method (a): pixels -> PCA -> CCA, captions -> TF-IDF -> SVD -> CCA."""

    px_mean: np.ndarray
    px_comp: np.ndarray
    tfidf: Tfidf
    tx_mean: np.ndarray
    tx_comp: np.ndarray
    cca: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def fit(cls, pixels: np.ndarray, texts: Sequence[str], pca_dim: int = 256, svd_dim: int = 256,
            cca_dim: int = 128, reg: float = 1e-2, power: float = 1.0, seed: int = 0) -> "PixelTextCCA":
        """``pixels``: (N, S, S, 3) uint8 of the training pairs, ``texts``: their captions."""
        x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
        px_mean, px_comp = randomized_pca(x, pca_dim, seed)
        fx = (x - px_mean) @ px_comp
        tfidf = Tfidf.fit(texts)
        t = tfidf.transform(texts)
        tx_mean, tx_comp = randomized_pca(t, svd_dim, seed)
        fy = (t - tx_mean) @ tx_comp
        return cls(px_mean, px_comp, tfidf, tx_mean, tx_comp,
                   fit_cca(fx, fy, min(cca_dim, fx.shape[1], fy.shape[1]), reg=reg, power=power))

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
        mx, a, _, _, _ = self.cca
        z = (((x - self.px_mean) @ self.px_comp) - mx) @ a
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        t = self.tfidf.transform(texts)
        _, _, my, b, _ = self.cca
        z = (((t - self.tx_mean) @ self.tx_comp) - my) @ b
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)
