"""The autoregressive generator: a GLM-4-style decoder LM that writes semantic image tokens."""
