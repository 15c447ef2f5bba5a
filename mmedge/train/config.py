"""Training configuration. One dataclass tree, stored as JSON with every checkpoint
and in the bundle manifest, so a model is rebuilt from its files, never from code
defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from mmedge.errors import TrainError


@dataclass
class ImageTowerConfig:
    image_size: int = 64  # input side in pixels (images are resized to this)
    width: int = 32  # channels of the first conv; doubled at the 2nd and 3rd stride-2 conv
    feature_dim: int = 256  # tower output (and autoencoder bottleneck) size
    # "conv4": four stride-2 3x3 convs, flattened; "patchres": 4x4 patch stem and residual
    # stages (see models.py), with `blocks` residual blocks per stage and `pool`
    # ("flatten", "mean" or "both") over the final S/16 grid
    arch: str = "conv4"
    blocks: int = 0
    pool: str = "flatten"
    # MixStyle (Zhou et al., 2021) after the first two convs of conv4: with this probability
    # per training batch, each image's per-channel feature mean and std are mixed with those
    # of another image in the batch, so the tower cannot key on one artwork's rendering
    # statistics. Training only; the exported graph does not contain it. Under torchrun each
    # process mixes within its own slice of the batch.
    mixstyle: float = 0.5
    # IBN (Pan et al., 2018): instance normalisation of half the channels after the first two
    # convs of conv4, in training and inference, so those channels lose each image's contrast
    # and brightness (artwork style) while the other half keeps absolute colour (skin tones)
    ibn: bool = False
    # conv4 only: a residual 3x3 convolution (relu(x + conv(x)), starting at zero) after each of the
    # last `extra_convs` stride-2 convs (0 to 4), for more depth at the coarse grids
    extra_convs: int = 0


@dataclass
class TextTowerConfig:
    vocab_size: int = 0  # filled in from the trained tokenizer
    # "transformer", or "bow": a bag of tokens (embeddings + an MLP of their mean; see models.py)
    arch: str = "transformer"
    max_length: int = 48  # tokens per text incl. [CLS]; longer texts are truncated
    width: int = 96  # transformer model width
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: int = 2  # hidden size of the MLP = width * mlp_ratio
    tokenizer_vocab: int = 4000  # BPE vocabulary budget when training the tokenizer


@dataclass
class Stage1Config:
    """Unsupervised pre-training of each tower (can use unpaired images and texts)."""

    enabled: bool = True  # (the default recipe, TrainConfig(), turns it off: see docs/RECIPE.md)
    image_epochs: int = 20  # denoising convolutional autoencoder
    text_epochs: int = 10  # masked-token reconstruction
    batch_size: int = 128
    lr: float = 2e-3
    noise_std: float = 0.1  # gaussian noise on normalised pixels (denoising AE)
    mask_prob: float = 0.15  # fraction of tokens masked for the text objective
    dedupe_texts: bool = True  # the text model sees each distinct text once per epoch


@dataclass
class Stage2Config:
    """Cross-modal alignment with a symmetric InfoNCE loss."""

    # "contrastive": train both towers and projections with InfoNCE; "cca": keep the
    # stage-1 towers frozen and set the projections by CCA of their features (no training)
    method: str = "contrastive"
    cca_reg: float = 1e-2  # CCA covariance ridge, relative to the mean eigenvalue
    cca_power: float = 1.0  # canonical directions weighted by correlation ** cca_power
    epochs: int = 120
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # linear warm-up, then cosine decay
    embed_dim: int = 128  # shared embedding size before PCA
    init_temperature: float = 0.07  # learnable; logit scale is clamped at 100
    # "random", or "cca": when stage 1 ran, the projection heads start at the CCA of the
    # stage-1 features on the training pairs (unit-variance canonical variates), so the
    # contrastive stage starts from an alignment instead of a random map
    head_init: str = "random"
    pretrained_lr_mult: float = 1.0  # learning-rate factor of towers that stage 1 pre-trained
    adversarial: bool = False  # add a modality discriminator behind gradient reversal
    adv_weight: float = 0.1  # weight of the discriminator loss
    adv_hidden: int = 128  # discriminator hidden size
    adv_unpaired: bool = True  # the discriminator also sees unpaired images/texts when given
    adv_unpaired_batch: int = 64  # unpaired images and texts per step for the discriminator
    # Positives: with multi_positive, pairs whose captions are equal are one concept, so two
    # images of one caption in a batch are both positives (otherwise the other is a negative).
    multi_positive: bool = True
    # Alternative texts: a data column (e.g. "alt_captions") of "|"-separated texts that also
    # describe the pair's image; each step a caption is replaced by one of them with
    # probability alt_prob. They also train the tokenizer and the stage-1 text model.
    alt_column: str = "alt_captions"
    alt_prob: float = 0.3
    text_drop: float = 0.0  # probability of dropping each word-piece token (not [CLS]) per step
    # Image augmentation that keeps colours (skin tones are colour): random zoom in
    # [1 - aug_scale, 1 + aug_scale], shift up to aug_translate of the side, rotation up to
    # aug_rotate degrees, all on a white background; a 3x3 blur with probability aug_blur.
    aug_scale: float = 0.25
    aug_translate: float = 0.12
    aug_rotate: float = 15.0
    aug_blur: float = 0.2
    # Style augmentation (probabilities per image), on the drawn content only, never on the
    # background: aug_shade multiplies it by a random linear brightness ramp (up to +-40 %,
    # the shading some artwork styles draw); aug_outline darkens its colour edges (outlines);
    # aug_color scales brightness, contrast and saturation by up to 15/20/30 % (every colour
    # alike, so the order of skin tones is kept).
    aug_shade: float = 0.5
    aug_outline: float = 0.3
    aug_color: float = 0.5
    # aug_gray: the drawing's colours replaced by their luminance (the tower must also learn
    # shapes; luminance keeps the light-to-dark order of skin tones)
    aug_gray: float = 0.0
    # aug_randconv: RandConv (Xu et al., 2021) on the drawing: a random 1x1/3x3/5x5 convolution,
    # re-standardised and blended with it (new textures and colour mixes, same shapes)
    aug_randconv: float = 0.0
    # aug_elastic: a smooth random warp (displacements drawn on a 4x4 grid of control points,
    # up to aug_elastic_strength of the side, interpolated between them) on top of the zoom,
    # shift and rotation: the same object drawn with other proportions and curves
    aug_elastic: float = 0.0
    aug_elastic_strength: float = 0.06
    # aug_erase: a random rectangle (5-25 % of the image) painted in the background colour,
    # so the tower cannot rely on one part of a drawing
    aug_erase: float = 0.0
    # Hard negatives: beta > 0 re-weights in-batch negatives by exp(beta * similarity)
    # (Robinson et al., 2021), so near misses weigh more in the loss.
    hard_negative_beta: float = 0.0
    # Weight averaging: > 0 keeps an exponential moving average of the weights with this
    # decay per step and ends with it instead of the last weights (0.995: ~200 steps).
    ema: float = 0.0


@dataclass
class TrainConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    stage1: Stage1Config = field(default_factory=lambda: Stage1Config(enabled=False))
    stage2: Stage2Config = field(default_factory=Stage2Config)
    pca_dim: int | None = None  # project embeddings to this many dims (fitted on train data)
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    resize_filter: str = "bicubic"  # Pillow filter used when an image is not image_size
    alpha_background: tuple[int, int, int] = (255, 255, 255)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config from (possibly partial) JSON: missing fields take the values of
        ``TrainConfig()``, the default recipe."""
        base = cls()
        try:
            parts = {}
            for name, kind in (("image", ImageTowerConfig), ("text", TextTowerConfig), ("stage1", Stage1Config),
                               ("stage2", Stage2Config)):
                sub = d.get(name, {})
                if not isinstance(sub, dict):
                    raise TypeError(f"{name} must be an object, got {type(sub).__name__}")
                parts[name] = kind(**{**dataclasses.asdict(getattr(base, name)), **sub})
            return cls(
                **parts,
                **{k: (tuple(v) if k == "alpha_background" else v)
                   for k, v in d.items() if k not in ("image", "text", "stage1", "stage2")},
            )
        except TypeError as e:
            raise TrainError(f"bad training config: {e}") from None


def synthetic_recipe(seed: int = 0) -> TrainConfig:
    """The recipe ``mmedge demo`` uses on the built-in synthetic shapes data, pinned
    here so that changes to the general defaults do not change the demo.
    Measured: about 2 minutes of training on 2 CPU cores, text->image R@10 = 1.0 on
    the 1,000-pair test split (see README)."""
    return TrainConfig(
        image=ImageTowerConfig(image_size=64, width=16, feature_dim=256, arch="conv4", blocks=1, pool="flatten",
                               mixstyle=0.0, ibn=False),
        text=TextTowerConfig(max_length=48, width=96, layers=2, heads=4, mlp_ratio=2, tokenizer_vocab=4000,
                             arch="transformer"),
        stage1=Stage1Config(enabled=True, image_epochs=1, text_epochs=2, batch_size=128, lr=2e-3,
                            noise_std=0.1, mask_prob=0.15, dedupe_texts=False),
        stage2=Stage2Config(method="contrastive", epochs=8, batch_size=256, lr=2e-3, weight_decay=0.05,
                            warmup_frac=0.05, embed_dim=128, init_temperature=0.07, head_init="random",
                            adversarial=False, multi_positive=False, alt_prob=0.0, text_drop=0.0,
                            aug_scale=0.0, aug_translate=0.0, aug_rotate=0.0, aug_blur=0.0,
                            aug_shade=0.0, aug_outline=0.0, aug_color=0.0, aug_gray=0.0, aug_randconv=0.0,
                            aug_elastic=0.0, aug_elastic_strength=0.06, aug_erase=0.0,
                            hard_negative_beta=0.0,
                            ema=0.0),
        pca_dim=None,
        seed=seed,
    )
