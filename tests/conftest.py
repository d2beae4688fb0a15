"""Shared fixtures: a tiny recipe that trains in seconds on a CPU, its run trained once per session,
the session's shared multi-process launch; the pytest-xdist groups."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from shared_launch import SharedLaunch

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
    torch.use_deterministic_algorithms(False)  # a run with train.deterministic = true sets it for its process


def write_tiny_recipe(folder: Path) -> Path:
    """``folder/tiny.toml``: :data:`TINY_RECIPE` writing its runs under ``folder/runs``."""
    path = folder / "tiny.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "runs").as_posix()))
    return path


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A DDFP recipe of a few iterations on tiny generated data, writing under ``tmp_path/runs``."""
    return write_tiny_recipe(tmp_path)


@pytest.fixture(scope="session")
def _trained_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny recipe trained once per session on one process (checkpoints at steps 3 and 6): a folder
    holding ``tiny.toml`` and its ``runs``, for :func:`trained_tiny_run` to copy."""
    from sandbox.cli import main

    root = tmp_path_factory.mktemp("trained_tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (:func:`_single_thread`): a resume in a test computes alike
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(write_tiny_recipe(root))])
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0
    return root


@pytest.fixture
def trained_tiny_run(_trained_tiny_run: Path, tiny_recipe: Path, tmp_path: Path) -> Path:
    """The run directory ``sandbox run tiny_recipe`` leaves (``tmp_path/runs/tiny/seed3``, finished):
    a copy of the session's one training, its paths (the saved recipes' ``output_dir``) this test's own."""
    shutil.copytree(_trained_tiny_run / "runs", tmp_path / "runs")
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    original, own = _trained_tiny_run.as_posix(), tmp_path.as_posix()
    for name in ("recipe.toml", "summary.json"):
        (run_dir / name).write_text((run_dir / name).read_text().replace(original, own))
    for name in ("best.pt", "last.pt"):  # the recipe they carry
        weights = torch.load(run_dir / name, weights_only=True)
        weights["recipe"] = weights["recipe"].replace(original, own)
        torch.save(weights, run_dir / name)
    return run_dir


@pytest.fixture(scope="session")
def shared_launch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SharedLaunch:
    """The session's one launch of the library-level multi-process jobs (``tests/shared_launch.py``)."""
    from shared_launch import jobs_of, run_shared_launch

    return run_shared_launch(jobs_of(request.session.items), tmp_path_factory.mktemp("shared_launch"))


LAUNCHES = "launches"
XDIST_GROUPS = {
    "test_cutmix": "test_cutmix",  # module-scoped fixtures: computed once, on one worker
    "test_probe": "test_probe",
    # The session's shared launch runs once, on the worker of the tests that take it.
    **dict.fromkeys(["test_agreement", "test_density_distributed", "test_networks_ddp", "test_parity", "test_sync_batchnorm",
                     "test_teacher_buffers", "test_host_syncs::test_a_training_step_waits_for_the_device_once_on_two_processes",
                     "test_host_syncs::test_on_nccl_the_pixel_counts_go_through_a_gloo_group_made_once",
                     "test_distributed::test_two_processes_train_one_teacher_reduce_every_val_image_and_only_rank0_writes",
                     "test_distributed::test_gmm_run_killed_on_two_processes_resumes_to_the_uninterrupted_result"],
                    LAUNCHES),
}
"""The ``pytest-xdist`` worker groups, by test module or ``module::test``: a group's tests run on one
worker, one after another (:func:`pytest_xdist_make_scheduler`); every other test goes to whichever
worker is free."""


def xdist_scope(nodeid: str) -> str:
    """The work unit of a test for the scheduler: its group (by ``module::test``, then by module), or
    the test alone."""
    path, _, name = nodeid.partition("::")
    module = Path(path).stem
    return XDIST_GROUPS.get(f"{module}::{name.split('[', 1)[0]}", XDIST_GROUPS.get(module, nodeid))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist (-p no:xdist) nothing calls it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scope scheduler with :func:`xdist_scope` as the scope (its own ``loadgroup``
    cannot group with this pytest: it renames ``item._nodeid``, which pytest 9.2 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that takes the shared launch must be in the group that runs it once."""
    for item in items:
        if "shared_launch" in getattr(item, "fixturenames", ()) and xdist_scope(item.nodeid) != LAUNCHES:
            raise pytest.UsageError(f"{item.nodeid} takes the shared launch: add its module to XDIST_GROUPS "
                                    f"in tests/conftest.py as {LAUNCHES!r}")
