"""The whole-model config (one frozen dataclass per component) and the named presets.

Geometry is configuration: one AR token covers `vq.stride` pixels; the AR grid is upsampled ×2 to the DiT patch
grid, so `vq.stride == 2 * vae_factor * dit.patch_size` (32 = 2·8·2 in the official model).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from glmimage.ar.model import AR_PRESETS, ARConfig
from glmimage.dit.model import DIT_PRESETS, DiTConfig
from glmimage.glyph import GLYPH_PRESETS
from glmimage.tokenizer.vq import VQ_PRESETS, VQConfig
from glmimage.vae import VAE_PRESETS


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Defaults of a generation call (official: generation_config.json and the pipeline defaults)."""
    temperature: float = 0.9
    top_p: float | None = 0.75
    top_k: int | None = 50  # transformers 5 applies top_k=50 when generation_config leaves it unset
    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    ar_guidance_scale: float = 1.0  # classifier-free guidance of the AR's logits (1: none, as the official model)
    height: int = 1024
    width: int = 1024


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    base_image_seq_len: int = 256
    base_shift: float = 0.25
    max_shift: float = 0.75


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    ar: ARConfig
    vq: VQConfig
    dit: DiTConfig
    glyph: dict  # transformers T5Config kwargs of the ByT5 encoder
    vae: dict  # diffusers AutoencoderKL config (+ latents_mean / latents_std)
    preview_side: int = 16  # the preview grid has about preview_side² tokens whatever the target size
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        f = 2 ** (len(self.vae["block_out_channels"]) - 1)
        if self.vq.stride != 2 * f * self.dit.patch_size:
            raise ValueError(f"token stride {self.vq.stride} must equal 2 × VAE factor {f} × DiT patch "
                             f"{self.dit.patch_size} (AR ids are upsampled ×2 to the DiT patch grid)")
        if self.vq.codebook_size != self.dit.codebook_size:
            raise ValueError(f"visual codebook {self.vq.codebook_size} != DiT prior codebook {self.dit.codebook_size}")
        if self.dit.in_channels != self.vae["latent_channels"]:
            raise ValueError(f"DiT in_channels {self.dit.in_channels} != VAE latent channels "
                             f"{self.vae['latent_channels']}")
        if self.dit.canvas_patch and self.dit.canvas_patch != f * self.dit.patch_size:
            raise ValueError(f"DiT canvas_patch {self.dit.canvas_patch} must be 0 or the pixels per DiT patch "
                             f"({f} × {self.dit.patch_size})")
        if self.dit.glyph_dim != self.glyph["d_model"]:
            raise ValueError(f"DiT glyph_dim {self.dit.glyph_dim} != glyph encoder d_model {self.glyph['d_model']}")

    @property
    def stride(self) -> int:
        return self.vq.stride

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def grids(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Target token grid and preview grid for an image size (GlmImageProcessor._get_target_shape)."""
        th, tw = height // self.stride, width // self.stride
        ratio = th / tw
        return (th, tw), (int(math.sqrt(ratio) * self.preview_side), int(math.sqrt(1 / ratio) * self.preview_side))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        try:
            return cls(ar=ARConfig(**{k: v for k, v in d["ar"].items() if k != "head_dim"}), vq=VQConfig(**d["vq"]),
                       dit=DiTConfig(**d["dit"]), glyph=dict(d["glyph"]), vae=dict(d["vae"]),
                       preview_side=d.get("preview_side", 16), sampling=SamplingConfig(**d.get("sampling", {})),
                       schedule=ScheduleConfig(**d.get("schedule", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed glmimage config: {e}") from None


def _debug() -> ModelConfig:
    codebook = 64
    text_vocab = codebook + 6 + 256  # byte-level tokenizer: visual ids, specials, bytes
    return ModelConfig(
        ar=ARConfig(vocab_size=text_vocab, vision_vocab_size=codebook, dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                    intermediate_size=256, mrope_section=(2, 3, 3)),
        vq=VQConfig(dim=64, n_layers=2, n_heads=4, intermediate_size=128, patch_size=16, pos_grid=16,
                    codebook_size=codebook, code_dim=32, min_pixels=32 * 32, max_pixels=512 * 512),
        dit=DiTConfig(in_channels=4, patch_size=2, n_layers=2, n_heads=4, head_dim=16, glyph_dim=32, time_embed_dim=32,
                      condition_dim=16, codebook_size=codebook),
        glyph=dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
                 layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=8, mid_block_add_attention=False,
                 use_quant_conv=False, use_post_quant_conv=False, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        preview_side=4,
        sampling=SamplingConfig(num_inference_steps=8, height=64, width=64),
    )


def _world() -> ModelConfig:
    """The embedded model (README "World model geometry"): 64 px images, AR grid 4×4 (+2×2 preview) at 16 px per id
    (the tokenizer reads full resolution: its objects are 12–17 px), VAE 4× down to 16×16×8 latents, DiT patch 2 ->
    8×8 image tokens (8 px each), which also read the canvas of the plan's text and shapes (world/canvas.py);
    prompts in a 512-merge BPE trained on the world's captions (train/ar.py)."""
    codebook = 1456  # the world's 1452 semantic codes (train/data.py token_codes), rounded up to a multiple of 16
    return ModelConfig(
        ar=ARConfig(vocab_size=codebook + 6 + 256 + 512, vision_vocab_size=codebook, dim=256, n_layers=6, n_heads=4,
                    n_kv_heads=2, intermediate_size=512, mrope_section=(4, 6, 6)),
        vq=VQConfig(dim=128, n_layers=6, n_heads=4, intermediate_size=512, patch_size=16, pos_grid=8, downsample=1,
                    codebook_size=codebook, code_dim=32, min_pixels=64 * 64, max_pixels=256 * 256),
        dit=DiTConfig(in_channels=8, patch_size=2, n_layers=6, n_heads=4, head_dim=64, glyph_dim=128,
                      time_embed_dim=96, condition_dim=32, codebook_size=codebook, canvas_patch=8,
                      canvas_channels=2),
        glyph=dict(vocab_size=384, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=64, dropout_rate=0.0, tie_word_embeddings=False),
        vae=dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=[32, 64, 64],
                 layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 3,
                 up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=16, mid_block_add_attention=False,
                 use_quant_conv=False, use_post_quant_conv=False, latents_mean=[0.0] * 8, latents_std=[1.0] * 8),
        preview_side=2,
        # guidance 3 and a near-greedy AR: chosen on three draws of `glmimage eval world` (README "Sampling defaults")
        sampling=SamplingConfig(temperature=0.15, top_p=None, top_k=None, num_inference_steps=20,
                                guidance_scale=3.0, height=64, width=64),
        schedule=ScheduleConfig(base_image_seq_len=64, base_shift=0.25, max_shift=0.75),
    )


def _small() -> ModelConfig:
    """The benchmark's middle size: about 100 M parameters per component, official geometry (32-px tokens, 16-side
    preview, 8× VAE, byte-level prompts), random weights. Sized so that the reference runs it on a CPU."""
    codebook = 16384
    return ModelConfig(
        ar=ARConfig(vocab_size=codebook + 6 + 256, vision_vocab_size=codebook, dim=768, n_layers=12, n_heads=12,
                    n_kv_heads=2, intermediate_size=2048, mrope_section=(4, 6, 6)),
        vq=VQConfig(dim=768, n_layers=12, n_heads=12, intermediate_size=3072, patch_size=16, pos_grid=64,
                    codebook_size=codebook, code_dim=256, min_pixels=64 * 64, max_pixels=1024 * 1024),
        dit=DiTConfig(in_channels=16, patch_size=2, n_layers=10, n_heads=12, head_dim=64, glyph_dim=512,
                      time_embed_dim=256, condition_dim=64, codebook_size=codebook),
        glyph=dict(vocab_size=384, d_model=512, d_kv=64, d_ff=1536, num_layers=8, num_heads=8,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        vae=dict(VAE_PRESETS["glm-image"], block_out_channels=[128, 256, 512, 512], layers_per_block=2),
        sampling=SamplingConfig(height=256, width=256, num_inference_steps=8),
    )


def _official() -> ModelConfig:
    return ModelConfig(ar=ARConfig(**AR_PRESETS["glm-image"]), vq=VQConfig(**VQ_PRESETS["glm-image"]),
                       dit=DiTConfig(**DIT_PRESETS["glm-image"]), glyph=dict(GLYPH_PRESETS["glm-image"]),
                       vae=dict(VAE_PRESETS["glm-image"]))


# name -> builder. Parameter counts (meta device, tests/test_config.py):
#   glm-image: AR side 10.11 B (LM 8.85 B + ViT 1.16 B + VQ 0.04 B + head 0.07 B), DiT 6.93 B, VAE 0.41 B, ByT5 0.22 B
#   debug:     a few hundred thousand per component; seconds on a CPU
#   small:     AR 99 M, ViT+VQ 93 M, DiT 110 M, ByT5 27 M, VAE 82 M: the benchmark's CPU size (random weights)
#   world:     the embedded model's geometry (random weights; the trained one ships in glmimage/assets/world)
PRESETS = {"glm-image": _official, "small": _small, "world": _world, "debug": _debug}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]()
