import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))  # OMP_NUM_THREADS=1 lowers it


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory):
    """The default tiny reference pipeline, saved once in the official layout."""
    from reference import build_reference

    d = tmp_path_factory.mktemp("ref") / "pipe"
    pipe = build_reference()
    pipe.save_pretrained(d)
    return d, pipe
