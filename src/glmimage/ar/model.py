"""AR generator: GLM-4-0414 decoder layers (sandwich RMSNorms, GQA, 3-axis mRoPE) with a head over visual ids only.

Architecture only: no sampling here (see ar/generate.py). Static KV cache buffers are installed by an explicit
`setup_caches(max_batch, max_seq)`, and positions come in as tensors, gpt-fast style.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmimage.nn import RMSNorm, apply_rotary, mrope_cos_sin


@dataclass(frozen=True, kw_only=True)
class ARConfig:
    vocab_size: int  # text ids + visual ids (official: 168064)
    vision_vocab_size: int  # lm_head width: codebook + specials (official: 16512)
    dim: int = 4096
    n_layers: int = 40
    n_heads: int = 32
    n_kv_heads: int = 2
    intermediate_size: int = 13696
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    head_dim: int = 0  # derived

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim} / n_heads {self.n_heads} / n_kv_heads {self.n_kv_heads} do not divide")
        object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if sum(self.mrope_section) * 2 != self.rotary_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to rotary_dim/2 = {self.rotary_dim // 2}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class KVCache(nn.Module):
    """Static per-layer cache: k, v of shape (B, n_kv_heads, max_seq, head_dim), written at `input_pos`."""

    def __init__(self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_pos: (T,), k/v: (B, Hkv, T, D) -> full cache views (B, Hkv, S, D)."""
        b = k.shape[0]
        self.k[:b].index_copy_(2, input_pos, k)
        self.v[:b].index_copy_(2, input_pos, v)
        return self.k[:b], self.v[:b]


class Attention(nn.Module):
    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, C); cos/sin: (B, 1, T, R); mask: (B, 1, T, S) bool, True = attend (None: causal) -> (B, T, C)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:  # training on right-padded rows: plain causal attention (the fast SDPA kernels)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif t == 1 and x.device.type == "cpu":
            y = _decode_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row (decoding) on the CPU, where SDPA's flash kernel spends ~10× the time of this plain
    softmax(q·kᵀ)·v. q: (B, H, 1, D); k, v: (B, Hkv, S, D); mask: (B, 1, 1, S) bool -> (B, H, 1, D)."""
    b, h, _, d = q.shape
    g = h // k.shape[1]
    q = q.view(b, k.shape[1], g, d)  # query heads grouped by the kv head they share: (B, Hkv, G, D)
    fused = torch.compiler.is_compiling()  # multiply-reduces: fused into the step's kernels, no batched GEMMs
    if fused:
        scores = (q.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * d**-0.5  # (B, Hkv, G, S)
    else:
        scores = (q @ k.transpose(-1, -2)).float() * d**-0.5
    p = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf")).softmax(-1)
    y = (p[..., None] * v.float()[:, :, None]).sum(-2).to(v.dtype) if fused else p.to(v.dtype) @ v
    return y.view(b, h, 1, d)


class MLP(nn.Module):
    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    """GLM-4-0414 layer: each sub-layer is wrapped in RMSNorms on both sides before the residual add."""

    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class ARModel(nn.Module):
    def __init__(self, cfg: ARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vision_vocab_size, bias=False)
        self.max_batch = self.max_seq = 0

    def setup_caches(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """Install static KV caches (reused when already large enough)."""
        dtype = dtype or self.embed_tokens.weight.dtype
        cache = self.layers[0].self_attn.kv_cache
        if cache is not None and self.max_batch >= max_batch and self.max_seq >= max_seq and cache.k.dtype == dtype:
            return
        device = self.embed_tokens.weight.device
        self.max_batch, self.max_seq = max_batch, max_seq
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq, self.cfg.n_kv_heads, self.cfg.head_dim, dtype,
                                               device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_batch = self.max_seq = 0

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) ids; pos: (3, B, T) mRoPE positions; mask: (B, 1, T, S) bool, or None for plain causal
        attention (training, no cache); input_pos: (T,) cache slots (None = no cache, S == T)
        -> logits (B, T, vision_vocab_size)."""
        x = self.embed_tokens(idx)
        cos, sin = mrope_cos_sin(pos, rotary_dim=self.cfg.rotary_dim, sections=self.cfg.mrope_section,
                                 theta=self.cfg.rope_theta, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm(x))


# Parameter counts are measured on the meta device (tests/test_config.py).
AR_PRESETS: dict[str, dict] = {
    # official GLM-Image AR: GLM-4-9B-0414 LM, 10.11 B with the visual tokenizer and head
    "glm-image": dict(vocab_size=168064, vision_vocab_size=16512, dim=4096, n_layers=40, n_heads=32, n_kv_heads=2,
                      intermediate_size=13696, mrope_section=(8, 12, 12)),
}
