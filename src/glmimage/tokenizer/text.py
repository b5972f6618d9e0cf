"""Text tokenizer for the AR prompt: a `tokenizers` BPE whose vocabulary also holds the visual ids.

Official layout (GLM-Image processor/tokenizer.json): ids 0..16383 are `<|dit_token_i|>` VQ codes, 16384/16385 the
image start/end tokens, then the GLM-4 text vocabulary. `byte_level()` builds the same layout at any codebook size
with a 256-symbol byte vocabulary, deterministic and file-free, for the debug and world presets.
"""
from __future__ import annotations

import re

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

IMAGE_START = "<|dit_token_16384|>"  # also the generation BOS
IMAGE_END = "<|dit_token_16385|>"  # also EOS
IMAGE_PLACEHOLDER = "<|image|>"
GRID_BOS, GRID_EOS = "<sop>", "<eop>"
PAD = "<|endoftext|>"
SPECIALS = [IMAGE_START, IMAGE_END, PAD, GRID_BOS, GRID_EOS, IMAGE_PLACEHOLDER]
_CONTROL = re.compile("|".join([re.escape(t) for t in SPECIALS] + [r"<\|dit_token_\d+\|>"]))


def find_control_token(text: str) -> str | None:
    """The first control token written literally in user text (it would be read as layout, not as text)."""
    m = _CONTROL.search(text)
    return m.group(0) if m else None


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        missing = [s for s in SPECIALS if tokenizer.token_to_id(s) is None]
        if missing:
            raise ValueError(f"text tokenizer lacks the GLM-Image special tokens {missing}")
        self.image_start_id = tokenizer.token_to_id(IMAGE_START)
        self.image_end_id = tokenizer.token_to_id(IMAGE_END)
        self.image_placeholder_id = tokenizer.token_to_id(IMAGE_PLACEHOLDER)
        self.pad_id = tokenizer.token_to_id(PAD)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Tokenize like GlmImageProcessor.apply_chat_template: post-processor specials only when the text does not
        already start with the BOS (image-start) token."""
        return self.tok.encode(text, add_special_tokens=not text.startswith(IMAGE_START)).ids

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"text tokenizer file not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"cannot read text tokenizer {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def to_json(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text))

    @classmethod
    def byte_level(cls, codebook_size: int) -> "TextTokenizer":
        """Deterministic byte-level vocabulary: visual ids first (0..codebook_size-1), then the specials, then the
        256 byte symbols. No merges: every byte of a prompt is one token."""
        visual = [f"<|dit_token_{i}|>" for i in range(codebook_size)]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {t: i for i, t in enumerate(visual + SPECIALS + alphabet)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in visual + SPECIALS])
        return cls(tok)


def train_bpe(texts, codebook_size: int, merges: int) -> TextTokenizer:
    """A byte-level BPE trained on `texts` (tokenizers' BpeTrainer), in the official layout: visual ids first, then
    the specials, the 256 byte symbols and `merges` learned merges. Any string still encodes (bytes are the
    fallback), so unseen words cost more tokens but never fail."""
    from tokenizers import trainers

    visual = [f"<|dit_token_{i}|>" for i in range(codebook_size)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=codebook_size + len(SPECIALS) + len(alphabet) + merges,
                                  special_tokens=visual + SPECIALS, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in visual + SPECIALS])
    out = TextTokenizer(tok)
    if [tok.token_to_id(v) for v in visual[:1] + visual[-1:]] != [0, codebook_size - 1]:
        raise RuntimeError("BPE trainer did not put the visual ids first")  # tokenizers contract changed
    return out


def tokenizer_config_json() -> str:
    """tokenizer_config.json for the official processor layout (transformers 5 'TokenizersBackend')."""
    return json.dumps({
        "backend": "tokenizers", "bos_token": IMAGE_START, "eos_token": IMAGE_END, "pad_token": PAD,
        "image_token": IMAGE_PLACEHOLDER, "grid_bos_token": GRID_BOS, "grid_eos_token": GRID_EOS,
        "padding_side": "left", "processor_class": "GlmImageProcessor", "tokenizer_class": "TokenizersBackend",
    }, indent=2)
