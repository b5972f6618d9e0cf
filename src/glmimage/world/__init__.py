"""The synthetic world (DESIGN.md §5): scenes, renderer, captions, edit pairs and QA, deterministic from a seed.

The renderer is `glmimage.world.render.render` (not re-exported here: the function would shadow its module), and
the judges live in `glmimage.world.judges`, imported on their own because they need OpenCV and tesserocr.
"""

from glmimage.world.captions import all_captions, caption
from glmimage.world.edits import EDIT_KINDS, Edit, sample_edit
from glmimage.world.qa import QA, all_qa, sample_qa
from glmimage.world.scene import SCENE_KINDS, Background, Scene, Shape, Text, heldout_items, sample_scene, scene_kind

__all__ = [
    "EDIT_KINDS", "QA", "SCENE_KINDS", "Background", "Edit", "Scene", "Shape", "Text", "all_captions", "all_qa",
    "caption", "heldout_items", "sample_edit", "sample_qa", "sample_scene", "scene_kind",
]
