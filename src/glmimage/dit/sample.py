"""Flow-matching schedule (pure functions) and the Euler sampler with classifier-free guidance.

GLM-Image quirk kept on purpose: the DiT is conditioned on the *raw* timesteps (999, 979, ...) while the Euler update
uses the *shifted* sigmas σ' = μ / (μ + 1/σ - 1), μ = max_shift·sqrt(seq / base_seq) + base_shift.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


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
