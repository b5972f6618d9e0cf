"""Semantic visual tokenizer: ViT encoder + cosine VQ (SigLIP2-style encoder in the official model).

The image is first scaled down by `downsample` (the official processor halves it), cut into `patch_size` patches,
encoded by a pre-LN ViT with a learned, bilinearly resampled position table, then each patch feature is projected
and assigned to its nearest codebook entry by cosine similarity. One id per `downsample * patch_size` pixels.
There is no pixel decoder: the DiT is the only decoder of these ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class VQConfig:
    dim: int = 1536
    n_layers: int = 40
    n_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 16
    pos_grid: int = 128  # learned position table side (official image_size 2048 / patch 16)
    norm_eps: float = 1e-6
    codebook_size: int = 16384
    code_dim: int = 2048
    downsample: int = 2  # the processor halves the image before patching
    min_pixels: int = 512 * 512  # smart_resize bounds (official processor: shortest_edge / longest_edge)
    max_pixels: int = 2048 * 2048
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(self.image_mean))
        object.__setattr__(self, "image_std", tuple(self.image_std))

    @property
    def stride(self) -> int:
        """Pixels of the input image per token."""
        return self.downsample * self.patch_size


class ViTBlock(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) one image per row (full attention within the image) -> (B, N, C)."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisualTokenizer(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Embedding(cfg.pos_grid * cfg.pos_grid, cfg.dim)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))
        self.quant_proj = nn.Linear(cfg.dim, cfg.code_dim)  # the official 1x1 `quant_conv`
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)

    def interpolated_pos(self, h: int, w: int) -> torch.Tensor:
        """Resample the square position table to an h×w patch grid (bilinear, border) -> (h*w, C)."""
        g, table = self.cfg.pos_grid, self.pos_embed.weight
        grid_2d = table.view(g, g, -1).permute(2, 0, 1)[None].float()  # (1, C, g, g)
        ys = (torch.arange(h, device=table.device, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=table.device, dtype=torch.float32) + 0.5) / w * 2 - 1
        coords = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(1, h * w, 1, 2)
        out = F.grid_sample(grid_2d, coords, mode="bilinear", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].t().to(table.dtype)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), normalised, H and W multiples of patch_size -> features (B, h*w, C)."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (B, C, h, w)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self.interpolated_pos(h, w)
        for blk in self.blocks:
            x = blk(x)
        return x

    def quantize(self, feats: torch.Tensor) -> torch.Tensor:
        """features (..., C) -> ids (...) of the nearest code by cosine similarity."""
        z = F.normalize(self.quant_proj(feats).float(), dim=-1)
        codes = F.normalize(self.codebook.weight.float(), dim=-1)
        return (z @ codes.t()).argmax(dim=-1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> ids (B, H/p, W/p)."""
        b, _, h, w = pixels.shape
        p = self.cfg.patch_size
        return self.quantize(self.features(pixels)).view(b, h // p, w // p)


def smart_resize(height: int, width: int, cfg: VQConfig) -> tuple[int, int]:
    """Size (h, w) the processor resizes an image to before patching (GlmImageImageProcessor rules)."""
    f = cfg.patch_size
    if height < f or width < f:
        raise ValueError(f"condition image {width}x{height} is smaller than the {f}-px patch")
    if max(height, width) / min(height, width) > 4:
        raise ValueError(f"condition image {width}x{height}: aspect ratio must be at most 4")
    shortest, longest = int(round(math.sqrt(cfg.min_pixels))), int(round(math.sqrt(cfg.max_pixels)))
    scale = 1.0
    if min(height, width) < shortest:
        scale = shortest / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    height, width = height // cfg.downsample, width // cfg.downsample
    h = max(f, int(round(height * scale / f)) * f)
    w = max(f, int(round(width * scale / f)) * f)
    if max(h, w) > longest:
        beta = max(h, w) / longest
        h, w = max(f, int(math.floor(h / beta / f)) * f), max(f, int(math.floor(w / beta / f)) * f)
    return h, w


def preprocess(image: Image.Image, cfg: VQConfig) -> torch.Tensor:
    """PIL image -> normalised pixels (1, 3, h, w) at the tokenizer's input size (bicubic, CLIP mean/std)."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, cfg)
    return pixels_at(image, h, w, cfg)


def normalize(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> the ViT's input (B, 3, H, W) float32: /255, then CLIP mean/std."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def pixels_at(image: Image.Image, height: int, width: int, cfg: VQConfig) -> torch.Tensor:
    """RGB image -> normalised pixels (1, 3, height, width): bicubic resize, CLIP mean/std."""
    return normalize(np.asarray(image.resize((width, height), Image.BICUBIC))[None], cfg.image_mean, cfg.image_std)


VQ_PRESETS: dict[str, dict] = {
    # official: SigLIP2-g/16 dimensions, codebook 16384 × 2048 (1.20 B with the VQ projections)
    "glm-image": dict(dim=1536, n_layers=40, n_heads=16, intermediate_size=6144, patch_size=16, pos_grid=128,
                      codebook_size=16384, code_dim=2048),
}
