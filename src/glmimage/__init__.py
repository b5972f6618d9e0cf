"""glmimage: run, train, fine-tune and serve GLM-Image-style models anywhere, in PyTorch."""
from glmimage.checkpoint import build, export_official, load, save
from glmimage.config import PRESETS, ModelConfig, preset
from glmimage.pipeline import Pipeline, Result

__all__ = ["load", "save", "export_official", "build", "Pipeline", "Result", "ModelConfig", "preset", "PRESETS"]
__version__ = "0.1.0"
