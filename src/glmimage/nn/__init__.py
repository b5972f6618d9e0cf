"""Small shared primitives: RMSNorm, rotary embeddings, sinusoidal timestep embedding."""
from glmimage.nn.layers import RMSNorm, apply_rotary, mrope_cos_sin, rope_2d_cos_sin, timestep_embedding

__all__ = ["RMSNorm", "apply_rotary", "mrope_cos_sin", "rope_2d_cos_sin", "timestep_embedding"]
