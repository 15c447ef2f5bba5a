"""The training pipeline: stage 1 (per-modality autoencoders), stage 2
(contrastive alignment, optionally adversarial), PCA.

A run folder holds everything export needs::

    RUN/tokenizer.json      the trained tokenizer
    RUN/preprocess.json     image preprocessing (size, filter, mean/std from the data)
    RUN/config.json         the TrainConfig
    RUN/model.pt            DualEncoder weights (a state dict of tensors only)
    RUN/metrics.json        validation figures and timings
    RUN/stage1/image.pt, RUN/stage1/text.pt, RUN/stage2/checkpoint.pt   checkpoints

Every checkpoint is a dict of tensors, numbers and strings (the config as JSON)
and is read back with ``torch.load(weights_only=True)``. Each stage checkpoints
after every epoch and resumes from there; a stage whose inputs (config, data,
seed) are unchanged is reused, so changing only stage 2 does not re-run stage 1.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from mmedge.data import LoadResult, load_pairs
from mmedge.errors import TrainError
from mmedge.runtime.preprocess import PreprocessConfig, load_image, to_uint8
from mmedge.runtime.tokenizer import TextTokenizer
from mmedge.train.config import TrainConfig
from mmedge.train.distributed import DistContext
from mmedge.train.models import DualEncoder, ImageDecoder, ImageTower, ModalityDiscriminator, TextTower
from mmedge.train.tokenizer import MASK_ID, PAD_ID, train_tokenizer

log = logging.getLogger(__name__)

# on_progress(stage, step, total, metrics): called after every optimiser step and at stage ends.
ProgressFn = Callable[[str, int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    run_dir: Path
    config: TrainConfig
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tensors:
    """A dataset in memory: uint8 pixels (N, S, S, 3) and padded token ids/mask (N, T)."""

    pixels: np.ndarray
    ids: np.ndarray
    mask: np.ndarray


# ---------------------------------------------------------------------------- helpers


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# The torch.distributed context of the running train() call (single process by default).
# Only rank 0 writes files; every rank computes (see mmedge/train/distributed.py).
_CTX = DistContext()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    if not _CTX.is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    if not _CTX.is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_ckpt(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise TrainError(f"{path}: unreadable checkpoint ({e.__class__.__name__}: {e})") from None


def load_images_uint8(paths: Sequence[Path], cfg: PreprocessConfig) -> np.ndarray:
    """Decode and resize images exactly as the runtime does -> (N, S, S, 3) uint8."""
    out = np.empty((len(paths), cfg.size[0], cfg.size[1], 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = to_uint8(load_image(p, cfg), cfg)
    return out


def _normalize(pixels_u8: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, the same arithmetic as the runtime."""
    x = torch.from_numpy(pixels_u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg.mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(cfg.std, dtype=torch.float32)[None, :, None, None]
    return (x - mean) / std


def _batches(n: int, batch_size: int, seed: int, tag: int, epoch: int, drop_last: bool) -> Iterator[np.ndarray]:
    perm = np.random.default_rng([seed, tag, epoch]).permutation(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for s in range(0, stop, batch_size):
        yield perm[s : s + batch_size]


def _lr_at(step: int, total: int, base: float, warmup_frac: float) -> float:
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return base * (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


def _trim(ids: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(1, int(mask.sum(1).max()))
    return torch.from_numpy(ids[:, :t]), torch.from_numpy(mask[:, :t])


def _run_epochs(
    name: str,
    ckpt_path: Path,
    key: str,
    modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    base_lr: float,
    warmup_frac: float,
    epoch_batches: Callable[[int], Iterator[Any]],
    step: Callable[[Any], dict[str, torch.Tensor]],
    on_progress: ProgressFn | None,
    end_of_epoch: Callable[[int], dict[str, float]] | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Generic resumable loop: checkpoint after every epoch, resume from the last one."""
    start = 0
    ck = _load_ckpt(ckpt_path)
    if ck is not None and ck.get("key") == key:
        for n, m in modules.items():
            m.load_state_dict(ck["modules"][n])
        opt.load_state_dict(ck["opt"])
        if "torch_rng" in ck:  # training-time randomness drawn from torch's generator (MixStyle)
            torch.set_rng_state(ck["torch_rng"])
        start = int(ck["epoch"]) + 1
        log.info("%s: resuming after epoch %d", name, start)
    total = epochs * steps_per_epoch
    last: dict[str, float] = {}
    # Under torchrun the step runs inside DistributedDataParallel (gradient averaging);
    # each rank gets its slice of the global batch. Single process: a plain call.
    runner = _CTX.wrap(_StepModule(modules, step))
    for epoch in range(start, epochs):
        for m in modules.values():
            m.train()
        for i, batch in enumerate(epoch_batches(epoch)):
            gstep = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = _lr_at(gstep, total, base_lr, warmup_frac) * g.get("lr_mult", 1.0)
            losses = runner(_shard(batch))
            opt.zero_grad(set_to_none=True)
            losses.get("loss_backward", losses["loss"]).backward()
            opt.step()
            if after_step is not None:
                after_step()
            # logged values: each rank's share is defined so that the mean over ranks is
            # the global figure (see the stage steps)
            last = {k: _CTX.mean(float(v.detach())) for k, v in losses.items() if k != "loss_backward"}
            if on_progress:
                on_progress(name, gstep + 1, total, last)
        if end_of_epoch is not None:
            last.update(end_of_epoch(epoch))
            if on_progress:
                on_progress(name, (epoch + 1) * steps_per_epoch, total, last)
        _atomic_torch_save(
            {"key": key, "epoch": epoch, "modules": {n: m.state_dict() for n, m in modules.items()},
             "opt": opt.state_dict(), "torch_rng": torch.get_rng_state()},
            ckpt_path,
        )
    return last


class _StepModule(nn.Module):
    """One training step as a module, so DistributedDataParallel can wrap it: its
    parameters are the stage's modules, its forward the step function."""

    def __init__(self, modules: dict[str, nn.Module], step: Callable[[Any], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self._step = step

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self._step(batch)


def _shard(batch: Any) -> Any:
    """This rank's rows of every tensor in a (nested) global batch; identity in one process."""
    if not _CTX.enabled:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            return batch
        return torch.tensor_split(batch, _CTX.world)[_CTX.rank]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_shard(b) for b in batch)
    return batch


# ---------------------------------------------------------------------------- stages


def _stage1_image(cfg: TrainConfig, pixels_u8: np.ndarray, pcfg: PreprocessConfig, run: Path,
                  on_progress: ProgressFn | None) -> tuple[dict[str, torch.Tensor], str]:
    s1 = cfg.stage1
    key = _digest("image-ae", cfg.image, s1, cfg.seed, pixels_u8[:: max(1, len(pixels_u8) // 256)], len(pixels_u8))
    final = run / "stage1" / "image.pt"
    ck = _load_ckpt(final)
    if ck is not None and ck.get("key") == key and ck.get("done"):
        return ck["modules"]["tower"], key
    torch.manual_seed(cfg.seed)
    tower, dec = ImageTower(cfg.image), ImageDecoder(cfg.image)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(dec.parameters()), lr=s1.lr, weight_decay=1e-4)
    n = len(pixels_u8)
    spe = math.ceil(n / s1.batch_size)

    def batches(epoch: int) -> Iterator[Any]:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        for idx in _batches(n, s1.batch_size, cfg.seed, 1, epoch, drop_last=False):
            x = _normalize(pixels_u8[idx], pcfg)
            yield x, x + s1.noise_std * torch.randn(x.shape, generator=g)

    def step(b: Any) -> dict[str, torch.Tensor]:
        clean, noisy = b
        return {"loss": F.mse_loss(dec(tower(noisy)), clean)}

    _run_epochs("stage1-image", run / "stage1" / "image.ckpt", key, {"tower": tower, "dec": dec}, opt,
                s1.image_epochs, spe, s1.lr, 0.05, batches, step, on_progress)
    _atomic_torch_save({"key": key, "done": True, "config": cfg.to_json(),
                        "modules": {"tower": tower.state_dict()}}, final)
    return tower.state_dict(), key


def _stage1_text(cfg: TrainConfig, ids: np.ndarray, mask: np.ndarray, run: Path,
                 on_progress: ProgressFn | None) -> tuple[dict[str, torch.Tensor], str]:
    s1 = cfg.stage1
    key = _digest("text-mlm", cfg.text, s1, cfg.seed, ids)
    final = run / "stage1" / "text.pt"
    ck = _load_ckpt(final)
    if ck is not None and ck.get("key") == key and ck.get("done"):
        return ck["modules"]["tower"], key
    torch.manual_seed(cfg.seed + 1)
    tower = TextTower(cfg.text)
    head = nn.Linear(cfg.text.width, cfg.text.vocab_size)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=s1.lr, weight_decay=0.01)
    n = len(ids)
    spe = math.ceil(n / s1.batch_size)

    def batches(epoch: int) -> Iterator[Any]:
        g = torch.Generator().manual_seed(cfg.seed * 104729 + epoch)
        for idx in _batches(n, s1.batch_size, cfg.seed, 2, epoch, drop_last=False):
            tid, tmask = _trim(ids[idx], mask[idx])
            # mask real tokens except [CLS] (position 0); at least one per row
            cand = tmask.bool().clone()
            cand[:, 0] = False
            pick = (torch.rand(tid.shape, generator=g) < s1.mask_prob) & cand
            first = cand.float().argmax(1)
            pick[torch.arange(len(pick)), first] |= cand[torch.arange(len(pick)), first]
            n_pick = torch.full((len(pick),), float(pick.sum()))  # global count, on every row
            yield tid.masked_fill(pick, MASK_ID), tmask, tid, pick, n_pick

    def step(b: Any) -> dict[str, torch.Tensor]:
        inp, tmask, target, pick, n_pick = b
        logits = head(tower.states(inp, tmask)[pick])  # (masked tokens, V): only where it is scored
        # sum over this rank's masked tokens / all ranks' count, times the world size:
        # DDP's gradient average then equals the mean over the global batch
        loss = F.cross_entropy(logits, target[pick], reduction="sum") / n_pick[0] * _CTX.loss_scale
        return {"loss": loss}

    _run_epochs("stage1-text", run / "stage1" / "text.ckpt", key, {"tower": tower, "head": head}, opt,
                s1.text_epochs, spe, s1.lr, 0.05, batches, step, on_progress)
    _atomic_torch_save({"key": key, "done": True, "config": cfg.to_json(),
                        "modules": {"tower": tower.state_dict()}}, final)
    return tower.state_dict(), key


@torch.no_grad()
def embed_all(model: DualEncoder, data: Tensors, pcfg: PreprocessConfig, use_pca: bool = True,
              batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) image and text embeddings of a dataset held in memory."""
    model.eval()
    img, txt = [], []
    for s in range(0, len(data.pixels), batch_size):
        img.append(model.encode_image(_normalize(data.pixels[s : s + batch_size], pcfg), use_pca))
        tid, tmask = _trim(data.ids[s : s + batch_size], data.mask[s : s + batch_size])
        txt.append(model.encode_text(tid, tmask, use_pca))
    return torch.cat(img).numpy(), torch.cat(txt).numpy()


def quick_recall(img: np.ndarray, txt: np.ndarray, k: int = 10) -> dict[str, float]:
    """Paired recall@k both ways (query i's only positive is item i)."""
    sim = txt @ img.T
    diag = np.diag(sim)[:, None]
    t2i = float(((sim > diag).sum(1) < k).mean())
    i2t = float(((sim.T > diag).sum(1) < k).mean())
    return {f"val_t2i_R@{k}": t2i, f"val_i2t_R@{k}": i2t}


@dataclass
class AltTexts:
    """Alternative texts of the training pairs, tokenised: pair i's texts are rows
    ``start[i]:start[i + 1]`` of ``ids``/``mask``."""

    ids: np.ndarray
    mask: np.ndarray
    start: np.ndarray


@dataclass
class Unpaired:
    """Unpaired images (uint8, as in :class:`Tensors`) and tokenised unpaired texts."""

    pixels: np.ndarray
    ids: np.ndarray
    mask: np.ndarray


def _white(pcfg: PreprocessConfig) -> torch.Tensor:
    bg = torch.tensor([v / 255.0 for v in pcfg.alpha_background], dtype=torch.float32)
    mean = torch.tensor(pcfg.mean, dtype=torch.float32)
    std = torch.tensor(pcfg.std, dtype=torch.float32)
    return ((bg - mean) / std)[None, :, None, None]  # (1, 3, 1, 1)


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """Separable [1, 2, 1] / 4 blur with replicated edges, (B, C, H, W)."""
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h = xp[..., :, :-2] + 2.0 * xp[..., :, 1:-1] + xp[..., :, 2:]
    return (h[..., :-2, :] + 2.0 * h[..., 1:-1, :] + h[..., 2:, :]) * (1.0 / 16.0)


def _norm_stats(pcfg: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the pixel normalisation, each (1, 3, 1, 1)."""
    return (torch.tensor(pcfg.mean, dtype=torch.float32)[None, :, None, None],
            torch.tensor(pcfg.std, dtype=torch.float32)[None, :, None, None])


def _uses_style_aug(s2: Any) -> bool:
    return bool(s2.aug_shade or s2.aug_outline or s2.aug_color or s2.aug_gray or s2.aug_randconv)


def _style_augment(x: torch.Tensor, s2: Any, background: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor],
                   g: torch.Generator) -> torch.Tensor:
    """Shading ramps, colour scaling and outlines (see Stage2Config) on the drawn content of
    normalised pixels (B, 3, S, S); pixels of the background colour stay as they are."""
    mean, std = norm
    b, _, hgt, wid = x.shape
    v = x * std + mean  # 0..1
    bg = background * std + mean
    content = ((v - bg).abs().sum(1, keepdim=True) > 0.03).to(x.dtype)  # (B, 1, H, W)
    if s2.aug_shade:
        on = (torch.rand(b, generator=g) < s2.aug_shade).to(x.dtype)
        ang = torch.rand(b, generator=g) * (2.0 * math.pi)
        amp = (torch.rand(b, generator=g) * 0.8 - 0.4) * on
        ys = torch.linspace(-1.0, 1.0, hgt).view(1, hgt, 1)
        xs = torch.linspace(-1.0, 1.0, wid).view(1, 1, wid)
        ramp = torch.cos(ang).view(b, 1, 1) * xs + torch.sin(ang).view(b, 1, 1) * ys  # (B, H, W)
        v = v * (1.0 + content * (amp.view(b, 1, 1) * ramp)[:, None])
    if s2.aug_color:
        on = (torch.rand(b, generator=g) < s2.aug_color).to(x.dtype).view(b, 1, 1, 1)
        u = torch.rand(b, 3, generator=g) * 2.0 - 1.0
        bri, con, sat = ((1.0 + f * u[:, i]).view(b, 1, 1, 1) for i, f in enumerate((0.15, 0.2, 0.3)))
        grey = v.mean(1, keepdim=True)
        avg = (grey * content).sum((2, 3), keepdim=True) / content.sum((2, 3), keepdim=True).clamp(min=1.0)
        w = ((grey + sat * (v - grey)) - avg) * con * bri + avg * bri
        v = v + on * content * (w - v)
    if s2.aug_outline:
        on = (torch.rand(b, generator=g) < s2.aug_outline).to(x.dtype).view(b, 1, 1, 1)
        lum = v.mean(1, keepdim=True)
        spread = F.max_pool2d(lum, 3, 1, 1) + F.max_pool2d(-lum, 3, 1, 1)  # local max - min
        rim = F.max_pool2d(content, 3, 1, 1) - content  # background pixels touching the drawing
        edge = ((spread > 0.2).to(x.dtype) * content + rim).clamp(max=1.0)
        strength = (0.4 + 0.5 * torch.rand(b, generator=g)).view(b, 1, 1, 1)
        v = v * (1.0 - on * strength * edge)
    if s2.aug_gray:
        on = (torch.rand(b, generator=g) < s2.aug_gray).to(x.dtype).view(b, 1, 1, 1)
        lum = (v * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        v = v + on * content * (lum - v)
    if s2.aug_randconv:
        # RandConv (Xu et al., 2021): a random 1x1, 3x3 or 5x5 convolution per image (Gaussian
        # weights), re-standardised to the drawing's mean and spread, blended with the image
        on = (torch.rand(b, generator=g) < s2.aug_randconv).to(x.dtype).view(b, 1, 1, 1)
        k = (1, 3, 5)[int(torch.randint(0, 3, (1,), generator=g))]
        w = torch.randn(b * 3, 3, k, k, generator=g) / math.sqrt(3 * k * k)
        r = F.conv2d(v.reshape(1, b * 3, hgt, wid), w, padding=k // 2, groups=b).reshape(b, 3, hgt, wid)
        n = content.sum((1, 2, 3), keepdim=True).clamp(min=1.0) * 3
        mu_v, mu_r = (v * content).sum((1, 2, 3), keepdim=True) / n, (r * content).sum((1, 2, 3), keepdim=True) / n
        sd_v = (((v - mu_v) * content) ** 2).sum((1, 2, 3), keepdim=True).div(n).sqrt()
        sd_r = (((r - mu_r) * content) ** 2).sum((1, 2, 3), keepdim=True).div(n).sqrt().clamp(min=1e-6)
        r = (r - mu_r) / sd_r * sd_v + mu_v
        alpha = torch.rand(b, 1, 1, 1, generator=g)
        v = v + on * content * ((alpha * v + (1.0 - alpha) * r) - v)
    return (v.clamp(0.0, 1.0) - mean) / std


def _elastic_field(b: int, hgt: int, wid: int, s2: Any, g: torch.Generator) -> torch.Tensor:
    """(B, H, W, 2) smooth displacements in grid units (2 per side) for ``aug_elastic``:
    uniform in +-2*strength on a 4x4 grid of control points, bicubically interpolated (which
    overshoots them by up to about a quarter); images not picked (probability 1 - aug_elastic)
    get zero."""
    on = (torch.rand(b, generator=g) < s2.aug_elastic).to(torch.float32).view(b, 1, 1, 1)
    ctrl = (torch.rand(b, 2, 4, 4, generator=g) * 2.0 - 1.0) * (2.0 * s2.aug_elastic_strength) * on
    field = F.interpolate(ctrl, size=(hgt, wid), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def _erase(x: torch.Tensor, p: float, background: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random erasing: with probability ``p`` per image, one rectangle covering 5-25 % of the
    image (aspect ratio 1/2 to 2) is painted in the background colour."""
    b, _, hgt, wid = x.shape
    area = (0.05 + 0.2 * torch.rand(b, generator=g)) * (hgt * wid)
    aspect = torch.exp((torch.rand(b, generator=g) * 2.0 - 1.0) * math.log(2.0))
    rh = (area * aspect).sqrt().clamp(1, hgt)
    rw = (area / aspect).sqrt().clamp(1, wid)
    y0 = torch.rand(b, generator=g) * (hgt - rh)
    x0 = torch.rand(b, generator=g) * (wid - rw)
    on = torch.rand(b, generator=g) < p
    ys = torch.arange(hgt, dtype=torch.float32).view(1, hgt, 1)
    xs = torch.arange(wid, dtype=torch.float32).view(1, 1, wid)
    box = ((ys >= y0.view(b, 1, 1)) & (ys < (y0 + rh).view(b, 1, 1))
           & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + rw).view(b, 1, 1)) & on.view(b, 1, 1))
    return torch.where(box[:, None], background.to(x.dtype).expand_as(x), x)


def augment_images(x: torch.Tensor, s2: Any, background: torch.Tensor, g: torch.Generator,
                   norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Augmentation of normalised pixels (B, 3, S, S): random zoom, shift and rotation on the
    background colour (with ``aug_elastic`` a smooth local warp as well), random erasing to the
    background colour, an occasional 3x3 blur, and the optional style augmentation
    (``norm`` = (mean, std) of the normalisation, needed for it). Hues are never changed,
    so skin tones keep their meaning."""
    b = x.shape[0]
    if _uses_style_aug(s2):
        if norm is None:
            raise ValueError("style augmentation needs the normalisation (mean, std)")
        x = _style_augment(x, s2, background, norm, g)
    if s2.aug_scale or s2.aug_translate or s2.aug_rotate or s2.aug_elastic:
        u = torch.rand(b, 4, generator=g) * 2.0 - 1.0
        zoom = 1.0 + s2.aug_scale * u[:, 0]  # > 1 enlarges the content
        ang = u[:, 1] * (s2.aug_rotate * math.pi / 180.0)
        cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
        shift = 2.0 * s2.aug_translate * u[:, 2:]  # grid coordinates span 2 per side
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if s2.aug_elastic:
            grid = grid + _elastic_field(b, x.shape[2], x.shape[3], s2, g)
        x = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) + background
    if s2.aug_erase:
        x = _erase(x, s2.aug_erase, background, g)
    if s2.aug_blur:
        pick = torch.nonzero(torch.rand(b, generator=g) < s2.aug_blur).squeeze(1)
        if len(pick):
            x = x.clone()
            x[pick] = _blur3(x[pick])
    return x


def contrastive_loss(ie: torch.Tensor, te: torch.Tensor, scale: torch.Tensor, concept: torch.Tensor | None,
                     beta: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch. ``concept`` (B,) marks pairs of one concept as
    positives of each other (multi-positive); ``beta`` > 0 up-weights hard negatives."""
    logits = scale * ie @ te.T  # (B, B)
    if concept is None and not beta:
        tgt = torch.arange(len(ie))
        return 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
    pos = (concept[:, None] == concept[None, :]) if concept is not None else torch.eye(len(ie), dtype=torch.bool)
    total = logits.new_zeros(())
    for lg in (logits, logits.T):
        adj = lg
        if beta:
            neg = ~pos
            w = (beta * lg.detach() / scale.detach()).masked_fill(pos, float("-inf"))
            n_neg = neg.sum(1, keepdim=True).clamp(min=1)
            logw = w - torch.logsumexp(w, 1, keepdim=True) + torch.log(n_neg.to(lg.dtype))
            adj = lg + torch.where(neg, logw, torch.zeros_like(lg))
        num = torch.logsumexp(lg.masked_fill(~pos, float("-inf")), 1)
        total = total + (torch.logsumexp(adj, 1) - num).mean()
    return 0.5 * total


def _concepts(captions: Sequence[str]) -> np.ndarray:
    ids: dict[str, int] = {}
    return np.asarray([ids.setdefault(c, len(ids)) for c in captions], dtype=np.int64)


def _stage2(cfg: TrainConfig, train: Tensors, val: Tensors | None, pcfg: PreprocessConfig,
            image_init: dict[str, torch.Tensor] | None, text_init: dict[str, torch.Tensor] | None,
            init_key: str, run: Path, on_progress: ProgressFn | None, *,
            concept: np.ndarray | None = None, alts: AltTexts | None = None,
            unpaired: Unpaired | None = None) -> DualEncoder:
    s2 = cfg.stage2
    torch.manual_seed(cfg.seed + 2)
    model = DualEncoder(cfg.image, cfg.text, s2.embed_dim, s2.init_temperature, pca_dim=None)
    if image_init is not None:
        model.image_tower.load_state_dict(image_init)
    if text_init is not None:
        model.text_tower.load_state_dict(text_init)
    if s2.head_init == "cca" and image_init is not None and text_init is not None:
        _cca_heads(model, train, pcfg, s2.cca_reg)
    elif s2.head_init not in ("random", "cca"):
        raise TrainError(f"stage2.head_init must be 'random' or 'cca', got {s2.head_init!r}")
    disc = ModalityDiscriminator(s2.embed_dim, s2.adv_hidden) if s2.adversarial else None
    modules: dict[str, nn.Module] = {"model": model}
    params = list(model.parameters())
    if disc is not None:
        modules["disc"] = disc
        params += list(disc.parameters())
    slow: set[int] = set()  # stage-1 towers train at lr * pretrained_lr_mult
    if s2.pretrained_lr_mult != 1.0:
        for tower, init in ((model.image_tower, image_init), (model.text_tower, text_init)):
            if init is not None:
                slow |= {id(p) for p in tower.parameters()}
    groups = []
    for is_slow in (False, True):
        mult = s2.pretrained_lr_mult if is_slow else 1.0
        sel = [p for p in params if (id(p) in slow) == is_slow]
        for wd, ps in ((s2.weight_decay, [p for p in sel if p.ndim >= 2]), (0.0, [p for p in sel if p.ndim < 2])):
            if ps or not is_slow:
                groups.append({"params": ps, "weight_decay": wd, "lr_mult": mult})
    opt = torch.optim.AdamW(groups, lr=s2.lr)
    n = len(train.pixels)
    if n < 2:
        raise TrainError(f"stage 2 needs at least 2 training pairs, got {n}")
    bs = min(s2.batch_size, n)
    spe = n // bs
    if bs % _CTX.world:
        raise TrainError(f"stage-2 batch {bs} is not divisible by {_CTX.world} processes")
    use_alts = alts is not None and s2.alt_prob > 0 and len(alts.ids) > 0
    adv_unpaired = disc is not None and s2.adv_unpaired and unpaired is not None
    extra_key = [] if not (s2.multi_positive or use_alts or adv_unpaired) else [
        concept if s2.multi_positive else None,
        alts.ids if use_alts else None, alts.start if use_alts else None,
        (unpaired.ids, unpaired.pixels[:: max(1, len(unpaired.pixels) // 256)], len(unpaired.pixels))
        if adv_unpaired else None]
    key = _digest("stage2", s2, cfg.image, cfg.text, cfg.seed, init_key, train.ids, n, *extra_key)
    augment = bool(s2.aug_scale or s2.aug_translate or s2.aug_rotate or s2.aug_blur) or _uses_style_aug(s2)
    background = _white(pcfg)
    norm = _norm_stats(pcfg)
    n_alt = np.diff(alts.start) if use_alts else None

    def batches(epoch: int) -> Iterator[Any]:
        g = torch.Generator().manual_seed(cfg.seed * 15485863 + epoch)
        rng = np.random.default_rng([cfg.seed, 5, epoch])
        for idx in _batches(n, bs, cfg.seed, 3, epoch, drop_last=True):
            px = _normalize(train.pixels[idx], pcfg)
            if augment:
                px = augment_images(px, s2, background, g, norm)
            ids, mask = train.ids[idx], train.mask[idx]
            if use_alts:
                assert alts is not None and n_alt is not None
                swap = (rng.random(len(idx)) < s2.alt_prob) & (n_alt[idx] > 0)
                if swap.any():
                    rows = alts.start[idx[swap]] + (rng.random(int(swap.sum())) * n_alt[idx[swap]]).astype(np.int64)
                    ids, mask = ids.copy(), mask.copy()
                    ids[swap], mask[swap] = alts.ids[rows], alts.mask[rows]
            tid, tmask = _trim(ids, mask)
            if s2.text_drop:
                drop = (torch.rand(tid.shape, generator=g) < s2.text_drop) & tmask.bool()
                drop[:, 0] = False
                keep = (tmask.bool() & ~drop)
                keep[:, 0] = True
                tmask = tmask * keep.long()
            cid = torch.from_numpy(concept[idx]) if (s2.multi_positive and concept is not None) else None
            extra = None
            if adv_unpaired:
                assert unpaired is not None
                ub = max(1, min(bs, s2.adv_unpaired_batch))
                ui = rng.integers(0, len(unpaired.pixels), ub) if len(unpaired.pixels) else None
                ut = rng.integers(0, len(unpaired.ids), ub) if len(unpaired.ids) else None
                upx = _normalize(unpaired.pixels[ui], pcfg) if ui is not None else None
                if upx is not None and augment:
                    upx = augment_images(upx, s2, background, g, norm)
                utx = _trim(unpaired.ids[ut], unpaired.mask[ut]) if ut is not None else None
                extra = (upx, utx)
            yield px, tid, tmask, cid, extra

    def step(b: Any) -> dict[str, torch.Tensor]:
        px, tid, tmask, cid, extra = b
        ie = model.encode_image(px, use_pca=False)  # (B, E), this rank's rows
        te = model.encode_text(tid, tmask, use_pca=False)  # (B, E)
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
        # over the global batch: all ranks' embeddings, gradients flowing into this rank's
        clip = contrastive_loss(_CTX.gather(ie), _CTX.gather(te), scale,
                                _CTX.gather(cid) if cid is not None else None, s2.hard_negative_beta)
        out = {"loss": clip, "clip": clip.detach(), "temp": (1.0 / scale).detach()}
        if _CTX.enabled:
            out["loss_backward"] = clip * _CTX.loss_scale
        if disc is not None:
            imgs, txts = [ie], [te]
            if extra is not None:
                upx, utx = extra
                if upx is not None:
                    imgs.append(model.encode_image(upx, use_pca=False))
                if utx is not None:
                    txts.append(model.encode_text(*utx, use_pca=False))
            ia, ta = torch.cat(imgs), torch.cat(txts)
            both = torch.cat([ia, ta])
            lab = torch.cat([torch.ones(len(ia)), torch.zeros(len(ta))])
            adv = F.binary_cross_entropy_with_logits(disc(both, 1.0), lab)
            out["loss"] = clip + s2.adv_weight * adv
            out["adv"] = adv.detach()
            if _CTX.enabled:
                out["loss_backward"] = clip * _CTX.loss_scale + s2.adv_weight * adv
        return out

    # weight averaging: an exponential moving average of the weights, checkpointed with the
    # run, replaces them at the end (and is what the per-epoch validation scores)
    ema: DualEncoder | None = None
    if s2.ema:
        ema = copy.deepcopy(model)
        for p in ema.parameters():
            p.requires_grad_(False)
        modules["ema"] = ema

    @torch.no_grad()
    def ema_update() -> None:
        assert ema is not None
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - s2.ema)

    def end_of_epoch(epoch: int) -> dict[str, float]:
        if val is None or len(val.pixels) < 2:
            return {}
        img, txt = embed_all(ema if ema is not None else model, val, pcfg, use_pca=False)
        return quick_recall(img, txt)

    _run_epochs("stage2", run / "stage2" / "checkpoint.pt", key, modules, opt, s2.epochs, spe, s2.lr,
                s2.warmup_frac, batches, step, on_progress, end_of_epoch,
                after_step=ema_update if ema is not None else None)
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    model.eval()
    return model


@torch.no_grad()
def tower_features(model_or_towers: Any, data: Tensors, pcfg: PreprocessConfig,
                   batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) image-tower and (N, W) pooled text-tower features (before the projections)."""
    it, tt = model_or_towers
    it.eval()
    tt.eval()
    img, txt = [], []
    for s in range(0, len(data.pixels), batch_size):
        img.append(it(_normalize(data.pixels[s : s + batch_size], pcfg)))
        txt.append(tt(*_trim(data.ids[s : s + batch_size], data.mask[s : s + batch_size])))
    return torch.cat(img).double().numpy(), torch.cat(txt).double().numpy()


def fit_cca(x: np.ndarray, y: np.ndarray, dim: int, reg: float = 1e-3, power: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA of paired rows ``x`` (N, dx) and ``y`` (N, dy).

    Returns ``(mean_x, A, mean_y, B, corr)``: ``(x - mean_x) @ A`` and ``(y - mean_y) @ B``
    are the first ``dim`` canonical variates, each column scaled by its canonical
    correlation to the power ``power`` (so better-correlated directions weigh more in a
    cosine). ``reg`` is a ridge on each covariance, relative to its mean eigenvalue.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n = len(x)

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        c = c + reg * (np.trace(c) / len(c)) * np.eye(len(c))
        w, v = np.linalg.eigh(c)
        return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T

    wx = inv_sqrt(xc.T @ xc / n)
    wy = inv_sqrt(yc.T @ yc / n)
    u, corr, vt = np.linalg.svd(wx @ (xc.T @ yc / n) @ wy, full_matrices=False)
    k = min(dim, len(corr))
    if k < 1:
        raise TrainError("CCA needs at least one dimension")
    scale = np.clip(corr[:k], 1e-6, None) ** power
    a = (wx @ u[:, :k]) * scale
    b = (wy @ vt[:k].T) * scale
    return mx, a, my, b, corr[:k]


def _cca_heads(model: DualEncoder, train: Tensors, pcfg: PreprocessConfig, reg: float) -> None:
    """Start both projection heads at the CCA of the towers' features on the training pairs:
    the first k output dimensions are the whitened canonical variates (unit variance), the
    others keep their random initialisation, scaled down to a hundredth."""
    fx, fy = tower_features((model.image_tower, model.text_tower), train, pcfg)
    e = model.image_proj.out_features
    k = min(e, fx.shape[1], fy.shape[1], max(1, len(fx) - 1))
    mx, a, my, b, _ = fit_cca(fx, fy, k, reg=reg, power=0.0)
    with torch.no_grad():
        for proj, m, w in ((model.image_proj, mx, a), (model.text_proj, my, b)):
            proj.weight.mul_(0.01)
            proj.bias.mul_(0.01)
            proj.weight[:k] = torch.from_numpy(w.T.copy()).float()
            proj.bias[:k] = torch.from_numpy(-(m @ w)).float()


def _stage2_cca(cfg: TrainConfig, train: Tensors, pcfg: PreprocessConfig,
                image_init: dict[str, torch.Tensor] | None, text_init: dict[str, torch.Tensor] | None,
                ) -> DualEncoder:
    """Stage 2 as CCA: keep the (stage-1) towers and set both projections to the canonical
    directions of their features on the training pairs (``stage2.embed_dim`` of them)."""
    s2 = cfg.stage2
    torch.manual_seed(cfg.seed + 2)
    model = DualEncoder(cfg.image, cfg.text, s2.embed_dim, s2.init_temperature, pca_dim=None)
    if image_init is not None:
        model.image_tower.load_state_dict(image_init)
    if text_init is not None:
        model.text_tower.load_state_dict(text_init)
    fx, fy = tower_features((model.image_tower, model.text_tower), train, pcfg)
    if s2.embed_dim > min(fx.shape[1], fy.shape[1]):
        raise TrainError(f"CCA: embed_dim {s2.embed_dim} is above the tower feature sizes "
                         f"({fx.shape[1]}, {fy.shape[1]})")
    mx, a, my, b, _ = fit_cca(fx, fy, s2.embed_dim, reg=s2.cca_reg, power=s2.cca_power)
    with torch.no_grad():
        for proj, m, w in ((model.image_proj, mx, a), (model.text_proj, my, b)):
            proj.weight.copy_(torch.from_numpy(w.T.copy()))
            proj.bias.copy_(torch.from_numpy(-(m @ w)))
    return model.eval()


def fit_pca(img: np.ndarray, txt: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the pooled, normalised train embeddings of both modalities -> (mean (E,), components (E, k))."""
    x = np.concatenate([img, txt]).astype(np.float64)
    if dim <= 0 or dim > x.shape[1]:
        raise TrainError(f"pca_dim must be in 1..{x.shape[1]}, got {dim}")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean.astype(np.float32), vt[:dim].T.astype(np.float32).copy()


# ---------------------------------------------------------------------------- entry point


def _as_pairs(data: str | Path | LoadResult) -> LoadResult:
    return data if isinstance(data, LoadResult) else load_pairs(data)


def prepare(pairs: LoadResult, tokenizer: TextTokenizer, pcfg: PreprocessConfig) -> Tensors:
    pixels = load_images_uint8([p.image for p in pairs.pairs], pcfg)
    ids, mask = tokenize_all(tokenizer, [p.caption for p in pairs.pairs])
    return Tensors(pixels, ids, mask)


def tokenize_all(tokenizer: TextTokenizer, texts: Sequence[str], chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask (N, max_length) int64, through the runtime tokenizer in chunks."""
    ids = np.full((len(texts), tokenizer.max_length), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), tokenizer.max_length), dtype=np.int64)
    for s in range(0, len(texts), chunk):
        i, m = tokenizer.encode(list(texts[s : s + chunk]))
        ids[s : s + len(i), : i.shape[1]] = i
        mask[s : s + len(m), : m.shape[1]] = m
    return ids, mask


def _stage1_source(path: str | Path, cfg: TrainConfig) -> Path:
    """Check that ``path`` is a run with finished stage-1 towers that fit ``cfg``."""
    src = Path(path)
    for name in ("tokenizer.json", "preprocess.json", "stage1/image.pt", "stage1/text.pt"):
        if not (src / name).is_file():
            raise TrainError(f"stage1_from={src}: no finished stage 1 there ({name} missing)")
    for m, mine in (("image", cfg.image), ("text", cfg.text)):
        ck = _load_ckpt(src / "stage1" / f"{m}.pt")
        assert ck is not None
        try:
            theirs = TrainConfig.from_dict(json.loads(ck["config"]))
        except (KeyError, json.JSONDecodeError) as e:
            raise TrainError(f"{src / 'stage1' / f'{m}.pt'}: no readable config ({e})") from None
        a = {k: v for k, v in dataclasses.asdict(getattr(theirs, m)).items() if k != "vocab_size"}
        b = {k: v for k, v in dataclasses.asdict(mine).items() if k != "vocab_size"}
        if a != b:
            raise TrainError(f"stage1_from={src}: its {m} tower settings differ from this config's "
                             f"({a} vs {b})")
    return src


def alt_texts_of(pairs: LoadResult, column: str) -> list[list[str]]:
    """Per pair, its alternative texts: ``column``'s value split on ``|``, stripped, without
    empties, duplicates or the caption itself (``[]`` where the column is absent)."""
    out: list[list[str]] = []
    for p in pairs.pairs:
        seen = {p.caption}
        alts: list[str] = []
        for t in (p.extra.get(column) or "").split("|"):
            t = t.strip()
            if t and t not in seen:
                seen.add(t)
                alts.append(t)
        out.append(alts)
    return out


def train(
    data: str | Path | LoadResult,
    run_dir: str | Path,
    config: TrainConfig | None = None,
    *,
    val_data: str | Path | LoadResult | None = None,
    on_progress: ProgressFn | None = None,
    unpaired_images: Sequence[str | Path] | None = None,
    unpaired_texts: Sequence[str] | None = None,
    stage1_from: str | Path | None = None,
) -> TrainResult:
    """Run stage 1, stage 2 and PCA on paired data; write the run folder.

    ``data``/``val_data``: a dataset path any :func:`mmedge.data.load_pairs` format
    reads, or an already loaded :class:`LoadResult`. Re-running with the same
    ``run_dir`` resumes or reuses finished stages.

    ``unpaired_images`` (image files) and ``unpaired_texts`` are data without a partner:
    they join the paired images and captions in the tokenizer, the normalisation
    statistics and stage 1 (the autoencoders), and the inputs of the modality
    discriminator when ``stage2.adversarial`` and ``stage2.adv_unpaired`` are set. Stage 2's
    contrastive loss uses pairs only. Alternative texts (``stage2.alt_column``) are used
    the same way, and as extra positives of their pair with ``stage2.alt_prob`` > 0.

    ``stage1_from``: another run folder whose stage-1 towers (and so its tokenizer and
    image normalisation) this run starts from instead of running stage 1 itself, e.g. to
    pre-train once on a large unpaired collection and align several times. Its tower
    settings must equal this config's.
    """
    global _CTX
    ctx = DistContext.from_env()  # torchrun sets WORLD_SIZE/RANK; a plain run is one process
    _CTX = ctx
    try:
        return _train(data, run_dir, config, val_data=val_data, on_progress=on_progress if ctx.is_main else None,
                      unpaired_images=unpaired_images, unpaired_texts=unpaired_texts, stage1_from=stage1_from)
    finally:
        ctx.barrier()
        _CTX = DistContext()


def _check_settings(cfg: TrainConfig) -> None:
    """Settings a run would only trip over later (tower architectures, switches, fractions),
    refused with one line before the run folder is written."""
    from mmedge.train.models import IMAGE_ARCHS, TEXT_ARCHS

    for name, v, allowed in (("image.arch", cfg.image.arch, IMAGE_ARCHS), ("text.arch", cfg.text.arch, TEXT_ARCHS),
                             ("stage2.method", cfg.stage2.method, ("contrastive", "cca"))):
        if v not in allowed:
            raise TrainError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {v!r}")
    if not isinstance(cfg.image.ibn, bool):
        raise TrainError(f"image.ibn must be true or false, got {cfg.image.ibn!r}")
    ex = cfg.image.extra_convs
    if isinstance(ex, bool) or not isinstance(ex, int) or not 0 <= ex <= 4:
        raise TrainError(f"image.extra_convs must be an integer from 0 to 4, got {ex!r}")
    if ex and cfg.image.arch != "conv4":
        raise TrainError(f"image.extra_convs is built for image.arch 'conv4' only, got {cfg.image.arch!r}")
    if cfg.image.ibn and cfg.image.arch != "conv4":
        raise TrainError(f"image.ibn is built for image.arch 'conv4' only, got {cfg.image.arch!r}")
    augs = ("aug_shade", "aug_outline", "aug_color", "aug_gray", "aug_randconv", "aug_elastic", "aug_erase",
            "aug_elastic_strength")
    fields = [("image.mixstyle", cfg.image.mixstyle, 1.0)] + [
        (f"stage2.{k}", getattr(cfg.stage2, k), 1.0) for k in augs
    ] + [("stage2.ema", cfg.stage2.ema, 0.9999999)]
    for name, v, top in fields:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= top:
            raise TrainError(f"{name} must be a number from 0 to {1 if top == 1.0 else 'below 1'}, got {v!r}")


def _train(
    data: str | Path | LoadResult,
    run_dir: str | Path,
    config: TrainConfig | None,
    *,
    val_data: str | Path | LoadResult | None,
    on_progress: ProgressFn | None,
    unpaired_images: Sequence[str | Path] | None,
    unpaired_texts: Sequence[str] | None,
    stage1_from: str | Path | None = None,
) -> TrainResult:
    cfg = config or TrainConfig()
    _check_settings(cfg)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    pairs = _as_pairs(data)
    if len(pairs.pairs) < 2:
        raise TrainError(f"{pairs.source}: need at least 2 pairs to train, found {len(pairs.pairs)}")
    val_pairs = _as_pairs(val_data) if val_data is not None else None
    u_images = [Path(p) for p in (unpaired_images or [])]
    u_texts = [t for t in (unpaired_texts or []) if isinstance(t, str) and t.strip()]
    if unpaired_texts is not None and any(not isinstance(t, str) for t in unpaired_texts):
        raise TrainError("unpaired_texts must be strings")

    # tokenizer: retrained only when its texts or settings change
    captions = [p.caption for p in pairs.pairs]
    alt_lists = alt_texts_of(pairs, cfg.stage2.alt_column)
    alt_flat = [t for a in alt_lists for t in a]
    tok_texts = captions + alt_flat + u_texts
    tok_path = run / "tokenizer.json"
    tok_meta = run / "tokenizer.key"
    src = _stage1_source(stage1_from, cfg) if stage1_from is not None else None
    if src is not None:
        if _CTX.is_main and not (tok_path.exists() and tok_path.read_bytes() == (src / "tokenizer.json").read_bytes()):
            tmp = run / "tokenizer.json.tmp"
            shutil.copyfile(src / "tokenizer.json", tmp)
            os.replace(tmp, tok_path)
        _atomic_write_text(tok_meta, "from:" + _digest((src / "tokenizer.json").read_bytes().hex()))
    else:
        tok_key = _digest("tok", tok_texts if (alt_flat or u_texts) else captions, cfg.text.tokenizer_vocab,
                          cfg.text.max_length)
        if _CTX.is_main and not (tok_path.exists() and tok_meta.exists() and tok_meta.read_text() == tok_key):
            train_tokenizer(tok_texts, cfg.text.tokenizer_vocab, cfg.text.max_length, tok_path)
            _atomic_write_text(tok_meta, tok_key)
    _CTX.barrier()  # the other ranks read rank 0's tokenizer
    tokenizer = TextTokenizer(tok_path, max_length=cfg.text.max_length, pad_id=PAD_ID)
    cfg.text.vocab_size = Tokenizer.from_file(str(tok_path)).get_vocab_size()

    # images, then per-channel statistics of the training set for normalisation
    s = cfg.image.image_size
    raw_cfg = PreprocessConfig(size=(s, s), resize_filter=cfg.resize_filter, mean=(0.0, 0.0, 0.0),
                               std=(1.0, 1.0, 1.0), alpha_background=tuple(cfg.alpha_background))
    train_t = prepare(pairs, tokenizer, raw_cfg)
    u_pixels = load_images_uint8(u_images, raw_cfg) if u_images else train_t.pixels[:0]
    all_pixels = np.concatenate([train_t.pixels, u_pixels]) if len(u_pixels) else train_t.pixels
    px = all_pixels.reshape(-1, 3).astype(np.float64) / 255.0
    mean = tuple(float(v) for v in px.mean(0))
    std = tuple(float(max(v, 1e-3)) for v in px.std(0))
    del px
    pcfg = PreprocessConfig(size=(s, s), resize_filter=cfg.resize_filter, mean=mean, std=std,
                            alpha_background=tuple(cfg.alpha_background))
    if src is not None:  # the pre-trained towers expect their own normalisation
        pcfg = PreprocessConfig.from_manifest(json.loads((src / "preprocess.json").read_text()))
    _atomic_write_text(run / "preprocess.json", json.dumps(pcfg.to_manifest(), indent=2))
    val_t = prepare(val_pairs, tokenizer, pcfg) if val_pairs is not None else None
    alt_ids, alt_mask = tokenize_all(tokenizer, alt_flat)
    alts = AltTexts(alt_ids, alt_mask, np.concatenate([[0], np.cumsum([len(a) for a in alt_lists])]).astype(np.int64))
    u_ids, u_mask = tokenize_all(tokenizer, u_texts)
    unpaired = Unpaired(u_pixels, u_ids, u_mask) if (len(u_pixels) or len(u_ids)) else None
    timings["load_s"] = time.perf_counter() - t0

    image_init = text_init = None
    init_key = "scratch"
    if src is not None:
        cks = [_load_ckpt(src / "stage1" / f"{m}.pt") for m in ("image", "text")]
        image_init, text_init = cks[0]["modules"]["tower"], cks[1]["modules"]["tower"]  # type: ignore[index]
        init_key = "from:" + str(cks[0]["key"]) + str(cks[1]["key"])  # type: ignore[index]
    elif cfg.stage1.enabled:
        t = time.perf_counter()
        image_init, ik = _stage1_image(cfg, all_pixels, pcfg, run, on_progress)
        if cfg.stage1.dedupe_texts:  # each distinct text once (captions repeat across images)
            s1_ids, s1_mask = tokenize_all(tokenizer, list(dict.fromkeys(captions + alt_flat + u_texts)))
        elif len(alt_ids) or len(u_ids):
            s1_ids, s1_mask = np.concatenate([train_t.ids, alt_ids, u_ids]), np.concatenate([train_t.mask, alt_mask, u_mask])
        else:
            s1_ids, s1_mask = train_t.ids, train_t.mask
        text_init, tk = _stage1_text(cfg, s1_ids, s1_mask, run, on_progress)
        init_key = ik + tk
        timings["stage1_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.stage2.method == "cca":
        model = _stage2_cca(cfg, train_t, pcfg, image_init, text_init)
    else:
        model = _stage2(cfg, train_t, val_t, pcfg, image_init, text_init, init_key, run, on_progress,
                        concept=_concepts(captions), alts=alts, unpaired=unpaired)
    timings["stage2_s"] = time.perf_counter() - t

    metrics: dict[str, Any] = {}
    if cfg.pca_dim:
        img, txt = embed_all(model, train_t, pcfg, use_pca=False)
        mean_v, comps = fit_pca(img, txt, cfg.pca_dim)
        kept = DualEncoder(cfg.image, cfg.text, cfg.stage2.embed_dim, cfg.stage2.init_temperature, cfg.pca_dim)
        state = model.state_dict()
        state["pca_mean"] = torch.from_numpy(mean_v)
        state["pca_components"] = torch.from_numpy(comps)
        kept.load_state_dict(state)
        model = kept.eval()
    if val_t is not None and len(val_t.pixels) >= 2:
        metrics.update(quick_recall(*embed_all(model, val_t, pcfg)))
    timings["total_s"] = time.perf_counter() - t0
    metrics["timings"] = timings
    metrics["n_train"] = len(pairs.pairs)
    metrics["n_unpaired"] = {"images": len(u_pixels), "texts": len(u_texts)}
    metrics["n_alt_texts"] = len(alt_flat)
    metrics["params"] = {
        "image": sum(p.numel() for p in model.image_tower.parameters()) + sum(p.numel() for p in model.image_proj.parameters()),
        "text": sum(p.numel() for p in model.text_tower.parameters()) + sum(p.numel() for p in model.text_proj.parameters()),
    }

    # held-out inputs for export's parity check
    if val_t is not None and len(val_t.pixels) >= 8:
        held_px, held_txt = val_t.pixels[:64], [p.caption for p in val_pairs.pairs[:64]]  # type: ignore[union-attr]
    else:
        held_px, held_txt = train_t.pixels[-64:], captions[-64:]
    _save_samples(run, held_px, held_txt)

    _atomic_torch_save({k: v.detach().clone() for k, v in model.state_dict().items()}, run / "model.pt")
    _atomic_write_text(run / "config.json", cfg.to_json())
    _atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2))
    return TrainResult(run, cfg, metrics)


def _save_samples(run: Path, held_px: np.ndarray, held_txt: list[str]) -> None:
    if not _CTX.is_main:
        return
    tmp = run / "samples.tmp.npy"
    np.save(tmp, np.ascontiguousarray(held_px, dtype=np.uint8), allow_pickle=False)
    os.replace(tmp, run / "samples.npy")
    _atomic_write_text(run / "samples.json", json.dumps(held_txt))


def load_run(run_dir: str | Path) -> tuple[DualEncoder, TrainConfig, PreprocessConfig, Path]:
    """Rebuild the trained DualEncoder from a run folder (no pickled code)."""
    run = Path(run_dir)
    for name in ("config.json", "model.pt", "preprocess.json", "tokenizer.json"):
        if not (run / name).exists():
            raise TrainError(f"{run}: not a finished training run ({name} missing)")
    try:
        cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        pcfg = PreprocessConfig.from_manifest(json.loads((run / "preprocess.json").read_text()))
    except json.JSONDecodeError as e:
        raise TrainError(f"{run}: bad JSON in run folder ({e})") from None
    model = DualEncoder(cfg.image, cfg.text, cfg.stage2.embed_dim, cfg.stage2.init_temperature, cfg.pca_dim)
    state = _load_ckpt(run / "model.pt")
    assert state is not None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise TrainError(f"{run / 'model.pt'}: weights do not match config.json ({e})") from None
    return model.eval(), cfg, pcfg, run / "tokenizer.json"
