"""Glyph stream: the quoted strings of a prompt, encoded byte by byte with a ByT5 encoder (transformers).

Only quoted text reaches the DiT this way; the rest of the prompt reaches it through the AR's semantic tokens.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

_QUOTES = (r"'([^']*)'", "\u201c([^\u201c\u201d]*)\u201d", r'"([^"]*)"', "「([^「」]*)」")


def quoted_spans(prompt: str) -> list[tuple[int, str]]:
    """(index of the opening quote, quoted string) in the order GLM-Image reads them: '…', then “…”, then "…",
    then 「…」."""
    return [(m.start(), m.group(1)) for pattern in _QUOTES for m in re.finditer(pattern, prompt)]


def extract_glyph_texts(prompt: str) -> list[str]:
    """Quoted strings in the order GLM-Image reads them (quoted_spans)."""
    return [text for _, text in quoted_spans(prompt)]


class GlyphEncoder(nn.Module):
    """ByT5 encoder (transformers `T5EncoderModel` + `ByT5Tokenizer`, which needs no vocabulary file)."""

    def __init__(self, t5_config: dict, max_length: int = 2048) -> None:
        super().__init__()
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        cfg = T5Config(**{**t5_config, "is_encoder_decoder": False})
        self.t5_config = t5_config
        self.encoder = T5EncoderModel(cfg).eval()
        self.tokenizer = ByT5Tokenizer()
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    def _sequences(self, prompts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Byte ids of every quoted string of every prompt (no quoted string: the empty string), and the index of
        the prompt each came from."""
        pad = self.tokenizer.pad_token_id
        seqs, owner = [], []
        for b, prompt in enumerate(prompts):
            texts = extract_glyph_texts(prompt) or [""]
            ids = self.tokenizer(texts, max_length=self.max_length, truncation=True).input_ids
            # Reference quirk kept for weight compatibility: one pad token is prepended to *every* string when the
            # number of strings is even (the reference tests the list length, probably meaning the string length).
            seqs += [[pad] * ((len(ids) + 1) % 2) + x for x in ids]
            owner += [b] * len(ids)
        return seqs, owner

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable encode (training): prompts -> glyph (B, L, dim) right-padded with zeros, mask (B, L).

        Every quoted string of every prompt is encoded as its own sequence, all in one batched encoder call; a
        prompt's embeddings are its strings' valid positions, concatenated (no quoted string: the empty string)."""
        seqs, owner = self._sequences(prompts)
        pad = self.tokenizer.pad_token_id
        n = max(len(x) for x in seqs)
        device = self.encoder.shared.weight.device
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in seqs], device=device)
        batch = torch.tensor([x + [pad] * (n - len(x)) for x in seqs], device=device)
        hidden = self.encoder(batch, attention_mask=mask).last_hidden_state  # (S, n, dim)
        per_prompt = [[] for _ in prompts]
        for s, b in enumerate(owner):
            per_prompt[b].append(hidden[s, : int(mask[s].sum())])
        embs = [torch.cat(e) for e in per_prompt]
        length = max(e.shape[0] for e in embs)
        out = hidden.new_zeros(len(embs), length, self.dim)
        valid = torch.zeros(len(embs), length, dtype=torch.bool, device=device)
        for i, e in enumerate(embs):
            out[i, : e.shape[0]], valid[i, : e.shape[0]] = e, True
        return out, valid

    def positions(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each glyph token of `forward(prompts)` sits in its own string: (B, L) index from the start and
        (B, L) index from the end, -1 at padding."""
        seqs, owner = self._sequences(prompts)
        per_prompt = [([], []) for _ in prompts]
        for x, b in zip(seqs, owner):
            per_prompt[b][0].extend(range(len(x)))
            per_prompt[b][1].extend(range(len(x) - 1, -1, -1))
        length = max(len(f) for f, _ in per_prompt)
        start = torch.full((len(prompts), length), -1, dtype=torch.long)
        end = start.clone()
        for i, (f, r) in enumerate(per_prompt):
            start[i, : len(f)], end[i, : len(r)] = torch.tensor(f), torch.tensor(r)
        return start, end

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> glyph (B, L, dim) right-padded with zeros, and mask (B, L) bool (True = real token)."""
        return self(prompts)

    @torch.no_grad()
    def encode_one(self, prompt: str) -> torch.Tensor:
        """Prompt -> glyph embeddings (L, dim): every quoted string encoded, valid positions concatenated."""
        out, valid = self([prompt])
        return out[0][valid[0]]


GLYPH_PRESETS: dict[str, dict] = {
    # ByT5-small encoder: 217.7 M parameters
    "glm-image": dict(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False),
}
