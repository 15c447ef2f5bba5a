"""The two towers, their stage-1 heads, the aligned dual encoder and the
modality discriminator. Plain layers only, so that every graph exports to ONNX
and quantises without special cases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmedge.train.config import ImageTowerConfig, TextTowerConfig


def _pool(h: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, C, g, g) -> features: ``"flatten"`` keeps the grid, ``"mean"`` averages it,
    ``"both"`` concatenates the two."""
    if mode == "flatten":
        return h.flatten(1)
    if mode == "mean":
        return h.mean((2, 3))
    return torch.cat([h.flatten(1), h.mean((2, 3))], 1)


def mix_style(h: torch.Tensor, p: float, alpha: float = 0.1) -> torch.Tensor:
    """MixStyle: with probability ``p``, normalise each (B, C, H, W) feature map by its own
    per-channel mean and std and re-scale it with a Beta(alpha, alpha) mix of its own and a
    random other sample's statistics (statistics carry no gradient, as in the paper)."""
    b = h.shape[0]
    if b < 2 or torch.rand(()) >= p:
        return h
    mu = h.mean((2, 3), keepdim=True)
    sig = (h.var((2, 3), keepdim=True) + 1e-6).sqrt()
    mu, sig = mu.detach(), sig.detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((b, 1, 1, 1))
    perm = torch.randperm(b)
    mu2 = lam * mu + (1 - lam) * mu[perm]
    sig2 = lam * sig + (1 - lam) * sig[perm]
    return (h - mu) / sig * sig2 + mu2


class _HalfInstanceNorm(nn.Module):
    """IBN-a style: affine instance norm on the first half of the channels, the rest as is."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.k = c // 2
        self.norm = nn.InstanceNorm2d(self.k, affine=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm(h[:, : self.k]), h[:, self.k :]], 1)


class _ResConv(nn.Module):
    """relu(x + conv3x3(x)) on non-negative x, the conv starting at zero, so the block starts
    as the identity and its conv still gets gradients."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv(x))


class _ConvFlatTower(nn.Module):
    """``arch="conv4"``: (B, 3, S, S) normalised pixels -> (B, feature_dim).

    Four stride-2 convolutions to a coarse S/16 grid, then ``pool``: ``"flatten"`` keeps
    the grid, so the tower can tell where things are (captions name positions); ``"mean"``
    averages it (position-free features); ``"both"`` concatenates the two.
    No batch norm: on two CPU cores it halves training speed for no gain here.
    """

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        w = cfg.width
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1)]
            if cfg.ibn and i < 2:
                layers += [_HalfInstanceNorm(cout)]
            layers += [nn.ReLU()]
            if i >= 4 - cfg.extra_convs:
                layers += [_ResConv(cout)]
        self.convs = nn.Sequential(*layers)
        self.grid = cfg.image_size // 16
        c = chans[-1]
        n = {"flatten": c * self.grid ** 2, "mean": c, "both": c * (self.grid ** 2 + 1)}
        if cfg.pool not in n:
            raise ValueError(f"pool must be one of {', '.join(n)}, got {cfg.pool!r}")
        self.pool = cfg.pool
        self.fc = nn.Linear(n[cfg.pool], cfg.feature_dim)
        self.out_channels = c
        self.mixstyle = cfg.mixstyle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        relus = 0
        for layer in self.convs:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                relus += 1
                if relus <= 2 and self.training and self.mixstyle:
                    h = mix_style(h, self.mixstyle)
        return self.fc(_pool(h, self.pool))  # (B, F), h: (B, 4w, S/16, S/16)


class _ConvFlatDecoder(nn.Module):
    """(B, feature_dim) -> (B, 3, S, S) reconstruction, mirror of _ConvFlatTower."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.grid = cfg.image_size // 16
        self.c0 = 4 * w
        self.fc = nn.Linear(cfg.feature_dim, self.c0 * self.grid * self.grid)
        chans = [4 * w, 4 * w, 2 * w, w]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.ConvTranspose2d(w, 3, 4, stride=2, padding=1)]
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, self.c0, self.grid, self.grid)
        return self.deconvs(h)



class _ResBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3, no normalisation; the second conv starts at zero
    so that every block is the identity at initialisation (stable without norm layers)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _PatchResTower(nn.Module):
    """``arch="patchres"``: a 4x4 stride-4 patch stem (S/4 grid, ``width`` channels), then
    three stages at S/4, S/8, S/16 with ``width``, 2x and 4x channels, each a stride-2 3x3
    conv (not the first) followed by ``blocks`` residual blocks; then ``pool``:
    ``"flatten"`` keeps the S/16 grid (positions), ``"mean"`` averages it,
    ``"both"`` concatenates the two. The patch stem does the full-resolution work with one
    matrix product per patch, which is several times cheaper on a CPU than a 3x3 conv at
    full resolution."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        if cfg.image_size % 16:
            raise ValueError("image_size must be a multiple of 16")
        w = cfg.width
        chans = [w, 2 * w, 4 * w]
        self.stem = nn.Conv2d(3, w, 4, stride=4)
        layers: list[nn.Module] = []
        cin = w
        for i, c in enumerate(chans):
            if i:
                layers += [nn.ReLU(), nn.Conv2d(cin, c, 3, stride=2, padding=1)]
            layers += [_ResBlock(c) for _ in range(cfg.blocks)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.pool = cfg.pool
        self.grid = cfg.image_size // 16
        n = {"flatten": 4 * w * self.grid ** 2, "mean": 4 * w, "both": 4 * w * (self.grid ** 2 + 1)}
        if cfg.pool not in n:
            raise ValueError(f"pool must be one of {', '.join(n)}, got {cfg.pool!r}")
        self.fc = nn.Linear(n[cfg.pool], cfg.feature_dim)
        self.out_channels = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.body(self.stem(x)))  # (B, 4w, S/16, S/16)
        return self.fc(_pool(h, self.pool))  # (B, F)


class _PatchResDecoder(nn.Module):
    """(B, feature_dim) -> (B, 3, S, S), mirror of _PatchResTower (no residual blocks)."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.grid = cfg.image_size // 16
        self.c0 = 4 * w
        self.fc = nn.Linear(cfg.feature_dim, self.c0 * self.grid * self.grid)
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w, 3, 4, stride=4),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, self.c0, self.grid, self.grid)
        return self.deconvs(h)


IMAGE_ARCHS = ("conv4", "patchres")
TEXT_ARCHS = ("transformer", "bow")


def ImageTower(cfg: ImageTowerConfig) -> nn.Module:  # noqa: N802 - a factory standing in for a class
    """(B, 3, S, S) normalised pixels -> (B, feature_dim), by ``cfg.arch``."""
    if cfg.arch == "conv4":
        return _ConvFlatTower(cfg)
    if cfg.arch == "patchres":
        if cfg.ibn or cfg.extra_convs:
            raise ValueError("image.ibn and image.extra_convs are built for arch conv4 only")
        return _PatchResTower(cfg)
    raise ValueError(f"image arch must be one of {', '.join(IMAGE_ARCHS)}, got {cfg.arch!r}")


def ImageDecoder(cfg: ImageTowerConfig) -> nn.Module:  # noqa: N802
    """The stage-1 decoder that mirrors ``ImageTower(cfg)``."""
    return _ConvFlatDecoder(cfg) if cfg.arch == "conv4" else _PatchResDecoder(cfg)


class _Block(nn.Module):
    """Pre-norm transformer block with hand-written attention (exports to plain MatMuls)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * mlp_ratio)
        self.fc2 = nn.Linear(width * mlp_ratio, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, d/H)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h)) + bias  # (B, H, T, T)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TextTower(nn.Module):
    """(B, T) token ids + (B, T) mask -> per-token states (B, T, W) and pooled (B, W).

    ``arch="transformer"``: learned positions and pre-norm transformer blocks.
    ``arch="bow"``: a bag of tokens: each token's embedding plus an MLP of the masked mean
    of all of them (no order, no attention), so its cost is one gather and a few small MLPs
    per text instead of attention and MLPs per token.
    """

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("TextTowerConfig.vocab_size must be set from the tokenizer")
        if cfg.arch not in TEXT_ARCHS:
            raise ValueError(f"text arch must be one of {', '.join(TEXT_ARCHS)}, got {cfg.arch!r}")
        self.arch = cfg.arch
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        if self.arch == "transformer":
            self.pos = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.width))
            nn.init.normal_(self.pos, std=0.02)
            self.blocks = nn.ModuleList(
                [_Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)]
            )
        else:
            hidden = cfg.width * cfg.mlp_ratio
            self.mix = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, hidden), nn.GELU(),
                                     nn.Linear(hidden, cfg.width))
        self.ln = nn.LayerNorm(cfg.width)
        self.feature_dim = cfg.width

    def states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.arch == "bow":
            x = self.tok(ids)  # (B, T, W)
            m = mask[:, :, None].to(x.dtype)
            bag = (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, W)
            return self.ln(x + self.mix(bag)[:, None])
        t = ids.shape[1]
        x = self.tok(ids) + self.pos[:, :t]  # (B, T, W)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4  # (B, 1, 1, T)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.ln(x)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.states(ids, mask)
        m = mask[:, :, None].to(x.dtype)  # (B, T, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # masked mean, (B, W)


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return -ctx.lam * g, None


class ModalityDiscriminator(nn.Module):
    """Guesses whether an embedding came from an image (1) or a text (0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, e: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
        return self.net(GradReverse.apply(e, lam)).squeeze(-1)


class DualEncoder(nn.Module):
    """Image and text towers with projection heads into one L2-normalised space,
    plus an optional PCA (mean, components) folded into both encoders."""

    def __init__(self, icfg: ImageTowerConfig, tcfg: TextTowerConfig, embed_dim: int,
                 init_temperature: float = 0.07, pca_dim: int | None = None) -> None:
        super().__init__()
        self.image_tower = ImageTower(icfg)
        self.text_tower = TextTower(tcfg)
        self.image_proj = nn.Linear(icfg.feature_dim, embed_dim)
        self.text_proj = nn.Linear(tcfg.width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        k = pca_dim or 0
        self.register_buffer("pca_mean", torch.zeros(embed_dim if k else 0))
        self.register_buffer("pca_components", torch.zeros(embed_dim if k else 0, k))

    @property
    def out_dim(self) -> int:
        return self.pca_components.shape[1] if self.pca_components.numel() else self.image_proj.out_features

    def _finish(self, z: torch.Tensor, use_pca: bool = True) -> torch.Tensor:
        e = F.normalize(z, dim=-1)
        if use_pca and self.pca_components.numel():
            e = F.normalize((e - self.pca_mean) @ self.pca_components, dim=-1)
        return e

    def encode_image(self, pixels: torch.Tensor, use_pca: bool = True) -> torch.Tensor:
        return self._finish(self.image_proj(self.image_tower(pixels)), use_pca)  # (B, D)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, use_pca: bool = True) -> torch.Tensor:
        return self._finish(self.text_proj(self.text_tower(ids, mask)), use_pca)  # (B, D)


class ImageExport(nn.Module):
    """Graph exported as image.onnx: pixel_values -> embedding."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class TextExport(nn.Module):
    """Graph exported as text.onnx: (input_ids, attention_mask) -> embedding."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)
