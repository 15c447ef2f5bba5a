"""Shared fixtures: a tiny synthetic dataset, a tiny trained run and its fp32 and int8
bundles, each built once per test session (a few seconds on two CPU cores).

torch is imported inside the fixtures, so test modules that need no training (and a
virtual environment without torch) are not affected by this file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

N_TRAIN, N_VAL, N_TEST = 160, 32, 48
PCA_DIM = 8
TORCH_THREADS = 1


def tiny_config(**stage2: Any):  # -> TrainConfig
    """A TrainConfig small enough to train in about a second; ``stage2`` overrides
    fields of ``Stage2Config`` (epochs, lr, adversarial, ...)."""
    from mmedge.train.config import (
        ImageTowerConfig,
        Stage1Config,
        Stage2Config,
        TextTowerConfig,
        TrainConfig,
    )

    s2 = {"epochs": 2, "batch_size": 32, "embed_dim": 16, **stage2}
    return TrainConfig(
        image=ImageTowerConfig(width=4, feature_dim=32),
        text=TextTowerConfig(width=32, layers=1, heads=2, max_length=40, tokenizer_vocab=300),
        stage1=Stage1Config(image_epochs=1, text_epochs=1, batch_size=32),
        stage2=Stage2Config(**s2),
        pca_dim=PCA_DIM,
        seed=0,
        threads=TORCH_THREADS,
    )


@pytest.fixture(scope="session")
def make_tiny_config() -> Callable[..., Any]:
    """Factory of fresh tiny configs (``train`` fills in ``text.vocab_size``, so each
    training call gets its own object)."""
    pytest.importorskip("torch")
    return tiny_config


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"train", "val", "test"}`` -> captions.csv of a tiny synthetic dataset."""
    from mmedge.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    return generate(root / "data", seed=0, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_data: dict[str, Path]):
    """A finished tiny training run (stage 2: 2 epochs); returns the TrainResult.
    Tests must not write into ``result.run_dir``; copy it first."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(TORCH_THREADS)
    from mmedge.train.pipeline import train

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    return train(synthetic_data["train"], run_dir, tiny_config(), val_data=synthetic_data["val"])


def _export(tmp_path_factory: pytest.TempPathFactory, run_dir: Path, quantize: str) -> Path:
    from mmedge.export.bundle import export

    out = tmp_path_factory.mktemp(f"bundle-{quantize}") / "bundle"
    export(run_dir, out, quantize=quantize)
    return out


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory, trained_run) -> Path:
    """The fp32 bundle folder of ``trained_run`` (read-only for tests: copy before changing)."""
    return _export(tmp_path_factory, trained_run.run_dir, "fp32")


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, trained_run) -> Path:
    """The int8 bundle folder of ``trained_run`` (read-only for tests: copy before changing)."""
    return _export(tmp_path_factory, trained_run.run_dir, "int8")
