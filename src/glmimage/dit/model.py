"""DiT decoder of GLM-Image: paints VAE latents from the AR's semantic ids, glyph embeddings and the timestep.

Sequence = [glyph tokens ; image patches]. One set of attention/MLP weights serves both streams, but each stream has
its own adaLN-Zero modulation; queries and keys get a non-affine LayerNorm; 2D RoPE touches image patches only.
Prior ids (one per patch, the AR grid upsampled ×2) are embedded, projected and *added* to the patch embeddings.
World model only (`canvas_patch` > 0): a canvas (the plan's quoted text, and its shapes with canvas_channels=2,
drawn as masks) is embedded per patch and added too; rows whose conditions are dropped get none.
Image-to-image: each condition image is run once at t=0 and its per-layer keys/values are prepended to the
conditional pass (`condition_kv`), so target and glyph tokens attend to it but it never attends to them.
Architecture only: the sampler and CFG live in dit/sample.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmimage.nn import apply_rotary, rope_2d_cos_sin, timestep_embedding

KV = tuple[torch.Tensor, torch.Tensor]  # (B, H, L, D) keys and values of one layer


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    in_channels: int = 16
    patch_size: int = 2
    n_layers: int = 30
    n_heads: int = 32
    head_dim: int = 128
    glyph_dim: int = 1472  # ByT5 hidden size
    time_embed_dim: int = 512
    condition_dim: int = 256  # sinusoid width of each size/crop coordinate
    codebook_size: int = 16384
    rope_theta: float = 10000.0
    # > 0: the DiT also reads a canvas (world/canvas.py: the plan's text, then its shapes, drawn as masks),
    # canvas_channels × canvas_patch × canvas_patch of its pixels per patch, added to the patch embeddings through a
    # linear layer without bias. Not in the official model (0).
    canvas_patch: int = 0
    canvas_channels: int = 1

    @property
    def dim(self) -> int:
        return self.n_heads * self.head_dim


class MLP(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: str) -> None:
        super().__init__()
        if act not in ("gelu", "gelu_tanh", "silu"):
            raise ValueError(f"act must be one of gelu, gelu_tanh, silu; got {act!r}")
        self.fc1, self.fc2, self.act = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = F.silu(x) if self.act == "silu" else F.gelu(x, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.fc2(x)


class SizeTimeEmbedder(nn.Module):
    """temb = SiLU(MLP(sin(t)) + MLP(sin(crop) ‖ sin(target size))) -> (B, time_embed_dim)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.time_embed_dim
        self.timestep_mlp = MLP(d, d, d, "silu")
        self.size_mlp = MLP(4 * cfg.condition_dim, d, d, "silu")

    def forward(self, t: torch.Tensor, target_size: torch.Tensor, crop: torch.Tensor, dtype: torch.dtype):
        b, c = t.shape[0], self.cfg.condition_dim
        sizes = torch.cat([timestep_embedding(crop.flatten(), c).view(b, -1),
                           timestep_embedding(target_size.flatten(), c).view(b, -1)], dim=1)
        temb = self.timestep_mlp(timestep_embedding(t, self.cfg.time_embed_dim).to(dtype))
        return F.silu(temb + self.size_mlp(sizes.to(dtype)))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.n_heads = cfg.n_heads
        self.adaLN_modulation = nn.Linear(cfg.time_embed_dim, 12 * d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.mlp = MLP(d, 4 * d, d, "gelu_tanh")

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                prefix: KV | None, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, KV]:
        """x: (B, N, C) image, c: (B, L, C) glyph, temb: (B, T) -> x, c, and this layer's (k, v) of [c ; x]."""
        b, n, d = x.shape
        l = c.shape[1]
        # (shift, scale, gate) for attention then MLP, image and glyph stream interleaved: (B, 1, C) each
        m = self.adaLN_modulation(temb)[:, None].chunk(12, dim=-1)
        sh_a, csh_a, sc_a, csc_a, g_a, cg_a, sh_m, csh_m, sc_m, csc_m, g_m, cg_m = m
        hx = F.layer_norm(x, (d,)) * (1 + sc_a) + sh_a
        hc = F.layer_norm(c, (d,)) * (1 + csc_a) + csh_a
        h = torch.cat([hc, hx], dim=1)  # (B, L+N, C)
        q = self.q_proj(h).view(b, l + n, self.n_heads, -1)
        k = self.k_proj(h).view(b, l + n, self.n_heads, -1)
        v = self.v_proj(h).view(b, l + n, self.n_heads, -1).transpose(1, 2)  # (B, H, L+N, D)
        hd = q.shape[-1]
        q = F.layer_norm(q, (hd,)).transpose(1, 2)
        k = F.layer_norm(k, (hd,)).transpose(1, 2)
        cos, sin = rope
        q = torch.cat([q[:, :, :l], apply_rotary(q[:, :, l:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :l], apply_rotary(k[:, :, l:], cos, sin)], dim=2)
        kv = (k, v)
        if prefix is not None:
            k = torch.cat([prefix[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(b, -1, -1, -1), v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.o_proj(y.transpose(1, 2).reshape(b, l + n, d))
        c = c + y[:, :l] * cg_a
        x = x + y[:, l:] * g_a
        c = c + self.mlp(F.layer_norm(c, (d,)) * (1 + csc_m) + csh_m) * cg_m
        x = x + self.mlp(F.layer_norm(x, (d,)) * (1 + sc_m) + sh_m) * g_m
        return x, c, kv


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.dim, cfg.patch_size
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, d)
        self.glyph_embedder = MLP(cfg.glyph_dim, d, d, "gelu")
        self.prior_embedding = nn.Embedding(cfg.codebook_size, d)
        self.prior_projector = MLP(d, d, d, "silu")
        self.t_embedder = SizeTimeEmbedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_adaLN = nn.Linear(cfg.time_embed_dim, 2 * d)
        self.final_layer = nn.Linear(d, p * p * cfg.in_channels)
        if cfg.canvas_patch:
            self.canvas_embedder = nn.Linear(cfg.canvas_channels * cfg.canvas_patch ** 2, d, bias=False)

    def initialize_weights(self) -> None:
        """Training init (DiT): Xavier linears, zero adaLN gates and output layer so every block starts as identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.prior_embedding.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation.weight)
        nn.init.zeros_(self.final_adaLN.weight)
        nn.init.zeros_(self.final_layer.weight)
        if self.cfg.canvas_patch:
            nn.init.zeros_(self.canvas_embedder.weight)  # a model without a canvas until it learns to read one

    def _embed(self, x, t, prior_ids, prior_drop, glyph, target_size, crop, canvas=None):
        b, _, hh, ww = x.shape
        p = self.cfg.patch_size
        h, w = hh // p, ww // p
        patches = x.view(b, -1, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1)  # (B, N, C*p*p)
        dtype = self.prior_embedding.weight.dtype  # the model's dtype (linear weights may be int8)
        prior = self.prior_embedding(prior_ids) * (~prior_drop).to(dtype)[:, None, None]  # dropped rows -> 0
        x = self.x_embedder(patches.to(dtype)) + self.prior_projector(prior)
        if canvas is not None and self.cfg.canvas_patch:
            k, ch = self.cfg.canvas_patch, self.cfg.canvas_channels
            if canvas.shape[1:] != (ch, h * k, w * k):
                raise ValueError(f"canvas must be (B, {ch}, {h * k}, {w * k}) for {h}×{w} patches, "
                                 f"got {tuple(canvas.shape)}")
            # each patch's cell, channel-major (the first k² columns of the embedder read channel 0)
            cells = canvas.reshape(b, ch, h, k, w, k).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, ch * k * k)
            x = x + self.canvas_embedder(cells.to(dtype)) * (~prior_drop).to(dtype)[:, None, None]
        c = self.glyph_embedder(glyph.to(x.dtype))
        temb = self.t_embedder(t, target_size, crop, x.dtype)
        rope = rope_2d_cos_sin(h, w, self.cfg.head_dim, theta=self.cfg.rope_theta, device=x.device)
        return x, c, temb, tuple(r.to(x.dtype) for r in rope), (h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, prior_ids: torch.Tensor, prior_drop: torch.Tensor,
                glyph: torch.Tensor, target_size: torch.Tensor, crop: torch.Tensor | None = None,
                glyph_mask: torch.Tensor | None = None, cond_kv: list[KV] | None = None,
                use_cond: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                canvas: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity prediction.

        x: (B, C, H, W) latents; t: (B,) raw timesteps; prior_ids: (B, H/p * W/p); prior_drop: (B,) bool;
        glyph: (B, L, glyph_dim); target_size, crop: (B, 2) pixels; glyph_mask: (B, L) bool (False = padding);
        cond_kv: per-layer condition-image K/V from `condition_kv`, read by rows where use_cond (B,) is True;
        attn_mask: the key mask from `attention_mask` when the caller built it once (sampling loops); then
        glyph_mask and use_cond are not read; canvas: (B, canvas_channels, H/p·k, W/p·k) in [0, 1] with
        k = canvas_patch (world/canvas.py; ignored when canvas_patch is 0) -> (B, C, H, W).
        """
        b = x.shape[0]
        crop = torch.zeros_like(target_size) if crop is None else crop
        h_, c, temb, rope, (h, w) = self._embed(x, t, prior_ids, prior_drop, glyph, target_size, crop, canvas)
        if attn_mask is None:
            mask = self.attention_mask(glyph_mask if glyph_mask is not None else
                                       torch.ones(b, glyph.shape[1], dtype=torch.bool, device=x.device),
                                       h * w, cond_kv=cond_kv, use_cond=use_cond)
        else:
            mask = attn_mask
        for i, blk in enumerate(self.blocks):
            h_, c, _ = blk(h_, c, temb, rope, None if cond_kv is None else cond_kv[i], mask)
        scale, shift = self.final_adaLN(temb)[:, None].chunk(2, dim=-1)
        out = self.final_layer(F.layer_norm(h_, (h_.shape[-1],)) * (1 + scale) + shift)  # (B, N, C*p*p)
        p = self.cfg.patch_size
        return out.view(b, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h * p, w * p)

    def condition_kv_batched(self, latents: torch.Tensor, prior_ids: torch.Tensor,
                             target_size: torch.Tensor) -> list[KV]:
        """One condition image per row, differentiable (training): latents (B, C, H, W), prior_ids (B, N),
        target_size (B, 2) pixels -> per-layer (k, v) of shape (B, H, N, D), run at t=0 with an empty glyph stream."""
        b = latents.shape[0]
        glyph = latents.new_zeros(b, 0, self.cfg.glyph_dim)
        x, c, temb, rope, _ = self._embed(latents, torch.zeros(b, device=latents.device), prior_ids,
                                          torch.zeros(b, dtype=torch.bool, device=latents.device), glyph,
                                          target_size, torch.zeros_like(target_size))
        kvs = []
        for blk in self.blocks:
            x, c, kv = blk(x, c, temb, rope, None, None)
            kvs.append(kv)
        return kvs

    @torch.no_grad()
    def condition_kv(self, latents: list[torch.Tensor], prior_ids: list[torch.Tensor],
                     sizes: list[tuple[int, int]]) -> list[KV]:
        """Per-layer K/V of condition images run once at t=0 with their own prior ids, empty glyph stream.

        latents: [(1, C, H_i, W_i)]; prior_ids: [(1, H_i/p * W_i/p)]; sizes: [(height, width)] in pixels
        -> [(k, v) of shape (1, H, sum_i N_i, D)], one pair per layer.
        """
        per_image = [self.condition_kv_batched(lat, ids, torch.tensor([hw], device=lat.device, dtype=torch.float32))
                     for lat, ids, hw in zip(latents, prior_ids, sizes, strict=True)]
        return [(torch.cat([img[i][0] for img in per_image], dim=2), torch.cat([img[i][1] for img in per_image], dim=2))
                for i in range(len(self.blocks))]

    @staticmethod
    def attention_mask(glyph_mask: torch.Tensor, n_patches: int, *, cond_kv: list[KV] | None = None,
                       use_cond: torch.Tensor | None = None) -> torch.Tensor | None:
        """Key mask (B, 1, 1, prefix + L + N) over [condition K/V ; glyph ; image], or None when every key is
        visible (SDPA's fast path). glyph_mask: (B, L) bool; use_cond: (B,) rows that read the condition images."""
        b, device = glyph_mask.shape[0], glyph_mask.device
        parts, needed = [], not bool(glyph_mask.all())
        if cond_kv is not None:
            keep = torch.ones(b, dtype=torch.bool, device=device) if use_cond is None else use_cond.to(device)
            needed |= not bool(keep.all())
            parts.append(keep[:, None].expand(b, cond_kv[0][0].shape[2]))
        parts += [glyph_mask, torch.ones(b, n_patches, dtype=torch.bool, device=device)]
        return torch.cat(parts, dim=1)[:, None, None] if needed else None


DIT_PRESETS: dict[str, dict] = {
    # official: 30 blocks × 4096 (32 heads × 128), 6.93 B parameters
    "glm-image": dict(in_channels=16, patch_size=2, n_layers=30, n_heads=32, head_dim=128, glyph_dim=1472,
                      time_embed_dim=512, condition_dim=256, codebook_size=16384),
}


@torch.no_grad()
def fill_zero_params(module: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter random values N(0, std²). Training init zeroes the DiT's adaLN gates and output
    layer (it starts as the identity); random-weight benchmarks and tests need a DiT that makes a velocity."""
    g = torch.Generator().manual_seed(seed)
    for t in module.parameters():
        if t.abs().max() == 0:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return module
