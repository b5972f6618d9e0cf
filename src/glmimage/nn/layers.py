"""Shared primitives. Pure functions where possible; shapes in every docstring."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back (GLM-4 / Llama convention). x: (..., D) -> (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] channels of x; the rest pass through (partial rotary).

    x: (B, H, T, D); cos/sin broadcastable to (B, H, T, R) with R <= D.
    """
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat([x_rot * cos + _rotate_half(x_rot) * sin, x_pass], dim=-1)


def mrope_cos_sin(
    pos: torch.Tensor, *, rotary_dim: int, sections: tuple[int, ...], theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis multimodal RoPE tables. pos: (3, B, T) integer (t, h, w) -> cos, sin: (B, 1, T, rotary_dim).

    The rotary_dim/2 frequencies are split into `sections` (t, h, w, t, ...): section i takes its angle from
    axis i % 3, then the half is repeated (rotate-half layout), as in GLM-4.1V / GLM-Image.
    """
    if sum(sections) * 2 != rotary_dim:
        raise ValueError(f"mrope sections {sections} must sum to rotary_dim/2 = {rotary_dim // 2}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=pos.device) / rotary_dim))
    freqs = pos[..., None].float() * inv_freq  # (3, B, T, R/2)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(list(sections), dim=-1))], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, R)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_2d_cos_sin(height: int, width: int, head_dim: int, *, theta: float = 10000.0,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables for an (height, width) token grid in raster order -> cos, sin: (height*width, head_dim).

    Half of the frequencies encode the row, half the column (CogView4 / GLM-Image DiT layout).
    """
    d = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device)[: d // 2] / d))
    fh = torch.outer(torch.arange(height, device=device, dtype=torch.float32), inv_freq)  # (H, d/2)
    fw = torch.outer(torch.arange(width, device=device, dtype=torch.float32), inv_freq)  # (W, d/2)
    freqs = torch.cat([fh[:, None].expand(height, width, -1), fw[None].expand(height, width, -1)], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(height * width, head_dim)
    return freqs.cos(), freqs.sin()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first (flip_sin_to_cos). t: (N,) float -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
