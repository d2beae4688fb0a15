"""``sandbox plan``: a recipe's memory, FLOPs and time per training step, traced without a GPU.

What is traced is what a run executes: the recipe's training as ``sandbox bench`` builds it
(:func:`~sandbox.bench.steps.synthetic_training`: the training loop's own networks, optimizer,
schedule, EMA teacher, density estimator and :class:`~sandbox.train.iteration.TrainingIteration`,
on random images at the recipe's crop and batch, every pixel trusted). Once built, every tensor
it holds on its device (the student's and the teacher's parameters and buffers, the estimator's,
the batch) is replaced by a *fake tensor* of torch's ``FakeTensorMode``: shape, dtype and strides,
no data. Its iterations then run for real, Python and all, while every operation computes the
metadata of its outputs only, in milliseconds at any size. :class:`DeviceMemory` counts the bytes
of every storage alive at each operation (freed when its last tensor goes) and keeps the peak;
torch's ``FlopCounterMode`` counts the FLOPs of the matrix multiplications and convolutions,
forward and backward. A step of each phase of a run is traced, twice where the phase has two
steps or more (the second holds the optimizer's state made by the first): the supervised warm-up,
the semi-supervised steps before ``perturbation_start_iters``, the rest.

Choices (torch 2.14.1):

- Fake tensors on the CPU, not on a fake CUDA device. ``FakeTensorMode`` makes fake CUDA tensors
  without a GPU, and their forward passes run, but ``torch.autocast("cuda")`` disables itself
  ("CUDA is not available") and any backward pass through them fails in the autograd engine
  (``hasPrimaryContext expects a valid device index``). On the CPU both work.
- Mixed precision: CPU autocast, with CUDA's cast policy registered over the CPU's for the trace
  (:mod:`sandbox.bench.cuda_autocast`): each activation has the dtype it has on a GPU (the
  interpolations, softmax, layer norm, sums in float32, convolutions and matmuls in half
  precision). ``fp16`` is traced in bfloat16: 2 bytes per element alike (Accelerate makes fp16
  autocast and its gradient scaler on a GPU only; the scaler's few scalars are not counted).
- The optimizer's implementation a GPU picks: torch's default is its multi-tensor (``foreach``)
  update on CUDA, with its temporaries, and a loop over parameters on a CPU; the trace uses foreach
  where the recipe leaves the choice to torch (``train.optimizer_impl = "default"``).
- Sizes of the CUDA caching allocator: each storage rounded up to 512 bytes.
- Not torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``): its module hooks fail on
  this step. It installs gradient hooks on the parameters of every module that runs, which fails
  on the frozen EMA teacher ("cannot register a hook on a tensor that doesn't require gradient");
  with those skipped, its module tracker fails on the backward pass DDFP's perturbation runs
  inside the student's forward pass ("The Module hierarchy tracking is wrong"). The tracking here
  is its own, on the same principle (a dispatch mode, weak references to storages), without
  module hooks.
- On a machine with a GPU the fake tensors are CUDA tensors (the Accelerator's device) and CUDA's
  own autocast runs; the CPU's policy registration then changes nothing.

What the trace cannot see: the allocator's fragmentation and cached free blocks (reserved memory
beyond the allocated peak), cuDNN's and cuBLAS's workspaces, the CUDA context (about 0.5 GiB,
added to the verdict), NCCL's buffers, SyncBatchNorm's exchange buffers, what ``torch.compile``
changes (the trace is eager). With several processes, DDP's gradient buckets (a copy of the
gradients) are added to the peak; nothing else of the other processes is traced. Where the host
reads a device value (the non-finite check, Adam's step count on the device) the trace reads True
or 1; where an output's size depends on values (the pixels kept for the density estimator) it
takes every element, which is what the synthetic batch gives anyway.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
from accelerate.state import AcceleratorState
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from sandbox.errors import SandboxError
from sandbox.recipe import Recipe, TrainSection
from sandbox.registry import Registry
from sandbox.train.accumulation import BatchPlan, batch_plan
from sandbox.train.iteration import MicroBatch
from sandbox.train.step import LabeledBatch, UnlabeledBatch

CUDA_BLOCK = 512
"""Bytes: the CUDA caching allocator rounds every allocation up to a multiple of this."""
CUDA_CONTEXT_GIB = 0.5
"""GiB a CUDA context takes beside the tensors (not counted by ``torch.cuda.max_memory_allocated``)."""

PARAMETERS, GRADIENTS, OPTIMIZER, TEACHER, DENSITY, BATCH, BACKUP, ACTIVATIONS, DDP = (
    "student parameters and buffers", "gradients", "optimizer state", "EMA teacher", "density estimator", "batch",
    "buffer backup", "activations and temporaries", "DDP gradient buckets",
)
"""The categories of :attr:`StepTrace.breakdown`, in the order they are printed."""
CATEGORIES = (PARAMETERS, GRADIENTS, OPTIMIZER, TEACHER, DENSITY, BATCH, BACKUP, ACTIVATIONS, DDP)


def round_up(size: int, block: int) -> int:
    """``size`` rounded up to a multiple of ``block``."""
    return -(-size // block) * block


@dataclass
class _Held:
    """A storage :class:`DeviceMemory` counts: its bytes and category (and the weak reference that frees it)."""

    size: int
    category: str
    ref: Any = None


class DeviceMemory(TorchDispatchMode):
    """The bytes of every live fake-tensor storage, by category, and their peak.

    Every output of every operation is counted (:data:`ACTIVATIONS` unless already counted in
    another category) until its storage is freed; :meth:`track` counts what exists before (the
    parameters, the batch) or gives a storage its category (gradients, optimizer state).
    ``block``: each storage's size is rounded up to a multiple of it (the CUDA allocator's 512).
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self._held: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current: dict[str, int] = defaultdict(int)
        self.total = 0
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}

    def track(self, tensor: torch.Tensor | None, category: str, retag: bool = True) -> None:
        """Count ``tensor``'s storage in ``category`` (an already counted one moves there if ``retag``)."""
        if not isinstance(tensor, FakeTensor):
            return  # host memory (real tensors), or nothing
        storage = tensor.untyped_storage()
        size = round_up(storage.nbytes(), self.block)
        held = self._held.get(storage)
        if held is None:
            held = _Held(size, category)
            held.ref = weakref.ref(storage, partial(self._freed, held))
            self._held[storage] = held
            self._add(category, size)
        else:
            if size != held.size:  # resized in place
                self._add(held.category, size - held.size)
                held.size = size
            if retag and category != held.category:
                self._add(held.category, -held.size)
                held.category = category
                self._add(category, held.size)
        self._update_peak()

    def track_all(self, tensors: Iterator[torch.Tensor], category: str) -> None:
        for tensor in tensors:
            self.track(tensor, category)

    def _freed(self, held: _Held, _ref: weakref.ref) -> None:
        self._add(held.category, -held.size)

    def _add(self, category: str, size: int) -> None:
        self.current[category] += size
        self.total += size

    def _update_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = {key: value for key, value in self.current.items() if value}

    def reset_peak(self) -> None:
        """Start a new peak from what is held now."""
        self.peak = self.total
        self.peak_breakdown = {key: value for key, value in self.current.items() if value}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, FakeTensor):
                self.track(value, ACTIVATIONS, retag=False)
        return out


def assumed_value(tensor: torch.Tensor) -> bool | int | float:
    """What the host reads of a fake scalar: True (a loss is finite, a check passes), else 1."""
    if tensor.dtype == torch.bool:
        return True
    return 1.0 if tensor.is_floating_point() else 1


class HostReads(TorchDispatchMode):
    """Runs what a fake trace cannot answer by itself.

    Host work stays real: an operation whose tensors are all real (not fake), or which draws from
    a generator (CutMix boxes from the step's seeded CPU generator), runs on real tensors, so
    ``.tolist()`` and ``if`` read real numbers. A fake value read on the host (``.item()``,
    ``bool()``) reads :func:`assumed_value`. An output whose size depends on values (``nonzero``,
    a boolean mask's selection) takes every element: the synthetic batch keeps every pixel.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        real = bool(tensors) and not any(isinstance(tensor, FakeTensor) for tensor in tensors)
        if real or kwargs.get("generator") is not None:
            with _disable_current_modes():
                return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except DataDependentOutputException:
            if func is torch.ops.aten._local_scalar_dense.default:
                return assumed_value(args[0])
            raise
        except DynamicOutputShapeException:
            return every_element(func, args, kwargs)


def all_indices(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` of a mask true everywhere: ``(numel, dim)`` int64 indices (metadata only)."""
    return torch.empty((mask.numel(), mask.dim()), dtype=torch.int64, device=mask.device)


def every_element(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func`` of a value-dependent output size, as if every element of its mask were true."""
    aten = torch.ops.aten
    if func is aten.nonzero.default:
        return all_indices(args[0])
    if func is aten.masked_select.default:
        source, mask = args[0], args[1]
        return torch.empty(torch.broadcast_shapes(source.shape, mask.shape).numel(), dtype=source.dtype, device=source.device)
    if func is aten.index.Tensor:
        source, indices = args[0], list(args[1])
        expanded: list[torch.Tensor | None] = []
        for index in indices:
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                columns = all_indices(index)
                expanded += [columns[:, axis] for axis in range(index.dim())]
            else:
                expanded.append(index)
        return func(source, expanded)
    raise SandboxError(
        f"sandbox plan cannot trace {func}: its output's size depends on values it cannot see (a fake tensor has none)"
    )


def fake_like(mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    """A fake tensor of ``tensor``'s shape, strides, dtype and device (no data)."""
    with mode:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)


def make_fake(mode: FakeTensorMode, modules: list[nn.Module | None], optimizers: list[torch.optim.Optimizer | None]) -> None:
    """Every parameter and buffer of ``modules`` replaced by a fake one, in the modules and in the
    ``optimizers``' parameter groups (before their first step: no state yet)."""
    fakes: dict[int, torch.Tensor] = {}
    for module in filter(None, modules):
        for submodule in module.modules():
            for name, parameter in submodule._parameters.items():
                if parameter is not None:
                    if id(parameter) not in fakes:
                        fakes[id(parameter)] = nn.Parameter(fake_like(mode, parameter.detach()), parameter.requires_grad)
                    submodule._parameters[name] = fakes[id(parameter)]
            for name, buffer in submodule._buffers.items():
                if buffer is not None:
                    fakes.setdefault(id(buffer), fake_like(mode, buffer))
                    submodule._buffers[name] = fakes[id(buffer)]
    for optimizer in filter(None, optimizers):
        assert not optimizer.state, "the optimizer has stepped: its state would stay real"
        for group in optimizer.param_groups:
            group["params"][:] = [fakes[id(parameter)] for parameter in group["params"]]


def fake_batch(mode: FakeTensorMode, batch: Any) -> Any:
    """A :class:`LabeledBatch`/:class:`UnlabeledBatch` of fake tensors (its host copies: the same ones,
    as a CPU batch has), or None."""
    if batch is None:
        return None
    if isinstance(batch, LabeledBatch):
        return LabeledBatch(fake_like(mode, batch.images), fake_like(mode, batch.masks))
    strong2 = None if batch.strong2 is None else fake_like(mode, batch.strong2)
    return UnlabeledBatch(fake_like(mode, batch.weak), fake_like(mode, batch.strong), fake_like(mode, batch.padding), strong2)


@dataclass
class Phase:
    """A stretch of a run whose steps compute alike."""

    name: str
    first: int
    """Its first step (0-based)."""
    steps: int
    semi_supervised: bool


def run_phases(settings: TrainSection) -> list[Phase]:
    """The supervised warm-up, the semi-supervised steps before the perturbation starts, the rest
    (those with any step)."""
    iters = settings.iters
    warmup = min(settings.warmup_iters, iters)
    start = min(max(settings.perturbation_start_iters, warmup), iters)
    phases = [
        Phase("supervised warm-up", 0, warmup, False),
        Phase("semi-supervised, no perturbation yet", warmup, start - warmup, True),
        Phase("semi-supervised", start, iters - start, True),
    ]
    return [phase for phase in phases if phase.steps > 0]


def traced_steps(phases: list[Phase]) -> list[tuple[Phase, int]]:
    """The steps traced: each phase's first two (its first alone when it has one)."""
    return [(phase, phase.first + offset) for phase in phases for offset in range(min(phase.steps, 2))]


@dataclass
class StepTrace:
    """One traced step: its peak memory (and what it held then) and its FLOPs."""

    phase: Phase
    step: int
    peak_bytes: int
    breakdown: dict[str, int]
    flops: int
    conv_flops: int
    """FLOPs of convolutions (forward and backward): cuDNN computes them in TF32 on a float32 run."""


@dataclass
class Plan:
    """What ``sandbox plan`` prints: the recipe as traced, its parameters, each traced step."""

    recipe: Recipe
    precision: str
    """The recipe's ``train.mixed_precision``."""
    traced_precision: str
    target: str
    """``cuda`` (what a GPU would hold) or ``cpu`` (what this CPU holds, to check against a measurement)."""
    batches: BatchPlan
    """Processes, micro-batch and accumulation (``train.total_batch_size``)."""
    student_parameters: int
    trainable_parameters: int
    density_parameters: int
    steps: list[StepTrace]
    ddp_bucket_bytes: int
    """DDP's gradient buckets on several processes (a copy of the trainable parameters' gradients)."""
    phases: list[Phase]

    @property
    def peak(self) -> StepTrace:
        """The traced step with the highest peak."""
        return max(self.steps, key=lambda step: step.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        """Peak bytes per process (DDP's buckets included)."""
        return self.peak.peak_bytes + self.ddp_bucket_bytes

    def phase_step(self, phase: Phase) -> StepTrace:
        """The last traced step of ``phase`` (its FLOPs are the phase's per step)."""
        return [step for step in self.steps if step.phase is phase][-1]

    @property
    def steady(self) -> StepTrace:
        """A step of the run's last phase after its first (the run's usual step)."""
        return self.phase_step(self.phases[-1])

    @property
    def run_flops(self) -> int:
        """FLOPs of every training step of the run, per process (evaluation not included)."""
        return sum(phase.steps * self.phase_step(phase).flops for phase in self.phases)

    @property
    def run_conv_flops(self) -> int:
        return sum(phase.steps * self.phase_step(phase).conv_flops for phase in self.phases)


def traced_precision(precision: str, target: str) -> str:
    """The precision the trace runs in: ``fp16`` as bfloat16 autocast for a GPU (same bytes), as
    float32 on a CPU (what a CPU run does: :func:`~sandbox.train.accelerator.effective_precision`)."""
    if precision == "fp16":
        return "bf16" if target == "cuda" else "no"
    return precision


def count_parameters(module: nn.Module | None) -> int:
    return sum(parameter.numel() for parameter in module.parameters()) if module is not None else 0


def cpu_attention_flops(query: Any, key: Any, value: Any, *_args: Any, out_shape: Any = None, **_kwargs: Any) -> int:
    """FLOPs of the CPU's flash attention (shapes in): torch's formula of its CUDA kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad: Any, query: Any, key: Any, value: Any, *_args: Any, out_shape: Any = None,
                                 **_kwargs: Any) -> int:
    """FLOPs of the CPU's flash attention's backward (shapes in)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad, query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode``, which also counts the CPU's flash attention (a fake trace on the CPU
    runs it where a GPU runs its own kernels, which torch counts already) with the same formulas."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
    })


def conv_flops(counter: FlopCounterMode) -> int:
    """The FLOPs ``counter`` counted in convolutions."""
    return sum(count for op, count in counter.get_flop_counts().get("Global", {}).items() if "conv" in str(op))


def prefer_foreach(optimizer: torch.optim.Optimizer | None) -> None:
    """Parameter groups that leave the implementation to torch get torch's CUDA default, foreach."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        if group.get("foreach") is None and not group.get("fused"):
            group["foreach"] = True


def plan_recipe(recipe: Recipe, mixed_precision: str) -> Recipe:
    """``recipe`` as its steps are traced or measured: eager (``train.compile`` off), in ``mixed_precision``."""
    train = recipe.train.model_copy(update={"compile": False, "mixed_precision": mixed_precision})
    return recipe.model_copy(update={"train": train})


def step_micro_batches(
    phase: Phase, labeled: LabeledBatch, unlabeled: UnlabeledBatch, partners: UnlabeledBatch | None, accumulation: int
) -> list[MicroBatch]:
    """The micro-batches an iteration of ``phase`` receives (``accumulation`` of them, one batch
    repeated): the labeled images alone during the warm-up."""
    batch = MicroBatch(labeled, unlabeled, partners) if phase.semi_supervised else MicroBatch(labeled)
    return [batch] * accumulation


@dataclass
class FakeTraining:
    """A recipe's synthetic training whose device tensors are fake, and the memory they hold."""

    iteration: Any
    batches: tuple
    """``(labeled, unlabeled, partners)``, fake."""
    mode: FakeTensorMode
    memory: DeviceMemory
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]
    """The student's and the density estimator's."""
    accumulation: int
    """Micro-batches per step (``train.total_batch_size``): the gradients live from the first one's backward on."""

    def trace(self, phase: Phase, step: int) -> StepTrace:
        """Run iteration ``step`` on the fake tensors: its peak memory and FLOPs."""
        memory, (optimizer, density_optimizer) = self.memory, self.optimizers
        memory.track_all(optimizer_state(optimizer), OPTIMIZER)  # made by an earlier step
        memory.track_all(optimizer_state(density_optimizer), DENSITY)
        memory.track_all(iter(self.iteration.state._saved), BACKUP)
        memory.reset_peak()
        counter = flop_counter()
        with self.mode, memory, counter, HostReads():  # the last one entered sees each operation first
            self.iteration.accumulate(step, step_micro_batches(phase, *self.batches, self.accumulation))
        return StepTrace(phase, step, memory.peak, dict(memory.peak_breakdown), counter.get_total_flops(),
                         conv_flops(counter))


def fake_training(training: Any, target: str, accumulation: int = 1) -> FakeTraining:
    """``training`` (:func:`~sandbox.bench.steps.synthetic_training`'s) on fake tensors, before its
    first iteration; its parameters, buffers and batch counted in their categories."""
    iteration = training.iteration
    method = iteration.step_fn.method
    student = training.accelerator.unwrap_model(training.model)
    optimizers = (iteration.optimizer.optimizer, getattr(method.density, "optimizer", None))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    make_fake(mode, [student, iteration.teacher, method.density, method.perturbation, method.strong_loss,
                     method.perturbed_loss], list(optimizers))
    if target == "cuda":
        for optimizer in optimizers:
            prefer_foreach(optimizer)
    batches = tuple(fake_batch(mode, batch) for batch in (training.labeled, training.unlabeled, training.partners))
    memory = DeviceMemory(CUDA_BLOCK if target == "cuda" else 1)
    for module, category in ((student, PARAMETERS), (iteration.teacher, TEACHER), (method.density, DENSITY)):
        if module is not None:
            memory.track_all(module.parameters(), category)
            memory.track_all(module.buffers(), category)
    memory.track_all((tensor for batch in batches if batch is not None for tensor in vars(batch).values()
                      if isinstance(tensor, torch.Tensor)), BATCH)
    for module, category in ((student, GRADIENTS), (method.density, DENSITY)):
        for parameter in module.parameters() if module is not None else ():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(lambda p, c=category: memory.track(p.grad, c))
    return FakeTraining(iteration, batches, mode, memory, optimizers, accumulation)


def trace_plan(recipe: Recipe, registry: Registry, num_classes: int, processes: int = 1, target: str = "cuda") -> Plan:
    """Trace the steps of :func:`traced_steps` of ``recipe`` on fake tensors (see the module's doc).

    ``target``: ``cuda`` traces what a GPU holds (its autocast policy, its optimizer default, its
    allocator's rounding); ``cpu`` what this process's CPU would, to be checked against a real step.
    """
    from sandbox.bench.cuda_autocast import cuda_autocast_policy
    from sandbox.bench.steps import synthetic_training

    precision = recipe.train.mixed_precision
    traced = traced_precision(precision, target)
    batches = batch_plan(recipe.train, processes)  # a total batch this launch cannot reach: its one-line error
    run = plan_recipe(recipe, traced)
    phases = run_phases(run.train)
    AcceleratorState._reset_state()
    try:
        training = synthetic_training(run, registry, num_classes, run.perturbation, schedule=True)
        student = training.accelerator.unwrap_model(training.model)
        trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
        parameters = (count_parameters(student), sum(p.numel() for p in trainable),
                      count_parameters(training.iteration.step_fn.method.density))
        ddp_bytes = sum(round_up(p.numel() * p.element_size(), CUDA_BLOCK) for p in trainable) if processes > 1 else 0
        del student, trainable  # the real tensors go: the fake ones replace them
        fake = fake_training(training, target, batches.accumulation)
        with cuda_autocast_policy() if target == "cuda" and traced != "no" else nullcontext():
            traces = [fake.trace(phase, step) for phase, step in traced_steps(phases)]
    finally:
        AcceleratorState._reset_state()
    return Plan(recipe, precision, traced, target, batches, *parameters, traces, ddp_bytes, phases)


def optimizer_state(optimizer: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    """Every tensor of ``optimizer``'s state."""
    if optimizer is None:
        return
    for state in optimizer.state.values():
        yield from (value for value in state.values() if isinstance(value, torch.Tensor))


# ------------------------------------------------------------------------------------------------
# Measured: the same steps run for real (benchmarks/plan_check.py, tests/test_plan.py)


@dataclass
class Measured:
    """The peak of live tensor memory over the traced steps, run for real on this process's device."""

    peak_bytes: int
    device: str
    how: str


def measure_plan_steps(recipe: Recipe, registry: Registry, num_classes: int) -> Measured:
    """Run :func:`traced_steps` of ``recipe`` for real, on this process's device (a GPU if there is one),
    each step the micro-batches ``train.total_batch_size`` makes on one process.

    On a GPU: ``torch.cuda.max_memory_allocated`` (reset before anything is built). On a CPU:
    torch's profiler records every allocation and free of the CPU allocator from before the
    networks are built; the peak is the highest running sum of live bytes during the steps.
    """
    from sandbox.bench.steps import synthetic_training
    from sandbox.processes.launch import has_accelerator_device

    cuda = torch.cuda.is_available() and has_accelerator_device()
    target = "cuda" if cuda else "cpu"
    precision = recipe.train.mixed_precision
    run = plan_recipe(recipe, precision if cuda else traced_precision(precision, "cpu"))  # as this device trains
    steps = traced_steps(run_phases(run.train))
    accumulation = batch_plan(run.train, 1).accumulation
    AcceleratorState._reset_state()
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            training = synthetic_training(run, registry, num_classes, run.perturbation, schedule=True)
            run_steps(training, steps, accumulation)
            torch.cuda.synchronize()
            peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        else:
            peak, how = profiled_peak(lambda: run_steps(synthetic_training(run, registry, num_classes, run.perturbation,
                                                                           schedule=True), steps, accumulation)), "torch.profiler (CPU allocator)"
    finally:
        AcceleratorState._reset_state()
    return Measured(peak, target, how)


STEPS_RANGE = "sandbox_plan_steps"


def run_steps(training: Any, steps: list[tuple[Phase, int]], accumulation: int = 1) -> None:
    """``training``'s iteration at each of ``steps`` (semi-supervised or warm-up as its phase is), each on
    ``accumulation`` micro-batches."""
    with torch.profiler.record_function(STEPS_RANGE):
        for phase, step in steps:
            micro_batches = step_micro_batches(phase, training.labeled, training.unlabeled, training.partners, accumulation)
            training.iteration.accumulate(step, micro_batches)


def profiled_peak(work: Callable[[], None]) -> int:
    """The highest sum of live CPU-allocator bytes while ``work`` runs :data:`STEPS_RANGE` (counted from
    ``work``'s start: what it allocates before the range, its networks, counts too)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        work()
    events = profiler.profiler.kineto_results.events()
    window = next(event for event in events if event.name() == STEPS_RANGE)
    start, end = window.start_ns(), window.start_ns() + window.duration_ns()
    memory = sorted((event.start_ns(), event.nbytes()) for event in events
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    live, peak = 0, 0
    for time_ns, size in memory:
        live += size
        if start <= time_ns <= end:
            peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------------
# GPUs and the estimate of a run's time


@dataclass(frozen=True)
class Gpu:
    """A GPU's memory and dense (no sparsity) peak TFLOPS by arithmetic (None: no such units)."""

    name: str
    memory_gib: float
    fp32: float
    tf32: float | None
    fp16: float
    bf16: float | None


GPUS = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67, TF32 989 / BF16 1979 / FP16 1979 TFLOPS
    # "with sparsity": dense is half.
    Gpu("H100 SXM", 80, 67.0, 494.7, 989.4, 989.4),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): the same compute as the H100 SXM, 141 GB HBM3e.
    Gpu("H200", 141, 67.0, 494.7, 989.4, 989.4),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): FP32 19.5, TF32 156, BF16 312, FP16 312 (dense).
    Gpu("A100 80GB", 80, 19.5, 156.0, 312.0, 312.0),
    # NVIDIA Tesla V100 datasheet (SXM2 32GB): FP32 15.7, tensor (FP16) 125; no TF32, no bfloat16 units.
    Gpu("V100", 32, 15.7, None, 125.0, None),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix (GeForce RTX 4090): FP32 82.6, TF32 tensor
    # 82.6, FP16 and BF16 tensor with FP32 accumulate 165.2 (dense; torch accumulates in FP32).
    Gpu("RTX 4090", 24, 82.6, 82.6, 165.2, 165.2),
)
"""Named GPUs of ``sandbox plan --gpu``. Memory: nominal GB as sold, read as GiB."""


def normalised(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


GPU_ALIASES = {alias: gpu for gpu in GPUS for alias in {normalised(gpu.name), normalised(gpu.name.split()[0]),
                                                       normalised(gpu.name.split()[-1])}}
"""``--gpu`` names: each GPU's name without spaces and case (``h100sxm``), its first word (``h100``, ``rtx``...)
and its last (``4090``)."""


def find_gpu(name: str) -> Gpu:
    """The GPU ``--gpu NAME`` names (case, spaces and dashes ignored); a one-line error listing them otherwise."""
    gpu = GPU_ALIASES.get(normalised(name))
    if gpu is None:
        known = ", ".join(repr(gpu.name) for gpu in GPUS)
        raise SandboxError(f"--gpu {name!r}: unknown GPU; known: {known} (or pass --gpu-throughput TFLOPS)")
    return gpu


@dataclass
class Rates:
    """The TFLOPS assumed for each kind of FLOP, and how to say so."""

    conv: float
    other: float
    label: str


def gpu_rates(gpu: Gpu, precision: str) -> Rates:
    """``gpu``'s dense peaks for a run in ``precision``: every FLOP in half precision under autocast;
    in float32, convolutions in TF32 (cuDNN's default, ``torch.backends.cudnn.allow_tf32``) and
    matrix multiplications in FP32 (torch's default: ``torch.backends.cuda.matmul.allow_tf32`` off)."""
    if precision in ("fp16", "bf16"):
        rate = gpu.fp16 if precision == "fp16" else gpu.bf16
        if rate is None:
            raise SandboxError(f"--gpu {gpu.name!r} has no bfloat16 units (train.mixed_precision = 'bf16'); "
                               f"pass --gpu-throughput TFLOPS")
        return Rates(rate, rate, f"{precision} tensor cores {rate:g} TFLOPS")
    tf32 = gpu.tf32 if gpu.tf32 is not None else gpu.fp32
    label = (f"convolutions in TF32 {tf32:g}, matmuls in FP32 {gpu.fp32:g} TFLOPS" if gpu.tf32 is not None
             else f"FP32 {gpu.fp32:g} TFLOPS")
    return Rates(tf32, gpu.fp32, label)


def run_hours(plan: Plan, rates: Rates, utilisation: float) -> float:
    """Hours of the run's training steps at ``utilisation`` of ``rates`` (each process on its own GPU, in parallel)."""
    conv = plan.run_conv_flops
    seconds = (conv / (rates.conv * 1e12) + (plan.run_flops - conv) / (rates.other * 1e12)) / utilisation
    return seconds / 3600


# ------------------------------------------------------------------------------------------------
# Printing


def format_bytes(size: float) -> str:
    gib = size / 2**30
    return f"{gib:.2f} GiB" if gib >= 1 else f"{size / 2**20:.1f} MiB"


def format_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def format_count(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def format_hours(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.1f} min"
    return f"{hours * 3600:.1f} s"


@dataclass
class Verdict:
    fits: bool
    needed_gib: float
    line: str


def verdict(plan: Plan, memory_gib: float, where: str) -> Verdict:
    """Whether the peak plus a CUDA context fits in ``memory_gib`` GiB, in one line."""
    needed = plan.peak_bytes / 2**30 + CUDA_CONTEXT_GIB
    share = needed / memory_gib
    if needed <= memory_gib:
        line = (f"fits: {needed:.2f} GiB (the peak + {CUDA_CONTEXT_GIB} GiB of CUDA context) is {share:.0%} of "
                f"{memory_gib:g} GiB{where}")
        if share > 0.9:
            line += "; tight: the allocator's fragmentation may take the rest"
    else:
        line = (f"does not fit: {needed:.2f} GiB (the peak + {CUDA_CONTEXT_GIB} GiB of CUDA context) is {share:.0%} of "
                f"{memory_gib:g} GiB{where}; a smaller batch or crop needs less")
    return Verdict(needed <= memory_gib, needed, line)


def plan_lines(plan: Plan, memory_gib: float, memory_source: str, rates: Rates | None, gpu_label: str,
               utilisation: float) -> list[str]:
    """The lines ``sandbox plan`` prints."""
    recipe, train, processes = plan.recipe, plan.recipe.train, plan.batches.processes
    labeled, unlabeled, accumulation = train.batch_size, train.unlabeled_batch_size, plan.batches.accumulation
    per_step = f", accumulating {accumulation} micro-batches a step" if accumulation > 1 else ""
    lines = [
        f"plan: {recipe.name}, crop {train.crop_size}, {labeled} labeled + {unlabeled} unlabeled images per process "
        f"on {processes} process{'es' if processes > 1 else ''}{per_step}: total batch {plan.batches.total} + "
        f"{unlabeled * processes * accumulation}, {train.iters} iterations",
        f"traced on fake tensors (torch {torch.__version__.split('+')[0]}): one training step of each phase, the "
        f"training loop's own iteration on random images, every pixel trusted",
        "precision: " + precision_text(plan),
        *(["train.compile = true: traced eager (compiled code usually holds less)"] if train.compile else []),
        f"parameters: student {format_count(plan.student_parameters)} ({format_count(plan.trainable_parameters)} "
        f"trainable), EMA teacher {format_count(plan.student_parameters)}"
        + (f", density estimator {format_count(plan.density_parameters)}" if plan.density_parameters else ""),
    ]
    peak = plan.peak
    lines.append(f"peak memory per process: {format_bytes(plan.peak_bytes)} (at step {peak.step}: {peak.phase.name})")
    breakdown = dict(peak.breakdown)
    if plan.ddp_bucket_bytes:
        breakdown[DDP] = plan.ddp_bucket_bytes
    lines.append("  " + ", ".join(f"{name} {format_bytes(breakdown[name])}" for name in CATEGORIES if breakdown.get(name)))
    steady = plan.steady
    lines.append(f"FLOPs per step: {format_flops(steady.flops)} per process ({steady.phase.name}; matmuls and "
                 f"convolutions, forward and backward)")
    parts = [f"{phase.steps} x {format_flops(plan.phase_step(phase).flops)} ({phase.name})" for phase in plan.phases]
    total = f", {format_flops(plan.run_flops * processes)} on {processes} processes" if processes > 1 else ""
    lines.append(f"FLOPs per run: {format_flops(plan.run_flops)} per process{total} = {' + '.join(parts)}; "
                 f"evaluation not included")
    lines.append(verdict(plan, memory_gib, memory_source).line)
    if rates is not None:
        hours = run_hours(plan, rates, utilisation)
        lines.append(f"time (an estimate): {format_hours(hours)} of training steps on {processes} x {gpu_label}, "
                     f"assuming {utilisation:.0%} of the peak ({rates.label}); evaluation, data loading and "
                     f"communication not included")
    return lines


def precision_text(plan: Plan) -> str:
    """How the recipe's precision was traced."""
    if plan.precision == "no":
        return "float32 (train.mixed_precision = 'no')"
    if plan.traced_precision == "no":
        return f"{plan.precision} traced as float32, as this CPU runs it"
    how = f"{plan.precision} autocast"
    if plan.target == "cuda":
        how += ", traced with CUDA's autocast policy"
        if plan.precision == "fp16":
            how += " in bfloat16 (2 bytes per element alike; fp16's gradient scaler is not counted)"
    return how
