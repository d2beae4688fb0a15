"""Shared fixtures: a tiny recipe that trains in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_RECIPE = """
name = "tiny"
seed = 3
output_dir = "{output_dir}"

[dataset]
name = "shapes"
num_labeled = 8
num_unlabeled = 16
num_val = 4
image_size = 48

[backbone]
name = "timm"
model = "resnet18"

[model]
aspp_dilations = [1, 2, 3]
channels = 32
low_level_channels = 8

[density]
name = "glow"
hidden = 32
sampled_pixels = 512

[perturbation]
name = "ddfp"

[train]
iters = 6
warmup_iters = 2
batch_size = 2
unlabeled_batch_size = 2
crop_size = 32
threshold = 0.0
log_every = 2
eval_every = 3
checkpoint_every = 3
"""


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    """One torch thread: the suite runs on 2 cores, often beside other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A DDFP recipe of a few iterations on tiny generated data, writing under ``tmp_path/runs``."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(tmp_path / "runs").as_posix()))
    return path
