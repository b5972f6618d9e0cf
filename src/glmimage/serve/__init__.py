"""HTTP serving: an OpenAI-compatible Images API and a web playground (FastAPI + uvicorn)."""
from glmimage.serve.app import Limits, create_app, serve
from glmimage.serve.engine import Engine, Job, QueueFull

__all__ = ["create_app", "serve", "Limits", "Engine", "Job", "QueueFull"]
