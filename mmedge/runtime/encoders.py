"""ONNX Runtime sessions for the two towers of a bundle.

Both encoders return ``float32 (B, D)`` L2-normalised embeddings (the graphs normalise), where
``D = bundle.dim``. Sessions are created once per encoder with graph optimisation
``ORT_ENABLE_ALL``; ``threads`` sets ONNX Runtime's intra-op thread count. ``None`` means: one
thread for the text tower (a query is one short sequence, where a second thread only adds
synchronisation: measured slower at batch 1) and ONNX Runtime's default (one per physical core)
for the image tower. Sessions with more than one thread do not spin while waiting for work, so
that they leave the cores to the other stages of a pipeline (decoding, the HNSW insert) and to
other processes; on a shared 2-core machine this measured faster, not slower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mmedge.errors import BundleError, UsageError
from mmedge.runtime.bundle import Bundle
from mmedge.runtime.preprocess import ImageSource, is_single_source, preprocess
from mmedge.runtime.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_ALIASES: dict[str, str] = {
    "cpu": _CPU,
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}


def available_providers() -> list[str]:
    """ONNX Runtime execution providers available in this installation."""
    return list(ort.get_available_providers())


def choose_providers(requested: str | Sequence[str] | None = None) -> list[str]:
    """Resolve a provider request into the list passed to ``InferenceSession``.

    ``None`` or ``"auto"``: CUDA when available, else CPU. Otherwise a name or a list of names,
    each a short alias (``"cpu"``, ``"cuda"``, ``"tensorrt"``, ``"coreml"``, ``"dml"``, ...) or a
    full provider name (``"CUDAExecutionProvider"``). The CPU provider is appended as the
    fallback when missing. An unavailable explicit request raises
    :class:`~mmedge.errors.UsageError` listing what is available.
    """
    available = available_providers()
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        return chosen + [_CPU]
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        raise UsageError(f"no execution provider requested; available: {', '.join(available)}")
    chosen = []
    for name in names:
        if not isinstance(name, str):
            raise UsageError(f"execution provider names are strings, got {name!r}")
        full = _ALIASES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise UsageError(
                f"execution provider {name!r} is not available here; available: {', '.join(available)}"
            )
        if full not in chosen:
            chosen.append(full)
    if _CPU not in chosen:
        chosen.append(_CPU)
    return chosen


def _session(model: Path, providers: list[str], threads: int | None) -> ort.InferenceSession:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise UsageError(f"threads must be a non-negative integer or None, got {threads!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if threads != 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not model.is_file():
        raise BundleError(f"model file {model} does not exist")
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
        raise BundleError(f"cannot load model {model.name} ({model}): {exc}") from exc


def _check_io(sess: ort.InferenceSession, model: Path, inputs: Sequence[str], output: str) -> None:
    have_in = [i.name for i in sess.get_inputs()]
    have_out = [o.name for o in sess.get_outputs()]
    missing = [n for n in inputs if n not in have_in]
    if missing:
        raise BundleError(f"model {model.name} has no input {missing[0]!r} (inputs: {', '.join(have_in)})")
    if output not in have_out:
        raise BundleError(f"model {model.name} has no output {output!r} (outputs: {', '.join(have_out)})")
    extra = [n for n in have_in if n not in inputs]
    if extra:
        raise BundleError(f"model {model.name} needs inputs the manifest does not name: {', '.join(extra)}")


def _as_bundle(bundle: Bundle | str | os.PathLike[str]) -> Bundle:
    if isinstance(bundle, Bundle):
        return bundle
    if isinstance(bundle, (str, os.PathLike)):
        return Bundle.load(bundle)
    raise UsageError(f"expected a Bundle or a bundle path, got {type(bundle).__name__}")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")


class _Encoder:
    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        model: Path,
        inputs: Sequence[str],
        output: str,
        providers: str | Sequence[str] | None,
        threads: int | None,
    ) -> None:
        self.bundle = _as_bundle(bundle)
        self.dim = self.bundle.dim
        self.providers = choose_providers(providers)
        self._model = model
        self._output = output
        self._session = _session(model, self.providers, threads)
        _check_io(self._session, model, inputs, output)
        logger.debug("loaded %s with %s", model, self._session.get_providers())

    @property
    def active_providers(self) -> list[str]:
        """Providers the session actually uses, in priority order."""
        return list(self._session.get_providers())

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            (out,) = self._session.run([self._output], feeds)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"model {self._model.name} failed to run: {exc}") from exc
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise BundleError(
                f"model {self._model.name} returned shape {out.shape}, expected (B, {self.dim}) per the manifest"
            )
        return out

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)


class ImageEncoder(_Encoder):
    """Runs ``image.onnx``: images -> ``(B, D) float32`` unit vectors.

    Args:
        bundle: a loaded :class:`Bundle` (or a bundle folder, loaded with checksums).
        providers: see :func:`choose_providers`.
        threads: ONNX Runtime intra-op threads (``None``: its default).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        b = _as_bundle(bundle)
        super().__init__(b, b.image_model_path, [b.image_input], b.image_output, providers, threads)
        self.preprocess_config = b.preprocess
        self._input = b.image_input

    def encode(self, images: Sequence[ImageSource] | ImageSource, batch_size: int = 64) -> np.ndarray:
        """``B`` image sources (paths, bytes, file objects, PIL images) -> ``(B, D) float32``.

        A single source is a batch of one (``(1, D)``); an empty sequence gives ``(0, D)``.
        Unreadable images raise :class:`~mmedge.errors.ImageError`.
        """
        _check_batch_size(batch_size)
        if is_single_source(images):
            images = [images]  # type: ignore[list-item]
        seq = list(images)  # type: ignore[arg-type]
        if not seq:
            return self._empty()
        out = [
            self.encode_pixels(preprocess(seq[i : i + batch_size], self.preprocess_config))
            for i in range(0, len(seq), batch_size)
        ]
        return np.concatenate(out, axis=0)

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed ``(B, 3, H, W) float32`` (see :func:`preprocess`) -> ``(B, D) float32``."""
        x = np.asarray(pixel_values)
        h, w = self.preprocess_config.size
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise UsageError(f"pixel_values must have shape (B, 3, {h}, {w}), got {x.shape}")
        if x.shape[0] == 0:
            return self._empty()
        return self._run({self._input: np.ascontiguousarray(x, dtype=np.float32)})


class TextEncoder(_Encoder):
    """Runs ``text.onnx``: texts -> ``(B, D) float32`` unit vectors.

    Args:
        bundle: a loaded :class:`Bundle` (or a bundle folder, loaded with checksums).
        providers: see :func:`choose_providers`.
        threads: ONNX Runtime intra-op threads (``None``: one, see the module docstring).
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike[str],
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        b = _as_bundle(bundle)
        inputs = b.text_inputs
        super().__init__(b, b.text_model_path, inputs, b.text_output, providers, 1 if threads is None else threads)
        self.tokenizer = TextTokenizer(b.tokenizer_path, b.max_length, b.pad_id)
        self._ids_name, self._mask_name = inputs[0], inputs[1]

    def encode(self, texts: str | Sequence[str], batch_size: int = 256) -> np.ndarray:
        """``B`` texts -> ``(B, D) float32``; a bare ``str`` gives ``(1, D)``, ``[]`` gives ``(0, D)``.

        Each batch of ``batch_size`` texts is padded to its own longest text. Bad texts raise
        :class:`~mmedge.errors.TextError`.
        """
        _check_batch_size(batch_size)
        if isinstance(texts, str):
            texts = [texts]
        seq = list(texts)
        if not seq:
            return self._empty()
        out = []
        for i in range(0, len(seq), batch_size):
            ids, mask = self.tokenizer.encode(seq[i : i + batch_size])
            out.append(self.encode_ids(ids, mask))
        return np.concatenate(out, axis=0)

    def encode_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Token ids and mask, both ``(B, T)`` integers -> ``(B, D) float32``."""
        ids = np.asarray(input_ids)
        mask = np.asarray(attention_mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise UsageError(f"input_ids and attention_mask must both be (B, T); got {ids.shape} and {mask.shape}")
        if ids.shape[0] == 0:
            return self._empty()
        feeds: dict[str, Any] = {
            self._ids_name: np.ascontiguousarray(ids, dtype=np.int64),
            self._mask_name: np.ascontiguousarray(mask, dtype=np.int64),
        }
        return self._run(feeds)
