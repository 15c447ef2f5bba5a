"""The baseline of benchmarks/perf.py: what a user would write without mmedge.

The same trained model in PyTorch eager mode (``torch.inference_mode``, the run folder's
weights via ``mmedge.train.pipeline.load_run``), the same ``tokenizers`` file, Pillow and
numpy for images, exact search as one numpy matrix-vector product plus ``argpartition``,
and the metadata from an in-memory Python list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class TorchEager:
    def __init__(self, run_dir: Path, threads: int | None = None) -> None:
        import torch
        from tokenizers import Tokenizer

        from mmedge.train.pipeline import load_run

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.model, self.cfg, self.pcfg, tok_path = load_run(run_dir)
        self.model.eval()
        self.tok = Tokenizer.from_file(str(tok_path))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=self.cfg.text.max_length)

    def set_threads(self, threads: int) -> None:
        self.torch.set_num_threads(threads)

    def encode_text(self, text: str) -> np.ndarray:
        torch = self.torch
        ids = torch.tensor([self.tok.encode(text).ids], dtype=torch.long)
        with torch.inference_mode():
            return self.model.encode_text(ids, torch.ones_like(ids)).numpy()

    def load_pixels(self, paths: list[Path]) -> np.ndarray:
        from PIL import Image

        h, w = self.pcfg.size
        arrs = []
        for p in paths:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BICUBIC)
                arrs.append(np.asarray(im))
        return self.pcfg.normalize(np.stack(arrs))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            return self.model.encode_image(torch.from_numpy(pixels)).numpy()

    def encode_images(self, paths: list[Path]) -> np.ndarray:
        return self.encode_pixels(self.load_pixels(paths))


class ExactSearch:
    """Exact top-k by inner product over an in-memory matrix, metadata from a list."""

    def __init__(self, vectors: np.ndarray, metadata: list[dict[str, Any]]) -> None:
        self.x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.meta = metadata

    def search(self, q: np.ndarray, k: int = 10) -> list[tuple[float, dict[str, Any]]]:
        s = self.x @ q.reshape(-1)
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.argsort(-s[top])]
        return [(float(s[i]), self.meta[i]) for i in top]
