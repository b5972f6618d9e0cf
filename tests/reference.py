"""Tiny random GLM-Image reference pipelines built with transformers + diffusers (offline), for parity tests.

Adapted from ../shared/reference/tiny_reference_pipeline.py: a tiny byte-level BPE trained in-process stands in for
the hub's GLM-4 tokenizer, ByT5Tokenizer needs no files, and every model is built from a config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOI, EOI = "<|dit_token_16384|>", "<|dit_token_16385|>"
TEXT_SPECIALS = ["<|endoftext|>", "<sop>", "<eop>", "<|image|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{%- if m.content is string -%}{{ m.content }}{%- else -%}"
    "{%- for item in m.content -%}{%- if item.type == 'image' -%}<|dit_token_16384|><|image|><|dit_token_16385|>"
    "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)
CORPUS = [
    "A photo of a cat sitting on a red sofa, with the text 'HELLO' on a sign.",
    "Replace the background with an underground station featuring an automatic escalator.",
    "0 1 2 3 4 5 6 7 8 9 10 16 32 64 a beautiful girl with glasses reading a book under a tree",
]


@dataclass(frozen=True)
class RefSize:
    """Sizes of one tiny reference pipeline."""
    codebook: int = 128
    ar_hidden: int = 128
    ar_layers: int = 2
    ar_heads: int = 4
    ar_kv_heads: int = 2
    mrope: tuple = (2, 3, 3)
    vit_hidden: int = 64
    vit_layers: int = 2
    dit_layers: int = 2
    dit_heads: int = 4
    dit_head_dim: int = 16
    t5_dim: int = 48
    latent_channels: int = 4


def build_reference(size: RefSize = RefSize(), seed: int = 0):
    """-> diffusers GlmImagePipeline with random weights (eval, fp32, CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import (ByT5Tokenizer, GlmImageConfig, GlmImageForConditionalGeneration, GlmImageProcessor,
                              PreTrainedTokenizerFast, T5Config, T5EncoderModel)
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil

    torch.manual_seed(seed)
    visual = [f"<|dit_token_{i}|>" for i in range(size.codebook)]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=visual + [BOI, EOI] + TEXT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOI, eos_token=EOI, pad_token="<|endoftext|>",
                                  image_token="<|image|>", grid_bos_token="<sop>", grid_eos_token="<eop>",
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in [BOI, EOI, "<|endoftext|>", "<|image|>"]}
    image_processor = GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1,
                                                size={"shortest_edge": 64 * 64, "longest_edge": 2048 * 2048})
    processor = GlmImageProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    cfg = GlmImageConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=size.ar_hidden, intermediate_size=2 * size.ar_hidden,
                         num_hidden_layers=size.ar_layers, num_attention_heads=size.ar_heads,
                         num_key_value_heads=size.ar_kv_heads, max_position_embeddings=4096,
                         vision_vocab_size=size.codebook, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids[EOI],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                          "mrope_section": list(size.mrope)}),
        vision_config=dict(depth=size.vit_layers, hidden_size=size.vit_hidden, num_heads=4,
                           intermediate_size=2 * size.vit_hidden, patch_size=16, image_size=256, spatial_merge_size=1),
        vq_config=dict(embed_dim=32, num_embeddings=size.codebook, latent_channels=size.vit_hidden),
        image_token_id=ids["<|image|>"], image_start_token_id=ids[BOI], image_end_token_id=ids[EOI],
    )
    vle = GlmImageForConditionalGeneration(cfg).eval()
    gc = vle.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, 0.9, 0.75
    gc.pad_token_id, gc.eos_token_id = ids["<|endoftext|>"], ids[EOI]
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=size.t5_dim, d_kv=12, d_ff=2 * size.t5_dim, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 tie_word_embeddings=False)).eval()
    dit = GlmImageTransformer2DModel(
        patch_size=2, in_channels=size.latent_channels, out_channels=size.latent_channels,
        num_layers=size.dit_layers, attention_head_dim=size.dit_head_dim, num_attention_heads=size.dit_heads,
        text_embed_dim=size.t5_dim, time_embed_dim=32, condition_dim=16,
        prior_vq_quantizer_codebook_size=size.codebook).eval()
    # diffusers zero-inits nothing here, but make sure no parameter is trivially zero (a parity test on zeros is void)
    with torch.no_grad():
        for p in dit.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    c = size.latent_channels
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=c, block_out_channels=(8, 16, 32, 32),
                        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, mid_block_add_attention=False,
                        use_quant_conv=False, use_post_quant_conv=False,
                        latents_mean=[0.1 * i for i in range(c)], latents_std=[1.0 + 0.5 * i for i in range(c)],
                        sample_size=1024).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.25,
                                                max_shift=0.75, base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="linear")
    pipe = GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=processor, text_encoder=t5,
                            vision_language_encoder=vle, vae=vae, transformer=dit, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fix_i2i_bug(pipe) -> None:
    """Work around the reference's image-to-image crash (diffusers 0.42.1 + transformers 5.23.0): the pipeline
    concatenates per-image ViT features into one (n·C, h, w) tensor, but get_image_tokens iterates per image.
    Test harness only: glmimage does not share the bug."""
    vle = pipe.vision_language_encoder
    orig = vle.get_image_tokens
    hidden = vle.config.vision_config.hidden_size

    def get_image_tokens(hidden_states, image_grid_thw=None):
        if torch.is_tensor(hidden_states) and hidden_states.dim() == 3:
            hidden_states = list(hidden_states.split(hidden, dim=0))
        return orig(hidden_states, image_grid_thw)

    vle.get_image_tokens = get_image_tokens


def make_greedy(pipe) -> None:
    """The pipeline forces do_sample=True; top_k=1 makes its sampling the argmax (= greedy decoding)."""
    pipe.vision_language_encoder.generation_config.top_k = 1
