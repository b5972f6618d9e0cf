"""Flow-matching schedule (pure functions) and the Euler sampler with classifier-free guidance.

GLM-Image quirk kept on purpose: the DiT is conditioned on the *raw* timesteps (999, 979, ...) while the Euler update
uses the *shifted* sigmas σ' = μ / (μ + 1/σ - 1), μ = max_shift·sqrt(seq / base_seq) + base_shift.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Integer-valued timesteps linspace(T, 1, steps+1)[:-1] as float32 (steps,)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    return np.linspace(num_train_timesteps, 1.0, num_steps + 1)[:-1].astype(np.int64).astype(np.float32)


def shift_mu(image_seq_len: int, *, base_seq_len: int = 256, base_shift: float = 0.25,
             max_shift: float = 0.75) -> float:
    """Resolution-dependent shift μ for an image of `image_seq_len` DiT patches."""
    return (image_seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def shifted_sigmas(ts: np.ndarray, mu: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Linear time shift of σ = t/T, with a final 0 appended -> (steps + 1,) float32."""
    s = ts.astype(np.float32) / num_train_timesteps
    s = mu / (mu + (1.0 / s - 1.0))
    return torch.cat([torch.from_numpy(s.astype(np.float32)), torch.zeros(1)])


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
               sigma_next: float | torch.Tensor) -> torch.Tensor:
    """One flow-matching Euler step in float32: x + (σ_next − σ)·v."""
    return x.float() + (sigma_next - sigma) * v.float()


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale·(cond − uncond)."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, ts: np.ndarray,
           sigmas: torch.Tensor, progress=None) -> torch.Tensor:
    """Euler loop. model_fn(x (B, C, H, W), t (B,)) -> guided velocity; t is the raw timestep − 1."""
    x = noise.float()
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), float(t) - 1.0, device=x.device)
        x = euler_step(x, model_fn(x, tt), float(sigmas[i]), float(sigmas[i + 1]))
        if progress is not None:
            progress.update(1)
    return x


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two (B, L_i, ...) batches along B, zero-padding L to the longer one."""
    n = max(a.shape[1], b.shape[1])
    pad = lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (0, n - x.shape[1]))  # noqa: E731
    return torch.cat([pad(a), pad(b)])


@torch.no_grad()
def generate_latents(dit, noise: torch.Tensor, *, prior: torch.Tensor, glyph: torch.Tensor, glyph_mask: torch.Tensor,
                     size: tuple[int, int], steps: int, guidance: float, schedule,
                     neg_glyph: torch.Tensor | None = None, neg_mask: torch.Tensor | None = None,
                     cond_kv: list | None = None, canvas: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                     progress=None) -> torch.Tensor:
    """The DiT's guided Euler sampling, shared by the pipeline and the training samples.

    noise: (B, C, h, w); prior: (B, N) ids; glyph: (B, L, D) with glyph_mask (B, L); size: (height, width) px;
    neg_glyph / neg_mask: the unconditional branch's glyph stream (needed when guidance > 1); cond_kv: condition
    images' K/V, read by the conditional rows only; canvas: (B, C, H, W) canvas of a DiT with canvas_patch,
    read by the conditional rows only; schedule: a ScheduleConfig -> latents (B, C, h, w) float32.
    Both guidance branches run as one batch [cond ; uncond]; the key mask is built once, not at every step.
    """
    b, dev = noise.shape[0], noise.device
    dtype = dtype or glyph.dtype
    use_cfg = guidance > 1.0
    size_t = torch.tensor([list(size)] * b, device=dev, dtype=torch.float32)
    drop = torch.zeros(b, dtype=torch.bool, device=dev)
    if use_cfg:
        if neg_glyph is None or neg_mask is None:
            raise ValueError("guidance > 1 needs the unconditional glyph stream (neg_glyph, neg_mask)")
        glyph, glyph_mask = _pad_cat(glyph, neg_glyph), _pad_cat(glyph_mask, neg_mask)
        prior, size_t = torch.cat([prior, prior]), torch.cat([size_t, size_t])
        canvas = None if canvas is None else torch.cat([canvas, canvas])  # the dropped rows' is zeroed in the DiT
        drop = torch.cat([drop, torch.ones(b, dtype=torch.bool, device=dev)])
    glyph = glyph.to(dtype)
    p = dit.cfg.patch_size
    n_patches = (noise.shape[2] // p) * (noise.shape[3] // p)
    mask = dit.attention_mask(glyph_mask, n_patches, cond_kv=cond_kv, use_cond=~drop)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xx, tt = (torch.cat([x, x]), torch.cat([t, t])) if use_cfg else (x, t)
        v = dit(xx.to(dtype), tt, prior_ids=prior, prior_drop=drop, glyph=glyph, target_size=size_t,
                cond_kv=cond_kv, attn_mask=mask, canvas=canvas).float()
        return cfg_combine(*v.chunk(2), guidance) if use_cfg else v

    ts = timesteps(steps, schedule.num_train_timesteps)
    mu = shift_mu(n_patches, base_seq_len=schedule.base_image_seq_len, base_shift=schedule.base_shift,
                  max_shift=schedule.max_shift)
    return sample(velocity, noise, ts, shifted_sigmas(ts, mu, schedule.num_train_timesteps), progress=progress)
