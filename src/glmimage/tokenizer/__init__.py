"""Tokenizers: the AR text tokenizer wrapper and the semantic visual tokenizer (ViT encoder + cosine VQ)."""
