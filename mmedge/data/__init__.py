"""Datasets: loaders for user data (:func:`load_pairs`) and the built-in synthetic set.

numpy, Pillow and the standard library only; no torch.
"""

from mmedge.data.loaders import FORMATS, IMAGE_EXTENSIONS, LoadResult, Pair, load_pairs

__all__ = ["FORMATS", "IMAGE_EXTENSIONS", "LoadResult", "Pair", "load_pairs"]
