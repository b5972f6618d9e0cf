"""The diffusion decoder: a CogView4-style single-stream DiT conditioned on AR prior tokens and glyph embeddings."""
