"""Training features behind the quality recipe (multi-positive and hard-negative InfoNCE,
colour-keeping augmentation, alternative texts, unpaired data, stage 1 from another run, CCA
alignment, the patch/residual image tower), ``mmedge viz`` on the tiny fixtures, and a small
slice of the emoji data read through the project's CSV loader (skipped when the dataset
folder is absent)."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mmedge.data import LoadResult, Pair, load_pairs  # noqa: E402
from mmedge.errors import TrainError  # noqa: E402
from mmedge.export.bundle import export  # noqa: E402
from mmedge.runtime.preprocess import PreprocessConfig  # noqa: E402
from mmedge.train.config import Stage2Config, TrainConfig, synthetic_recipe  # noqa: E402
from mmedge.train.pipeline import augment_images, contrastive_loss, fit_cca, load_run, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMOJI = ROOT.parent / "shared" / "data" / "emoji"


# ----------------------------------------------------------------------------- recipes


def test_synthetic_recipe_keeps_the_original_training():
    """The demo's recipe must not pick up the general defaults' new features."""
    cfg = synthetic_recipe()
    assert (cfg.image.arch, cfg.image.width, cfg.image.feature_dim) == ("conv4", 16, 256)
    s2 = cfg.stage2
    assert (s2.epochs, s2.batch_size, s2.lr, s2.embed_dim, s2.method) == (8, 256, 2e-3, 128, "contrastive")
    assert not (s2.multi_positive or s2.alt_prob or s2.text_drop or s2.hard_negative_beta or s2.adversarial)
    assert not (s2.aug_shade or s2.aug_outline or s2.aug_color or s2.ema or cfg.image.mixstyle)
    assert not (s2.aug_scale or s2.aug_translate or s2.aug_rotate or s2.aug_blur)
    assert cfg.stage1.enabled and cfg.pca_dim is None
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ----------------------------------------------------------------------------- losses


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_contrastive_loss_general_path_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    ie, te = _unit(torch.randn(6, 8, generator=g)), _unit(torch.randn(6, 8, generator=g))
    scale = torch.tensor(10.0)
    plain = contrastive_loss(ie, te, scale, None, 0.0)
    general = contrastive_loss(ie, te, scale, torch.arange(6), 0.0)
    assert torch.allclose(plain, general, atol=1e-6)


def test_multi_positive_counts_images_of_one_caption_as_positives():
    g = torch.Generator().manual_seed(1)
    ie, te = _unit(torch.randn(5, 8, generator=g)), _unit(torch.randn(5, 8, generator=g))
    ie[1], te[1] = ie[0], te[0]  # two pairs of the same concept
    scale = torch.tensor(20.0)
    single = contrastive_loss(ie, te, scale, torch.arange(5), 0.0)
    multi = contrastive_loss(ie, te, scale, torch.tensor([0, 0, 1, 2, 3]), 0.0)
    assert multi < single  # the twin is no longer pushed away as a negative


def test_hard_negatives_weigh_close_negatives_more_and_keep_gradients():
    g = torch.Generator().manual_seed(2)
    ie = _unit(torch.randn(8, 8, generator=g)).requires_grad_()
    te = _unit(torch.randn(8, 8, generator=g))
    scale = torch.tensor(10.0)
    plain = contrastive_loss(ie, te, scale, None, 0.0)
    hard = contrastive_loss(ie, te, scale, None, 2.0)
    assert torch.isfinite(hard) and not torch.allclose(plain, hard)
    hard.backward()
    assert ie.grad is not None and torch.isfinite(ie.grad).all() and ie.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_moves_pixels_but_never_changes_colours():
    """A red square on white: after zoom, shift, rotation and blur every pixel is still a
    mix of red and white (red channel 1, green = blue), the background stays white."""
    u8 = np.full((4, 32, 32, 3), 255, np.uint8)
    u8[:, 10:22, 10:22] = (255, 0, 0)
    pcfg = PreprocessConfig(size=(32, 32), resize_filter="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    x = torch.from_numpy(pcfg.normalize(u8))
    s2 = Stage2Config(aug_scale=0.2, aug_translate=0.1, aug_rotate=20.0, aug_blur=1.0, aug_shade=0.0,
                      aug_outline=0.0, aug_color=0.0)
    from mmedge.train.pipeline import _white

    y = augment_images(x, s2, _white(pcfg), torch.Generator().manual_seed(0))
    mean = torch.tensor(pcfg.mean)[None, :, None, None]
    std = torch.tensor(pcfg.std)[None, :, None, None]
    rgb = y * std + mean
    assert not torch.allclose(y, x)
    assert torch.allclose(rgb[:, 0], torch.ones_like(rgb[:, 0]), atol=1e-5)
    assert torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
    assert torch.allclose(rgb[:, :, 0, 0], torch.ones(4, 3), atol=1e-5)  # corners stay white
    off = Stage2Config(aug_scale=0.0, aug_translate=0.0, aug_rotate=0.0, aug_blur=0.0, aug_shade=0.0,
                       aug_outline=0.0, aug_color=0.0)
    assert torch.equal(augment_images(x, off, _white(pcfg), torch.Generator()), x)


def _two_tones() -> tuple[np.ndarray, PreprocessConfig]:
    """Two squares of one hue, light and dark (like two skin tones), on white."""
    u8 = np.full((16, 32, 32, 3), 255, np.uint8)
    u8[:, 4:14, 4:14] = (240, 200, 160)
    u8[:, 18:28, 18:28] = (120, 80, 40)
    return u8, PreprocessConfig(size=(32, 32), resize_filter="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))


def _style(u8: np.ndarray, pcfg: PreprocessConfig, seed: int, **probs: float) -> torch.Tensor:
    """Style augmentation only, returned as 0..1 RGB (B, 3, H, W)."""
    from mmedge.train.pipeline import _norm_stats, _white

    kw = {"aug_shade": 0.0, "aug_outline": 0.0, "aug_color": 0.0, **probs}
    s2 = Stage2Config(aug_scale=0.0, aug_translate=0.0, aug_rotate=0.0, aug_blur=0.0, **kw)
    x = torch.from_numpy(pcfg.normalize(u8))
    mean, std = _norm_stats(pcfg)
    y = augment_images(x, s2, _white(pcfg), torch.Generator().manual_seed(seed), (mean, std))
    return y * std + mean


def test_style_augmentation_changes_the_drawing_only_and_keeps_tone_order():
    u8, pcfg = _two_tones()
    orig = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    bg = torch.zeros(32, 32, dtype=torch.bool)
    bg[:, :] = True
    bg[2:16, 2:16] = bg[16:30, 16:30] = False  # leave the squares and a 2-pixel rim out
    for probs in ({"aug_shade": 1.0}, {"aug_color": 1.0}, {"aug_outline": 1.0},
                  {"aug_shade": 1.0, "aug_color": 1.0, "aug_outline": 1.0}):
        rgb = _style(u8, pcfg, 0, **probs)
        assert rgb.min() >= 0.0 and rgb.max() <= 1.0
        assert torch.allclose(rgb[:, :, bg], orig[:, :, bg], atol=1e-5), probs  # background untouched
        assert not torch.allclose(rgb, orig, atol=1e-3), probs  # the drawing did change
    # shading: every content pixel scaled by a factor within 0.6..1.4 of its colour
    rgb = _style(u8, pcfg, 1, aug_shade=1.0)
    ratio = rgb[:, :, 5:13, 5:13] / orig[:, :, 5:13, 5:13]
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.4 + 1e-4
    # colour scaling: the same hue keeps its order of lightness (mean of R, G, B)
    for seed in range(5):
        rgb = _style(u8, pcfg, seed, aug_color=1.0)
        light, dark = rgb[:, :, 8, 8].mean(1), rgb[:, :, 22, 22].mean(1)
        assert (light > dark).all()
    # outlines: the edge of a square gets darker, its inside keeps its colour
    rgb = _style(u8, pcfg, 2, aug_outline=1.0)
    assert (rgb[:, :, 4, 8].sum(1) < orig[:, :, 4, 8].sum(1) - 0.1).all()
    assert torch.allclose(rgb[:, :, 8, 8], orig[:, :, 8, 8], atol=1e-5)
    # the same generator seed gives the same augmentation
    assert torch.equal(_style(u8, pcfg, 3, aug_shade=1.0, aug_color=1.0, aug_outline=0.5),
                       _style(u8, pcfg, 3, aug_shade=1.0, aug_color=1.0, aug_outline=0.5))


def test_grey_augmentation_keeps_the_background_and_the_light_to_dark_order():
    u8, pcfg = _two_tones()
    orig = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    rgb = _style(u8, pcfg, 0, aug_gray=1.0)
    inner = rgb[:, :, 5:13, 5:13]
    assert torch.allclose(inner[:, 0], inner[:, 1], atol=1e-5) and torch.allclose(inner[:, 1], inner[:, 2], atol=1e-5)
    lum = (orig[:, :, 8, 8] * torch.tensor([0.299, 0.587, 0.114])).sum(1)
    assert torch.allclose(rgb[:, 0, 8, 8], lum, atol=1e-5)  # the luminance, not the channel mean
    assert (rgb[:, 0, 8, 8] > rgb[:, 0, 22, 22]).all()  # the lighter tone stays lighter
    assert torch.allclose(rgb[:, :, 0, 0], orig[:, :, 0, 0], atol=1e-5)  # background untouched
    assert torch.equal(_style(u8, pcfg, 0, aug_gray=0.0), _style(u8, pcfg, 0))


def test_randconv_changes_the_drawing_only_and_keeps_its_brightness_and_spread():
    u8, pcfg = _two_tones()
    orig = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    rgb = _style(u8, pcfg, 0, aug_randconv=1.0)
    assert torch.allclose(rgb[:, :, 0, 0], orig[:, :, 0, 0], atol=1e-5)  # background untouched
    assert not torch.allclose(rgb[:, :, 8, 8], orig[:, :, 8, 8], atol=1e-2)
    # re-standardised to the drawing's statistics: the mean over the two squares stays put
    # (up to clamping at 0 and 1)
    sq = torch.cat([rgb[:, :, 4:14, 4:14].flatten(1), rgb[:, :, 18:28, 18:28].flatten(1)], 1)
    ref = torch.cat([orig[:, :, 4:14, 4:14].flatten(1), orig[:, :, 18:28, 18:28].flatten(1)], 1)
    assert (sq.mean(1) - ref.mean(1)).abs().max() < 0.08
    assert torch.equal(_style(u8, pcfg, 4, aug_randconv=0.5), _style(u8, pcfg, 4, aug_randconv=0.5))


def _red_square(n: int = 8) -> tuple[torch.Tensor, PreprocessConfig]:
    u8 = np.full((n, 32, 32, 3), 255, np.uint8)
    u8[:, 8:24, 8:24] = (255, 0, 0)
    pcfg = PreprocessConfig(size=(32, 32), resize_filter="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    return torch.from_numpy(pcfg.normalize(u8)), pcfg


def _geometric(**kw: float) -> Stage2Config:
    base = {k: 0.0 for k in ("aug_scale", "aug_translate", "aug_rotate", "aug_blur", "aug_shade", "aug_outline",
                             "aug_color")}
    return Stage2Config(**{**base, **kw})


def test_elastic_warp_bends_edges_locally_and_keeps_colours():
    from mmedge.train.pipeline import _elastic_field, _white

    x, pcfg = _red_square()
    y = augment_images(x, _geometric(aug_elastic=1.0, aug_elastic_strength=0.1), _white(pcfg),
                       torch.Generator().manual_seed(0))
    rgb = y * torch.tensor(pcfg.std)[None, :, None, None] + torch.tensor(pcfg.mean)[None, :, None, None]
    assert torch.allclose(rgb[:, 0], torch.ones_like(rgb[:, 0]), atol=1e-5)  # only red and white
    assert torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)
    redness = 1.0 - rgb[:, 1]  # 1 on red, 0 on white
    assert not torch.allclose(redness, 1.0 - (x * torch.tensor(pcfg.std)[None, :, None, None]
                                              + torch.tensor(pcfg.mean)[None, :, None, None])[:, 1], atol=0.05)
    # a local warp, not a shift: the square's left edge moves by different amounts along its height
    left = (redness[:, 8:24, :16] > 0.5).float().argmax(2).float()  # first red column per row
    assert (left.max(1).values - left.min(1).values >= 1).any()
    # displacements stay near the strength (grid units: 2 per side; bicubic interpolation
    # overshoots the control points a little), and vanish at p = 0
    f = _elastic_field(64, 32, 32, _geometric(aug_elastic=1.0, aug_elastic_strength=0.05),
                       torch.Generator().manual_seed(1))
    assert f.shape == (64, 32, 32, 2) and f.abs().max() <= 0.125 and f.abs().max() > 0.05
    assert torch.equal(_elastic_field(4, 32, 32, _geometric(aug_elastic=0.0), torch.Generator()),
                       torch.zeros(4, 32, 32, 2))


def test_random_erasing_paints_one_background_rectangle():
    from mmedge.train.pipeline import _white

    x, pcfg = _red_square(32)
    bg = _white(pcfg)
    y = augment_images(x, _geometric(aug_erase=1.0), bg, torch.Generator().manual_seed(0))
    changed = (y != x).any(1)  # (B, H, W)
    erased = (y == bg).all(1) & ~(x == bg).all(1)
    assert torch.equal(changed, erased)  # every change is a red pixel turned background
    assert changed.flatten(1).any(1).sum() > 16  # most rectangles hit the square
    for m in changed:  # each change lies in one rectangle of at most 25 % of the image
        if m.any():
            rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
            assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) <= 0.25 * 32 * 32 + 64
    assert torch.equal(augment_images(x, _geometric(aug_erase=0.0), bg, torch.Generator()), x)


def test_ibn_normalises_half_the_channels_and_exports(tmp_path, synthetic_data, make_tiny_config):
    from mmedge.train.config import ImageTowerConfig
    from mmedge.train.models import ImageTower, _HalfInstanceNorm

    norm = _HalfInstanceNorm(6)
    h = torch.randn(2, 6, 5, 5) * 3 + 7
    out = norm(h)
    assert torch.allclose(out[:, :3].mean((2, 3)), torch.zeros(2, 3), atol=1e-4)  # affine starts at 1, 0
    assert torch.equal(out[:, 3:], h[:, 3:])
    with pytest.raises(ValueError, match="conv4"):
        ImageTower(ImageTowerConfig(arch="patchres", ibn=True))
    cfg = make_tiny_config(epochs=1)
    cfg.image.ibn = True
    train(synthetic_data["train"], tmp_path / "run", cfg)
    res = export(tmp_path / "run", tmp_path / "bundle", quantize="int8")  # parity checks inside
    assert res.manifest["model_config"]["image"]["ibn"] is True
    assert res.manifest["parity"]["image"]["mean_cosine"] > 0.999


def test_extra_convs_start_as_the_identity_learn_and_export(tmp_path, synthetic_data, make_tiny_config):
    from mmedge.train.config import ImageTowerConfig
    from mmedge.train.models import ImageTower

    plain = ImageTower(ImageTowerConfig(width=8, feature_dim=16, mixstyle=0.0))
    deep = ImageTower(ImageTowerConfig(width=8, feature_dim=16, mixstyle=0.0, extra_convs=2))
    convs = [m for m in deep.convs if isinstance(m, torch.nn.Conv2d)]
    for src, dst in zip([m for m in plain.convs if isinstance(m, torch.nn.Conv2d)], convs):
        dst.load_state_dict(src.state_dict())
    deep.fc.load_state_dict(plain.fc.state_dict())
    x = torch.randn(4, 3, 64, 64)
    assert len(convs) == 4 and sum(p.numel() for p in deep.parameters()) == (
        sum(p.numel() for p in plain.parameters()) + 2 * (32 * 32 * 9 + 32))
    assert torch.allclose(deep(x), plain(x), atol=1e-6)  # zero-initialised blocks: the identity
    deep(x).square().sum().backward()
    extra = [m.conv for m in deep.convs if hasattr(m, "conv")]
    assert len(extra) == 2 and all(c.weight.grad.abs().sum() > 0 for c in extra)
    with pytest.raises(ValueError, match="conv4"):
        ImageTower(ImageTowerConfig(arch="patchres", extra_convs=1))
    cfg = make_tiny_config(epochs=1)
    cfg.image.extra_convs = 1
    train(synthetic_data["train"], tmp_path / "run", cfg)
    res = export(tmp_path / "run", tmp_path / "bundle", quantize="int8")  # parity checks inside
    assert res.manifest["model_config"]["image"]["extra_convs"] == 1
    assert res.manifest["parity"]["image"]["mean_cosine"] > 0.999


def test_mixstyle_mixes_feature_statistics_in_training_only():
    from mmedge.train.config import ImageTowerConfig
    from mmedge.train.models import ImageTower, mix_style

    torch.manual_seed(0)
    h = torch.randn(8, 4, 5, 5) * torch.arange(1, 9).float()[:, None, None, None] + torch.arange(8).float()[:, None,
                                                                                                             None, None]
    out = mix_style(h, 1.0)
    mu, mu_out = h.mean((2, 3)), out.mean((2, 3))
    assert not torch.allclose(out, h)
    # each sample's new channel means lie between the batch's smallest and largest
    assert (mu_out >= mu.min(0).values - 1e-4).all() and (mu_out <= mu.max(0).values + 1e-4).all()
    assert torch.equal(mix_style(h, 0.0), h)
    cfg = ImageTowerConfig(image_size=32, width=4, feature_dim=8, mixstyle=1.0)
    tower = ImageTower(cfg)
    plain = ImageTower(ImageTowerConfig(image_size=32, width=4, feature_dim=8))
    plain.load_state_dict(tower.state_dict())  # MixStyle adds no weights
    x = torch.randn(6, 3, 32, 32)
    tower.eval(), plain.eval()
    assert torch.equal(tower(x), plain(x))  # inference (and so the exported graph) is unchanged
    tower.train()
    assert not torch.allclose(tower(x), plain(x))


def test_a_tower_trained_with_mixstyle_exports_its_inference_graph(tmp_path, synthetic_data, make_tiny_config):
    """The export's PyTorch reference and the ONNX graph are both the inference tower: with
    MixStyle on every batch, a reference left in training mode would differ (parity error)."""
    cfg = make_tiny_config(epochs=1)
    cfg.image.mixstyle = 1.0
    train(synthetic_data["train"], tmp_path / "run", cfg)
    res = export(tmp_path / "run", tmp_path / "bundle", quantize="fp32")
    assert res.manifest["model_config"]["image"]["mixstyle"] == 1.0


def test_weight_averaging_ends_with_the_averaged_weights(tmp_path, synthetic_data, make_tiny_config):
    cfg = make_tiny_config(epochs=1, ema=0.9)
    train(synthetic_data["train"], tmp_path / "run", cfg)
    ck = torch.load(tmp_path / "run" / "stage2" / "checkpoint.pt", weights_only=True)
    model, *_ = load_run(tmp_path / "run")
    final = model.state_dict()
    ema = {k: v for k, v in ck["modules"]["ema"].items() if not k.startswith("pca_")}
    assert all(torch.equal(final[k], ema[k]) for k in ema)
    assert not all(torch.equal(ck["modules"]["model"][k], ema[k]) for k in ema)


# ----------------------------------------------------------------------------- CCA


def test_fit_cca_finds_the_shared_signal():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((500, 3))
    x = z @ rng.standard_normal((3, 10)) + 0.05 * rng.standard_normal((500, 10))
    y = z @ rng.standard_normal((3, 7)) + 0.05 * rng.standard_normal((500, 7))
    mx, a, my, b, corr = fit_cca(x, y, 3, reg=1e-6, power=0.0)
    assert corr.shape == (3,) and corr.min() > 0.95
    u, v = (x - mx) @ a, (y - my) @ b
    for j in range(3):
        assert np.corrcoef(u[:, j], v[:, j])[0, 1] > 0.95


# ----------------------------------------------------------------------------- training features


def _with_alts(pairs: LoadResult) -> LoadResult:
    out = []
    for p in pairs.pairs:
        words = p.caption.split()
        alt = " ".join(reversed(words)) + "|" + "shape picture"
        out.append(Pair(p.image, p.caption, p.key, {**p.extra, "alt_captions": alt}))
    return LoadResult(out, [], pairs.source)


def test_unpaired_data_and_alternative_texts_are_used(tmp_path, synthetic_data, make_tiny_config, trained_run):
    pairs = _with_alts(load_pairs(synthetic_data["train"]))
    extra_images = [p.image for p in load_pairs(synthetic_data["val"]).pairs[:12]]
    extra_texts = ["kumquat kumquat kumquat in a jar"] * 4
    cfg = make_tiny_config(epochs=1, multi_positive=True, alt_prob=0.5, text_drop=0.1, hard_negative_beta=0.5,
                           aug_scale=0.1, aug_translate=0.05, aug_rotate=5.0, aug_blur=0.2, adversarial=True)
    res = train(pairs, tmp_path / "run", cfg, unpaired_images=extra_images, unpaired_texts=extra_texts)
    assert res.metrics["n_unpaired"] == {"images": 12, "texts": 4}
    assert res.metrics["n_alt_texts"] == 2 * len(pairs.pairs)
    vocab = json.loads((tmp_path / "run" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "kumquat" in vocab  # the tokenizer saw the unpaired texts
    # the same stage-1 settings without the unpaired images (the shared tiny run): other towers
    w1 = torch.load(tmp_path / "run" / "stage1" / "image.pt", weights_only=True)["modules"]["tower"]
    w2 = torch.load(trained_run.run_dir / "stage1" / "image.pt", weights_only=True)["modules"]["tower"]
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    assert trained_run.metrics["n_unpaired"] == {"images": 0, "texts": 0}


def test_stage1_from_another_run_reuses_its_towers_and_tokenizer(tmp_path, trained_run, synthetic_data,
                                                                 make_tiny_config):
    src = trained_run.run_dir
    calls: list[str] = []
    res = train(synthetic_data["train"], tmp_path / "run", make_tiny_config(epochs=1), stage1_from=src,
                on_progress=lambda stage, *a: calls.append(stage))
    assert not any(c.startswith("stage1") for c in calls) and "stage2" in calls
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (json.loads((tmp_path / "run" / "preprocess.json").read_text())
            == json.loads((src / "preprocess.json").read_text()))
    assert res.metrics["timings"]["stage2_s"] > 0
    other = make_tiny_config()
    other.image.width = 8
    with pytest.raises(TrainError, match="image tower settings differ"):
        train(synthetic_data["train"], tmp_path / "bad", other, stage1_from=src)
    with pytest.raises(TrainError, match="no finished stage 1"):
        train(synthetic_data["train"], tmp_path / "bad2", make_tiny_config(), stage1_from=tmp_path / "nothing")


def test_cca_alignment_exports_and_aligns_pairs(tmp_path, trained_run, synthetic_data, make_tiny_config):
    cfg = make_tiny_config(method="cca", embed_dim=16)
    cfg.pca_dim = None
    train(synthetic_data["train"], tmp_path / "run", cfg, stage1_from=trained_run.run_dir)
    assert not (tmp_path / "run" / "stage2").exists()  # nothing trained in stage 2
    res = export(tmp_path / "run", tmp_path / "bundle", quantize="fp32")
    assert res.manifest["embedding"]["dim"] == 16
    model, _, pcfg, _ = load_run(tmp_path / "run")
    from mmedge.runtime.tokenizer import TextTokenizer
    from mmedge.train.pipeline import embed_all, prepare

    tok = TextTokenizer(tmp_path / "run" / "tokenizer.json", max_length=cfg.text.max_length, pad_id=0)
    t = prepare(load_pairs(synthetic_data["train"]), tok, pcfg)
    img, txt = embed_all(model, t, pcfg)
    paired = float((img * txt).sum(1).mean())
    shuffled = float((img * np.roll(txt, 7, axis=0)).sum(1).mean())
    assert paired > shuffled + 0.1


def test_patch_residual_tower_trains_and_exports_to_int8(tmp_path, synthetic_data, make_tiny_config):
    cfg = make_tiny_config(epochs=1)
    cfg.image.arch, cfg.image.width, cfg.image.blocks, cfg.image.pool = "patchres", 8, 1, "both"
    train(synthetic_data["train"], tmp_path / "run", cfg)
    res = export(tmp_path / "run", tmp_path / "bundle", quantize="int8")  # raises if parity is off
    assert res.manifest["quantization"]["image"] == "int8-weights"
    assert res.manifest["model_config"]["image"]["arch"] == "patchres"


def test_bag_of_tokens_text_tower_ignores_order_and_padding_and_exports(tmp_path, synthetic_data, make_tiny_config):
    from mmedge.train.config import TextTowerConfig
    from mmedge.train.models import TextTower

    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(vocab_size=50, width=8, mlp_ratio=2, arch="bow")).eval()
    ids = torch.tensor([[2, 7, 9, 11, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = tower(ids, mask)
        assert torch.allclose(out, tower(torch.tensor([[2, 11, 7, 9, 0, 0]]), mask), atol=1e-6)  # a bag
        assert torch.allclose(out, tower(ids[:, :4], mask[:, :4]), atol=1e-6)  # padding is ignored
        assert torch.allclose(out, tower(torch.tensor([[2, 7, 9, 11, 33, 44]]), mask), atol=1e-6)
        assert not torch.allclose(out, tower(torch.tensor([[2, 7, 9, 12]]), mask[:, :4]), atol=1e-4)
    assert not hasattr(tower, "blocks") and not hasattr(tower, "pos")
    with pytest.raises(ValueError, match="text arch"):
        TextTower(TextTowerConfig(vocab_size=50, arch="lstm"))
    cfg = make_tiny_config(epochs=1)
    cfg.text.arch = "bow"
    train(synthetic_data["train"], tmp_path / "run", cfg)
    res = export(tmp_path / "run", tmp_path / "bundle", quantize="int8")  # raises if parity is off
    assert res.manifest["model_config"]["text"]["arch"] == "bow"
    assert res.manifest["parity"]["text"]["mean_cosine"] > 0.99


# ----------------------------------------------------------------------------- viz


def _run_main(capsys, *args) -> tuple[int, str, str]:
    from mmedge.cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _grouped_csv(src: Path, dst: Path) -> Path:
    """The synthetic test CSV with a ``group`` column (the first word of the caption's shape)."""
    pairs = load_pairs(src).pairs
    with dst.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "group"])
        for p in pairs:
            w.writerow([str(p.image), p.caption, p.caption.split()[-1]])
    return dst


def test_viz_draws_a_png_map(tmp_path, capsys, fp32_bundle, synthetic_data):
    pytest.importorskip("matplotlib")
    data = _grouped_csv(synthetic_data["test"], tmp_path / "test.csv")
    out = tmp_path / "map.png"
    code, stdout, err = _run_main(capsys, "viz", fp32_bundle, "--data", data, "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "modality gap" in stdout and "mean paired cosine" in stdout


def test_tsne_projection_keeps_neighbours_apart_from_far_points():
    pytest.importorskip("sklearn")
    from mmedge.cli.viz import project_2d

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (10, 6)) + 1.0, rng.normal(0, 0.01, (10, 6)) - 1.0])
    xy = project_2d(x, "tsne")
    assert xy.shape == (20, 2)
    within = np.linalg.norm(xy[:10] - xy[:10].mean(0), axis=1).mean()
    between = np.linalg.norm(xy[:10].mean(0) - xy[10:].mean(0))
    assert between > 3 * within


def test_viz_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch, fp32_bundle, synthetic_data):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = _run_main(capsys, "viz", fp32_bundle, "--data", synthetic_data["test"],
                             "--out", tmp_path / "map.png")
    assert code == 1
    assert "pip install 'mmedge[viz]'" in err
    assert not (tmp_path / "map.png").exists()


def test_viz_rejects_an_unknown_method(tmp_path, capsys, fp32_bundle, synthetic_data):
    code, _, err = _run_main(capsys, "viz", fp32_bundle, "--data", synthetic_data["test"], "--method", "mds")
    assert code == 2 and "pca, tsne, umap" in err


# ----------------------------------------------------------------------------- emoji slice


@pytest.fixture()
def emoji_slice(tmp_path) -> Path:
    """A copy of a few emoji of the dataset (both vendors, both splits, a skin-tone family)."""
    if not (EMOJI / "captions.csv").is_file():
        pytest.skip(f"emoji dataset not found at {EMOJI}")
    with (EMOJI / "captions.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    wanted = {"1f600", "1f603", "1f44b", "1f44b-1f3fb", "1f44b-1f3ff", "1f1eb-1f1f7"}
    tests = [r["emoji_id"] for r in rows if r["split"] == "test"][:2]
    wanted |= set(tests)
    keep = [r for r in rows if r["emoji_id"] in wanted]
    dst = tmp_path / "emoji"
    for r in keep:
        (dst / r["filepath"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EMOJI / r["filepath"], dst / r["filepath"])
    with (dst / "captions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(keep)
    for name in ("emoji.csv", "tags.csv", "names.csv", "identical_images.csv"):
        shutil.copyfile(EMOJI / name, dst / name)
    return dst


def test_emoji_slice_through_the_csv_loader(tmp_path, emoji_slice, make_tiny_config):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import quality_data as qd
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # the slice as a user's CSV: relative paths, extra columns kept
    direct = load_pairs(emoji_slice / "captions.csv")
    assert {p.extra["vendor"] for p in direct.pairs} == {"twitter", "google"}
    assert all(p.image.is_file() for p in direct.pairs)

    csvs = qd.write_protocol_csvs(tmp_path / "csv", root=emoji_slice)
    style_train = load_pairs(csvs["style_train"])
    assert {p.extra["vendor"] for p in style_train.pairs} == {"twitter"}
    concept_test = load_pairs(csvs["concept_test"])
    assert concept_test.pairs and {p.extra["split"] for p in concept_test.pairs} == {"test"}
    wave = next(p for p in style_train.pairs if p.extra["emoji_id"] == "1f44b-1f3fb")
    alts = wave.extra["alt_captions"].split("|")
    assert alts and all(a.endswith(": light skin tone") for a in alts)  # tone kept in every alternative
    # positives: both vendors' images of a test emoji; one caption per image
    spec = qd.eval_spec(concept_test, root=emoji_slice)
    assert len(spec.images) == 2 * len(spec.texts)
    assert all(len(s) == 2 for s in spec.t2i) and all(len(s) == 1 for s in spec.i2t)
    # a tiny training run reads the alternative texts from the CSV column
    cfg = make_tiny_config(epochs=1, batch_size=4, alt_prob=0.5, multi_positive=True)
    cfg.pca_dim = None
    res = train(style_train, tmp_path / "run", cfg)
    assert res.metrics["n_alt_texts"] == sum(len(p.extra["alt_captions"].split("|")) for p in style_train.pairs)


@pytest.mark.parametrize("section,field,value,message", [
    ("text", "arch", "lstm", "text.arch must be one of 'transformer', 'bow'"),
    ("image", "arch", "vit", "image.arch must be one of 'conv4', 'patchres'"),
    ("image", "ibn", "yes", "image.ibn must be true or false"),
    ("stage2", "method", "gan", "stage2.method must be one of"),
    ("image", "extra_convs", 5, "image.extra_convs must be an integer from 0 to 4"),
    ("image", "extra_convs", 1.5, "image.extra_convs must be an integer from 0 to 4"),
])
def test_bad_architecture_settings_are_refused_before_anything_is_written(tmp_path, synthetic_data, capsys,
                                                                            section, field, value, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({section: {field: value}}))
    code, out, err = _run_main(capsys, "train", synthetic_data["train"], "--out", tmp_path / "run",
                               "--config", cfg, "--no-progress")
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section,field,value", [("image", "mixstyle", 1.5), ("stage2", "aug_shade", -0.1),
                                                 ("stage2", "aug_color", "often"), ("stage2", "ema", 1.0),
                                                 ("stage2", "aug_gray", 2), ("stage2", "aug_randconv", -1),
                                                 ("stage2", "aug_elastic", 1.2), ("stage2", "aug_erase", "half")])
def test_bad_style_settings_are_refused_before_anything_is_written(tmp_path, synthetic_data, capsys,
                                                                     section, field, value):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({section: {field: value}}))
    code, out, err = _run_main(capsys, "train", synthetic_data["train"], "--out", tmp_path / "run",
                               "--config", cfg, "--no-progress")
    assert code != 0
    assert f"{section}.{field} must be a number" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()

