"""Training on several processes: 2 CPU (gloo) processes on one machine, and two "machines" on one host.

The launches go through ``accelerate launch --multi_gpu`` exactly as on GPUs; CPU-only processes
talk through gloo. A small worker script trains the tiny recipe with :class:`Trainer` and saves
what each rank ended with to ``rank{i}.pt``: teacher and student weights, the reduced confusion
matrix, the optimizer's learning rate, and every run-directory write a non-main process attempted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sandbox_builtins.backbones import TimmBackbone
from sandbox_builtins.deeplabv3plus import DeepLabV3Plus
from sandbox.plugins import load_registry
from sandbox.recipe import load_recipe, resolve_components
from sandbox.processes.batchnorm import maybe_sync_batchnorm
from sandbox.train.accelerator import scaled_lr
from sandbox.train.loop import Trainer
from sandbox.rundir.directory import RunDirectory
from sandbox.processes.batchnorm import ProcessGroupBatchNorm, is_synchronised
from launching import LAUNCH_TIMEOUT_S, accelerate_command, finish, free_port, launch_env, start, wait_bounded
from shared_launch import RUNNER, Job, SharedLaunch

def train_recording_writes(folder: Path, overrides: list[str]) -> None:
    """Train the tiny recipe (``folder/tiny.toml``, runs under ``folder/runs``) with ``overrides`` through
    :class:`Trainer` and save this rank's end state to ``folder/rank{i}.pt``: teacher and student weights,
    the reduced confusion matrix, the optimizer's learning rate, and every run-directory write a
    non-main process attempted (recorded instead of done)."""
    from conftest import write_tiny_recipe
    from sandbox.train.evaluate import build_val_view, evaluate, val_loader
    from sandbox.train.student_pass import network_of

    recipe_path = write_tiny_recipe(folder)
    registry = load_registry()
    recipe = resolve_components(load_recipe(recipe_path, overrides), registry)
    run_dir = RunDirectory.for_recipe(recipe)
    trainer = Trainer(recipe, registry, run_dir)
    accelerator = trainer.accelerator
    writes: list[str] = []
    patched = {}
    if accelerator.is_main_process:
        run_dir.prepare(recipe, resume=False, overwrite=False)
    else:  # record, instead of doing, every run-directory write this process attempts
        for name in ("prepare", "append_metrics", "write_summary", "truncate_metrics", "write_file", "save_torch",
                     "begin_checkpoint", "publish_checkpoint", "remove_incomplete_checkpoints"):
            patched[RunDirectory, name] = getattr(RunDirectory, name)
            setattr(RunDirectory, name, lambda self, *args, _name=name, **kwargs: writes.append(_name))
    try:
        accelerator.wait_for_everyone()
        trainer.train()
    finally:
        for (owner, name), original in patched.items():
            setattr(owner, name, original)

    source = trainer.source
    loader = val_loader(source, recipe.eval, accelerator)
    result = evaluate(trainer.teacher, loader, source.class_names, accelerator, recipe.eval, source.ignore_index)
    expected = sum(int((mask != source.ignore_index).sum()) for _, mask in build_val_view(source, recipe.eval))
    student = network_of(accelerator.unwrap_model(trainer.model))
    torch.save(
        {
            "num_processes": accelerator.num_processes,
            "teacher": {k: v.detach().cpu() for k, v in trainer.teacher.state_dict().items()},
            "student": {k: v.detach().cpu() for k, v in student.named_parameters()},
            "density": {k: v.detach().cpu() for k, v in trainer.method.density.state_dict().items()},
            "density_adam": trainer.method.density.optimizer_state()["optimizer"]["state"],
            "matrix": result.matrix,
            "expected_pixels": expected,
            "shard_images": len(loader.dataset),
            "initial_lr": [group["initial_lr"] for group in trainer.optimizer.param_groups],
            "synchronised": [is_synchronised(student), is_synchronised(trainer.teacher)],
            "writes": writes,
            "step_seed": trainer.step_fn.seed,
            "next_draw": torch.rand(8),
        },
        folder / f"rank{accelerator.process_index}.pt",
    )


ONE_TEACHER = [
    "dataset.num_val=5",  # odd: the shards hold 3 and 2 images
    "train.threads=1",
    "train.reference_total_batch=2",  # 2 processes x batch 2 = 4: twice the recipe's lr
    "train.sync_bn=true",  # CPU processes: the student's and the teacher's BatchNorms over both processes' batches
]


def train_one_teacher(folder: Path) -> None:
    """Launch job: :func:`train_recording_writes` with :data:`ONE_TEACHER`."""
    train_recording_writes(folder, ONE_TEACHER)


TWO_MACHINES = ["train.threads=1", "train.iters=4", "train.batch_size=1", "train.eval_every=4", "train.checkpoint_every=4"]
"""Per-process labeled batch of 1: the ASPP image pooling meets a single sample in warm-up."""


def train_on_two_machines(folder: Path) -> None:
    """Job of the two-machine launch: :func:`train_recording_writes` with :data:`TWO_MACHINES`."""
    train_recording_writes(folder, TWO_MACHINES)


LAUNCH_JOBS = {"one_teacher": Job(train_one_teacher)}


def rank_states(out: Path, count: int) -> list[dict]:
    """What each of ``count`` ranks saved."""
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(count)]


def assert_identical_teachers(states: list[dict]) -> None:
    """Every rank's teacher (parameters and buffers) and student parameters are bit-identical."""
    reference = states[0]
    for state in states[1:]:
        assert state["teacher"].keys() == reference["teacher"].keys()
        differing = [k for k, v in state["teacher"].items() if not torch.equal(v, reference["teacher"][k])]
        assert not differing, f"teachers differ across ranks in {differing[:5]}"
        differing = [k for k, v in state["student"].items() if not torch.equal(v, reference["student"][k])]
        assert not differing, f"students differ across ranks in {differing[:5]}"
        differing = [k for k, v in state["density"].items() if not torch.equal(v, reference["density"][k])]
        assert not differing, f"density estimators differ across ranks in {differing[:5]}"
        for index, moments in reference["density_adam"].items():
            assert all(torch.equal(moments[key], state["density_adam"][index][key]) for key in ("exp_avg", "exp_avg_sq"))
    buffers = [k for k in reference["teacher"] if "running_mean" in k]
    assert buffers, "the comparison covers the BatchNorm statistics"
    assert reference["density_adam"], "the density estimator was trained"


def test_two_processes_train_one_teacher_reduce_every_val_image_and_only_rank0_writes(
    shared_launch: SharedLaunch,
) -> None:
    out = shared_launch.folder("one_teacher")
    tiny_recipe, overrides = out / "tiny.toml", ONE_TEACHER
    states = rank_states(out, 2)
    assert [s["num_processes"] for s in states] == [2, 2]
    assert_identical_teachers(states)

    # Built alike, then each process draws its own noise (dropout, VAT, CutMix boxes ...).
    recipe_seed = load_recipe(tiny_recipe).seed
    assert states[0]["step_seed"] == recipe_seed != states[1]["step_seed"]
    assert not torch.equal(states[0]["next_draw"], states[1]["next_draw"])

    # The confusion matrix is reduced over both shards, every val image counted once.
    assert sorted(s["shard_images"] for s in states) == [2, 3]
    for state in states:
        assert int(state["matrix"].sum()) == state["expected_pixels"] > 0
    assert torch.equal(states[0]["matrix"], states[1]["matrix"])

    # Linear scaling: lr x (2 x 2) / 2 for the backbone, the head's multiplier on top.
    recipe = load_recipe(tiny_recipe, overrides)
    lr = recipe.train.lr * 2
    for state in states:
        assert state["initial_lr"] == pytest.approx([lr, lr * recipe.train.head_lr_multiplier])
        assert state["synchronised"] == [True, True]

    # Only the main process writes the run directory.
    assert states[1]["writes"] == []
    run_dir = RunDirectory.for_recipe(recipe).path
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in logged if "val_miou" in r] == [3, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["lr"] == pytest.approx(lr)
    assert (run_dir / "last.pt").is_file()

    launched = shared_launch.logs[2].read_text() + shared_launch.output("one_teacher")
    warnings = [line for line in launched.splitlines() if "warning" in line]
    assert warnings == []


def test_two_machines_on_one_host_train_identical_weights(tmp_path: Path) -> None:
    """Two ``accelerate launch`` "nodes" (one CPU process each) rendezvous over 127.0.0.1 and run
    :func:`train_on_two_machines` (the shared launch's runner)."""
    port, env = free_port(), launch_env(tmp_path)
    jobs = json.dumps([["two_machines", f"{__name__}:{train_on_two_machines.__name__}"]])
    processes, logs = [], []
    try:
        for machine in (0, 1):
            command = accelerate_command(
                "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            )
            logs.append(tmp_path / f"machine{machine}.log")
            processes.append(start([*command, str(RUNNER), str(tmp_path), jobs], env, logs[-1]))
    finally:
        finish(processes, logs)
    out = tmp_path / "world2" / "two_machines"
    states = rank_states(out, 2)
    assert [s["num_processes"] for s in states] == [2, 2]
    assert_identical_teachers(states)
    assert states[1]["writes"] == []


def test_aspp_trains_on_a_batch_of_one_with_running_statistics() -> None:
    torch.manual_seed(0)
    model = DeepLabV3Plus(TimmBackbone("resnet18"), 5, [1, 2], channels=16, low_level_channels=8).train()
    norm = model.aspp.pooling[2]
    before = norm.running_mean.clone()
    out = model(torch.randn(1, 3, 32, 32))
    torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 5, (1, 32, 32))).backward()
    assert out.logits.shape == (1, 5, 32, 32) and torch.isfinite(out.logits).all()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0, "the pooling branch still trains"
    assert torch.equal(norm.running_mean, before), "a single sample does not update the statistics"
    # Two samples: ordinary batch statistics, which update the running mean.
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(norm.running_mean, before)


def test_linear_scaling_rule() -> None:
    assert scaled_lr(0.01, 4 * 8, None) == 0.01
    assert scaled_lr(0.01, 4 * 8, 16) == pytest.approx(0.02)
    assert scaled_lr(0.01, 4 * 1, 16) == pytest.approx(0.0025)
    assert scaled_lr(0.01, 2 * 3, 6) == pytest.approx(0.01)


def test_one_process_with_twice_the_reference_batch_gets_half_the_lr(tiny_recipe: Path) -> None:
    registry = load_registry()
    recipe = resolve_components(load_recipe(tiny_recipe, ["train.reference_total_batch=4", "train.sync_bn=true"]), registry)
    trainer = Trainer(recipe, registry, RunDirectory.for_recipe(recipe))
    assert trainer.accelerator.num_processes == 1
    lr = recipe.train.lr / 2
    assert [group["lr"] for group in trainer.optimizer.param_groups] == pytest.approx([lr, lr * recipe.train.head_lr_multiplier])
    assert trainer.lr == pytest.approx(lr)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()), "one process: nothing to sync"


def test_sync_bn_converts_for_several_processes_on_any_device(capsys: pytest.CaptureFixture) -> None:
    def batchnorms(model: torch.nn.Module, kind: type) -> int:
        return sum(type(m) is kind for m in model.modules())

    def small() -> DeepLabV3Plus:
        return DeepLabV3Plus(TimmBackbone("resnet18"), 5, [1, 2], channels=16, low_level_channels=8)

    count = batchnorms(small(), torch.nn.BatchNorm2d)
    cuda = SimpleNamespace(num_processes=2, device=torch.device("cuda"), is_main_process=True)
    converted = maybe_sync_batchnorm(small(), cuda, enabled=True)  # the default: the project's class on CUDA too
    assert is_synchronised(converted) and batchnorms(converted, torch.nn.SyncBatchNorm) == 0
    assert sum(isinstance(m, ProcessGroupBatchNorm) for m in converted.modules()) == count
    torch_class = maybe_sync_batchnorm(small(), cuda, enabled=True, implementation="torch")  # conversion needs no GPU
    assert batchnorms(torch_class, torch.nn.SyncBatchNorm) == count and batchnorms(torch_class, torch.nn.BatchNorm2d) == 0
    assert batchnorms(maybe_sync_batchnorm(small(), cuda, enabled=False), torch.nn.SyncBatchNorm) == 0
    single = SimpleNamespace(num_processes=1, device=torch.device("cuda"), is_main_process=True)
    assert batchnorms(maybe_sync_batchnorm(small(), single, enabled=True), torch.nn.SyncBatchNorm) == 0
    assert capsys.readouterr().err == ""

    cpu = SimpleNamespace(num_processes=2, device=torch.device("cpu"), is_main_process=True)
    synchronised = maybe_sync_batchnorm(small(), cpu, enabled=True)  # gloo: the same statistics without SyncBatchNorm
    assert is_synchronised(synchronised) and batchnorms(synchronised, torch.nn.SyncBatchNorm) == 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in synchronised.modules()) == count
    assert not is_synchronised(maybe_sync_batchnorm(small(), single, enabled=True))
    assert capsys.readouterr().err == ""


def test_process_seeds_keep_the_main_process_stream_and_differ_elsewhere() -> None:
    from sandbox.train.accelerator import process_seed

    assert process_seed(7, 0) == 7
    seeds = {process_seed(7, rank) for rank in range(16)} | {process_seed(8, rank) for rank in range(16)}
    assert len(seeds) == 32, "no two (seed, rank) pairs share a stream"


GMM_RUN = ["density.name=gmm", "train.iters=12", "train.checkpoint_every=3", "train.eval_every=6", "train.log_every=4",
           "train.threads=1", "train.deterministic=true", "train.num_workers=1"]
"""A two-process run of the tiny recipe with the ``gmm`` estimator, long enough to be killed mid-way; every
checkpoint before the last (steps 3, 6, 9) is in the middle of a log window (lines at steps 4, 8, 12).
Deterministic algorithms and a data-loader worker per stream: bit-identical runs must hold with them too."""


def assert_identical_records(expected: list[dict], actual: list[dict]) -> None:
    """The same records with the same keys, every value equal (the logged means are float32 values:
    bit for bit) but ``images_per_s``, a timing."""
    assert [record["step"] for record in actual] == [record["step"] for record in expected]
    for want, got in zip(expected, actual):
        assert got.keys() == want.keys(), want["step"]
        differing = {key: (want[key], got[key]) for key in want if key != "images_per_s" and got[key] != want[key]}
        assert not differing, (want["step"], differing)


def resumed_step(log: str) -> int:
    """The step of the checkpoint a ``--resume`` run's log says it resumed from."""
    lines = [line for line in log.splitlines() if line.startswith("resumed from ")]
    assert len(lines) == 1, log[-3000:]
    return int(re.fullmatch(r"resumed from .* \(step (\d+) of \d+\)", lines[0]).group(1))


def train_gmm_uninterrupted(folder: Path) -> None:
    """Launch job: :data:`GMM_RUN` trained to the end (``folder/runs/tiny/seed3``), what ``sandbox run``
    does on these processes."""
    from conftest import write_tiny_recipe
    from sandbox.recipe import load_resolved_recipe
    from sandbox.train.loop import start_run

    recipe_path = write_tiny_recipe(folder)
    recipe, registry = load_resolved_recipe(recipe_path, GMM_RUN, [])
    start_run(recipe, registry, resume=False, overwrite=False).train()


LAUNCH_JOBS["gmm_uninterrupted"] = Job(train_gmm_uninterrupted)


def test_gmm_run_killed_on_two_processes_resumes_to_the_uninterrupted_result(
    tiny_recipe: Path, tmp_path: Path, shared_launch: SharedLaunch
) -> None:
    """``gmm`` initialises from data: a two-process ``sandbox run`` killed after its first checkpoint and
    resumed must still equal an uninterrupted one (trained by the shared launch): the same weights, and
    every value of every record, the lines of the window the resume lands in included (each process
    continues its own window)."""
    from run_records import records

    sets = [item for override in GMM_RUN for item in ("--set", override)]
    run_dir = tmp_path / "runs" / "tiny" / "seed3"

    def launch(log: Path, *extra: str) -> subprocess.Popen:
        command = accelerate_command("--num_processes", "2", "--main_process_port", str(free_port()),
                                     "-m", "sandbox", "run", str(tiny_recipe), *sets, *extra)
        return start(command, launch_env(tmp_path), log)

    reference = shared_launch.folder("gmm_uninterrupted") / "runs" / "tiny" / "seed3"
    log = tmp_path / "killed.log"
    process = launch(log)
    first_checkpoint = run_dir / "checkpoints" / "step_00000003" / "COMPLETE"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # the launcher ends its workers (each in a session of its own) and waits
    process.wait()
    assert first_checkpoint.exists(), log.read_text()[-2000:]
    assert not (run_dir / "summary.json").exists(), "killed before the end"

    log = tmp_path / "resumed.log"
    finish([launch(log, "--resume")], [log])
    assert resumed_step(log.read_text()) in (3, 6, 9), "resumed in the middle of a log window"
    assert_identical_records(records(reference), records(run_dir))
    expected = torch.load(reference / "last.pt", weights_only=True)["model"]
    actual = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    compute = json.loads((run_dir / "summary.json").read_text())["compute"]
    assert compute["deterministic"] is True and compute["threads"] == 1


OUR_FRAME = re.compile(r'File "(?![^"]*site-packages)[^"]*[/\\](sandbox|plugins)[/\\][^"]*\.py"')
"""A traceback frame in this project's code (not in an installed library)."""


def two_machines_fail(tiny_recipe: Path, tmp_path: Path, extra: dict[int, list[str]]) -> list[str]:
    """Launch ``sandbox run`` as two one-process machines on one host (``extra[m]``: machine m's
    arguments); on both the process must exit 2 with one ``error:`` line and no traceback of ours,
    bounded by a timeout. Their ``error:`` lines.

    The launcher itself then reports the failed child (exit 1 and its own ``ChildFailedError``).
    """
    port, env = free_port(), launch_env(tmp_path)
    processes, logs = [], []
    started = time.monotonic()
    try:
        for machine in (0, 1):
            command = accelerate_command(
                "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(machine),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                "-m", "sandbox", "run", str(tiny_recipe), "--set", "train.threads=1", *extra.get(machine, []),
            )
            logs.append(tmp_path / f"machine{machine}.log")
            processes.append(start(command, env, logs[-1]))
    finally:
        wait_bounded(processes)
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S, "a process waited for its failed peer"
    lines = []
    for process, log in zip(processes, logs):
        text = log.read_text()
        assert process.returncode != 0 and "exitcode  : 2" in text, text[-3000:]
        assert not OUR_FRAME.search(text), "no traceback through our code:\n" + text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, text[-3000:]
        lines.append(errors[0])
    return lines


def test_a_dataset_missing_on_one_machine_ends_both_with_the_same_line(tiny_recipe: Path, tmp_path: Path) -> None:
    from test_dataset_folder import CLASSES, make_tree

    root = make_tree(tmp_path / "data", unlabeled=4)
    dataset = ["--set", "dataset.name=folder", "--set", f"dataset.class_names={CLASSES!r}".replace("'", '"'),
               "--set", "dataset.labeled=4"]
    lines = two_machines_fail(tiny_recipe, tmp_path, {
        0: [*dataset, "--set", f"dataset.root={root.as_posix()}"],
        1: [*dataset, "--set", f"dataset.root={(tmp_path / 'not-mounted').as_posix()}"],
    })
    assert lines[0] == lines[1]
    assert "not-mounted" in lines[0] and "(on process 1)" in lines[0]


def test_a_run_directory_conflict_ends_both_machines_with_the_same_line(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "tiny" / "seed3"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    lines = two_machines_fail(tiny_recipe, tmp_path, {})
    assert lines[0] == lines[1] and "already exists" in lines[0] and str(run_dir) in lines[0]
    assert (run_dir / "metrics.jsonl").read_text() == "{}\n", "nothing already written is lost"


RAISING_PLUGIN = Path(__file__).with_name("raising_perturbation.py")
RAISED = "perturbation 'raise_on_call' (from raising_perturbation) raised in forward:"


def raising(only_rank: int | None) -> list[str]:
    """Arguments that make the perturbation raise on its second call (step 4 of 6) on ``only_rank`` (-1: all;
    None: left to a ``--grid`` of ``perturbation.only_rank``)."""
    rank = [] if only_rank is None else ["--set", f"perturbation.only_rank={only_rank}"]
    return ["--plugin", str(RAISING_PLUGIN), "--set", "perturbation.name=raise_on_call", *rank]


@pytest.mark.slow  # its twin in the default run: the sweep that a failure on process 1 ends (below)
def test_a_plugin_raising_on_one_machine_mid_training_ends_both_with_the_same_line(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    """Process 0 is then inside a collective (the finite-loss check) that process 1 never reaches."""
    lines = two_machines_fail(tiny_recipe, tmp_path, {0: raising(1), 1: raising(1)})
    assert lines[0] == lines[1]
    assert lines[0] == (f"error: training failed after 3 of 6 steps: {RAISED} RuntimeError: planted failure on process 1 "
                        "(on process 1)")


def test_ablate_goes_on_after_runs_failing_everywhere_and_ends_after_one_failing_on_one_process(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    """On 2 processes, in this order: ``num_unlabeled = 0`` fails while building each run, the same way on
    both (recorded, the sweep goes on); the perturbation raises on every process mid-training (recorded,
    the sweep goes on); it raises on process 1 only: the sweep ends on both."""
    out = tmp_path / "sweep"
    log = tmp_path / "ablate.log"
    command = accelerate_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                                 "-m", "sandbox", "ablate", str(tiny_recipe), *raising(None),
                                 "--grid", "dataset.num_unlabeled=0,16", "--grid", "perturbation.only_rank=-1,1,7",
                                 "--set", "train.threads=1", "--output", str(out))
    started = time.monotonic()
    wait_bounded([start(command, launch_env(tmp_path), log)])
    assert time.monotonic() - started < LAUNCH_TIMEOUT_S
    text = log.read_text()
    assert "exitcode  : 2" in text, text[-3000:]
    runs = out / "tiny"
    for only_rank in (-1, 1, 7):  # the build fails before any perturbation is called
        label = f"dataset.num_unlabeled=0,perturbation.only_rank={only_rank}"
        failed = (runs / label / "seed3" / "FAILED").read_text()
        assert failed.count("\n") == 1 and "no unlabeled images" in failed, failed
        assert text.count(f"{label} seed3: FAILED") == 2, "each process reports the same outcome"
    everywhere = (runs / "dataset.num_unlabeled=16,perturbation.only_rank=-1" / "seed3" / "FAILED").read_text()
    assert everywhere == f"training failed after 3 of 6 steps: {RAISED} RuntimeError: planted failure on process 0\n"
    assert text.count("dataset.num_unlabeled=16,perturbation.only_rank=-1 seed3: FAILED") == 2, "both record it and go on"
    one = (runs / "dataset.num_unlabeled=16,perturbation.only_rank=1" / "seed3" / "FAILED").read_text()
    assert one == f"training failed after 3 of 6 steps: {RAISED} RuntimeError: planted failure on process 1 (on process 1)\n"
    assert not (runs / "dataset.num_unlabeled=16,perturbation.only_rank=7").exists(), "the sweep ended: out of step"
    assert not list(runs.rglob("CLAIM*")), "the main process gave its claim back before it ended"
    assert sum(line.startswith("error:") for line in text.splitlines()) == 2, text[-3000:]
    assert not OUR_FRAME.search(text), text[-3000:]
