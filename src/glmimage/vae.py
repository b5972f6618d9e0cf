"""The VAE: diffusers' `AutoencoderKL` with GLM-Image's per-channel latent normalisation (z − mean) / std."""
from __future__ import annotations

import torch
import torch.nn as nn


class _Unread(nn.Module):
    """Stands in for a deferred encoder: no parameters, so moves and casts of the VAE pass it by."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the VAE encoder is not read yet: encode through VAE.encode (it reads it first)")


class VAE(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = dict(config)
        self.model = AutoencoderKL.from_config(self.config)
        c = self.model.config.latent_channels
        mean = self.config.get("latents_mean") or [0.0] * c
        std = self.config.get("latents_std") or [1.0] * c
        # real tensors even when the module is built on the meta device (they are not in the checkpoint)
        self.register_buffer("latents_mean", torch.tensor(mean, dtype=torch.float32, device="cpu").view(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32, device="cpu").view(1, c, 1, 1),
                             persistent=False)
        self._deferred: tuple = ()  # (encoder built on the meta device, load(encoder)) until first encode

    def defer_encoder(self, load) -> None:
        """Leave the encoder unread until an image is encoded (`load(encoder)` fills the meta-built encoder with its
        tensors, checking them). Text-to-image only decodes: at `small` in fp32 the encoder is 127 MiB that a
        text-to-image run never holds (the reference memory-maps its files and never touches those pages either).
        Call before loading the rest."""
        if not self._deferred:
            self._deferred = (self.model.encoder, load)
            self.model.encoder = _Unread()

    def materialize(self) -> "VAE":
        """Read a deferred encoder (onto the decoder's device, dtype and memory format); no-op otherwise."""
        if self._deferred:
            encoder, load = self._deferred
            load(encoder)
            ref = self.model.decoder.conv_in.weight
            self.model.encoder = encoder.to(ref.device, ref.dtype, memory_format=torch.channels_last).eval()
            self._deferred = ()
        return self

    @property
    def encoder_deferred(self) -> bool:
        return bool(self._deferred)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f) (posterior mode)."""
        self.materialize()
        dtype = self.model.dtype
        z = self.model.encode(images.to(dtype)).latent_dist.mode()
        return (z - self.latents_mean.to(z.dtype)) / self.latents_std.to(z.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1] (not clamped)."""
        dtype = self.model.dtype
        z = latents.to(dtype) * self.latents_std.to(dtype) + self.latents_mean.to(dtype)
        return self.model.decode(z).sample


VAE_PRESETS: dict[str, dict] = {
    # official: 16-channel CogView4 VAE, 8× down, 406 M parameters
    "glm-image": dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 512, 1024, 1024],
        layers_per_block=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=32, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=True, sample_size=1024, scaling_factor=0.18215,
        latents_mean=[-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875, -0.9453125,
                      0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125, -1.59375, -0.81640625,
                      -0.255859375],
        latents_std=[3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875,
                     2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625],
    ),
}
