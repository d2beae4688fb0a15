"""The method's semantics, checked on the step itself: CutMix, the EMA teacher, masks, loss weights.

The step runs with stub models whose logits are their input images (3 classes = 3 channels), so
a test controls the teacher's confidence and can trace every pixel back to its source image.
At the end, a small real network runs DDFP's step against a transcription of it. Wherever a
loss is compared with one written out here, so are its gradients w.r.t. every parameter.
Several processes are simulated by threads (:func:`simulated_processes`): no process is launched.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable, TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sandbox.processes.collectives as distributed
import sandbox.train.step as step_module
from sandbox.api import ClassifierOutput, ConsistencyLoss, Perturbation, PerturbationContext
from sandbox.api import SegmentationNetwork, SegmentationOutput, classifier_layers
from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.cutmix import apply_cutmix, cutmix_boxes
from sandbox.train.ema import ema_decay, update_teacher
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch
from sandbox_builtins.consistency_losses import PseudoLabelCrossEntropy
from sandbox.train.student_pass import StudentPass, classify
from gradient_checks import ATOL, RTOL, assert_same_gradients, parameter_gradients, reached

T = TypeVar("T")

# -- CutMix -------------------------------------------------------------------------------------


def test_cutmix_with_p_zero_leaves_every_tensor_untouched() -> None:
    boxes = cutmix_boxes(6, 20, 30, 0.0, torch.Generator().manual_seed(0))
    assert not boxes.any()
    images, probs = torch.randn(6, 3, 20, 30), torch.rand(6, 4, 20, 30)
    mixed_images, mixed_probs = apply_cutmix(boxes, images, probs)
    assert torch.equal(mixed_images, images) and torch.equal(mixed_probs, probs)


def test_cutmix_boxes_are_rectangles_of_2_to_40_percent_with_bounded_aspect() -> None:
    boxes = cutmix_boxes(200, 64, 64, 1.0, torch.Generator().manual_seed(1))
    for box in boxes:
        rows, cols = box.any(dim=1).nonzero()[:, 0], box.any(dim=0).nonzero()[:, 0]
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert box.sum() == height * width, "one solid rectangle"
        assert 0.015 <= height * width / 64**2 <= 0.42  # rounding to whole pixels
        assert 0.3 / 1.5 <= width / height <= 1.5 / 0.3  # rounding and clipping to the image


def test_cutmix_p_is_the_fraction_of_mixed_samples_and_the_generator_decides() -> None:
    boxes = cutmix_boxes(2000, 16, 16, 0.5, torch.Generator().manual_seed(2))
    assert abs(boxes.flatten(1).any(dim=1).float().mean().item() - 0.5) < 0.05
    again = cutmix_boxes(2000, 16, 16, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(boxes, again)


def test_cutmix_mixes_images_and_targets_with_the_same_box_from_the_same_partner() -> None:
    batch = 4
    boxes = cutmix_boxes(batch, 24, 24, 1.0, torch.Generator().manual_seed(3))
    identity = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    images = identity.expand(batch, 3, 24, 24)
    probs = F.one_hot(torch.arange(batch).view(batch, 1, 1).expand(batch, 24, 24), batch).permute(0, 3, 1, 2).float()
    padding = torch.zeros(batch, 24, 24, dtype=torch.bool)
    padding[1] = True
    mixed_images, mixed_probs, mixed_padding = apply_cutmix(boxes, images, probs, padding)
    partner = (torch.arange(batch) - 1) % batch
    expected_source = torch.where(boxes, partner.view(batch, 1, 1), torch.arange(batch).view(batch, 1, 1))
    assert torch.equal(mixed_images[:, 0], expected_source.float())
    assert torch.equal(mixed_probs.argmax(dim=1), expected_source)
    assert torch.equal(mixed_padding, expected_source == 1)


# -- the EMA teacher ----------------------------------------------------------------------------


def test_ema_decay_is_warm_started_then_capped() -> None:
    assert ema_decay(100, 100, 0.99) == 0.0, "the first semi-supervised step copies the student"
    assert [ema_decay(100 + k, 100, 0.99) for k in (1, 2, 9)] == pytest.approx([1 / 2, 2 / 3, 9 / 10])
    assert ema_decay(100 + 99, 100, 0.99) == pytest.approx(0.99)
    assert ema_decay(100 + 5000, 100, 0.99) == 0.99


def test_warm_started_teacher_is_the_uniform_average_of_the_students_until_the_cap() -> None:
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    values = torch.randn(30).tolist()
    for k, value in enumerate(values):
        student.weight.data.fill_(value)
        update_teacher(teacher, student, ema_decay(10 + k, 10, 0.999))
        assert teacher.weight.item() == pytest.approx(sum(values[: k + 1]) / (k + 1), abs=1e-5)


def test_update_teacher_copies_buffers_only_when_asked() -> None:
    teacher, student = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.running_mean.fill_(5.0)
    student.weight.data.fill_(2.0)
    update_teacher(teacher, student, 0.5, "own")
    assert torch.equal(teacher.running_mean, torch.zeros(3)), "own statistics: the EMA touches parameters only"
    assert torch.allclose(teacher.weight, torch.full((3,), 1.5))
    update_teacher(teacher, student, 0.5, "student")
    assert torch.equal(teacher.running_mean, student.running_mean)


def test_update_teacher_averages_buffers_as_unimatch_v2() -> None:
    """``teacher_statistics = "ema"``: unimatch_v2.py's ``buffer_ema * r + buffer * (1 - r)`` for the
    statistics; the integer ``num_batches_tracked`` is copied."""
    teacher, student = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.running_mean.fill_(4.0)
    student.running_var.fill_(3.0)
    student.num_batches_tracked.fill_(7)
    update_teacher(teacher, student, 0.75, "ema")
    assert torch.allclose(teacher.running_mean, torch.full((3,), 1.0))
    assert torch.allclose(teacher.running_var, torch.full((3,), 0.75 * 1.0 + 0.25 * 3.0))
    assert int(teacher.num_batches_tracked) == 7


# -- the step with stub models -------------------------------------------------------------------

CLASSES = 3


class StubModel(nn.Module):
    """Logits = input images x ``scale`` (3 channels = 3 classes); the perturbation sees the images."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.norm = nn.BatchNorm2d(3)
        self.inputs: list[Tensor] = []

    def forward(self, images: Tensor, perturb=None, num_perturbed: int = 0, perturb_at: str = "classifier") -> SegmentationOutput:  # noqa: ANN001
        self.inputs.append(images)
        self.norm(images)  # collects running statistics in train mode, as a real network's BatchNorms
        classify = lambda x: ClassifierOutput(x * self.scale, x)  # noqa: E731
        perturbed_logits = None
        if perturb is not None and num_perturbed > 0:
            perturbed = perturb(images[-num_perturbed:], classify, classify(images[-num_perturbed:]))
            perturbed_logits = None if perturbed is None else classify(perturbed).logits
        return SegmentationOutput(images * self.scale, images, perturbed_logits)


def fixed_value_loss(value: float, logits: Tensor) -> Tensor:
    """``value``, with the gradient of ``value x mean(logits)``: a loss whose value a test knows
    and whose gradient still says which logits (and so which parameters) it was given."""
    mean = logits.float().mean()
    return value * (1.0 + (mean - mean.detach()))


class RecordingLoss(ConsistencyLoss):
    """A loss of fixed value (see :func:`fixed_value_loss`) that records what it was given."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        self.calls.append((logits, target_probs, valid))
        return fixed_value_loss(self.value, logits)


class ShiftPerturbation(Perturbation):
    """Adds 1 to the features (or makes no view) and records the trusted-pixel mask it was given."""

    def __init__(self, makes_view: bool = True) -> None:
        super().__init__()
        self.makes_view = makes_view
        self.valid: list[Tensor] = []

    def forward(self, features: Tensor, context: PerturbationContext) -> Tensor | None:
        self.valid.append(context.valid)
        return features + 1.0 if self.makes_view else None


def make_step(makes_view: bool = True, **settings: object) -> tuple[SemiSupervisedStep, RecordingLoss, RecordingLoss, ShiftPerturbation]:
    values = {"threshold": 0.9, "cutmix_p": 0.0, "perturbation_start_iters": 5, **settings}
    strong, perturbed, perturbation = RecordingLoss(0.7), RecordingLoss(0.3), ShiftPerturbation(makes_view)
    method = MethodComponents(perturbation, None, strong, perturbed)
    return SemiSupervisedStep(TrainSection(**values), method, 255, seed=0), strong, perturbed, perturbation


def batches(size: int = 8) -> tuple[LabeledBatch, UnlabeledBatch]:
    generator = torch.Generator().manual_seed(0)
    labeled = LabeledBatch(torch.randn(2, 3, size, size, generator=generator), torch.randint(0, CLASSES, (2, size, size), generator=generator))
    weak = torch.zeros(2, 3, size, size)
    weak[:, 0, : size // 2] = 10.0  # confident class 0 in the top half; uniform (1/3) below
    padding = torch.zeros(2, size, size, dtype=torch.bool)
    padding[:, :, :2] = True  # two padded columns
    strong = torch.randn(2, 3, size, size, generator=generator)
    return labeled, UnlabeledBatch(weak, strong, padding)


def stub_step_loss(student: StubModel, labeled: LabeledBatch, strong_weight: float, perturbed_weight: float | None) -> Tensor:
    """The step's loss with :func:`make_step`'s losses, written out from the student's one pass
    (labeled + strong images): CE of the labeled logits + ``strong_weight`` x 0.7 on the strong
    logits + ``perturbed_weight`` x 0.3 on the perturbed ones (the features + 1; None: no view)."""
    images, count = student.inputs[0], labeled.images.shape[0]
    loss = F.cross_entropy(images[:count] * student.scale, labeled.masks)
    loss = loss + strong_weight * fixed_value_loss(0.7, images[count:] * student.scale)
    if perturbed_weight is not None:
        loss = loss + perturbed_weight * fixed_value_loss(0.3, (images[count:] + 1.0) * student.scale)
    return loss


def assert_loss_and_gradients(loss: Tensor, expected: Tensor, student: nn.Module) -> None:
    """``loss`` equals ``expected`` in value and in its gradient w.r.t. every parameter of ``student``."""
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    parameters = dict(student.named_parameters())
    assert "scale" in reached(assert_same_gradients(loss, parameters, expected, parameters))


def test_trusted_pixels_are_the_confident_unpadded_ones_for_both_views() -> None:
    step, strong, _, perturbation = make_step()
    labeled, unlabeled = batches()
    step.semi_supervised(5, StubModel(), StubModel(), labeled, unlabeled)
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[:, :4] = True
    expected[:, :, :2] = False
    valid = strong.calls[0][2]
    assert torch.equal(valid, expected)
    assert torch.equal(perturbation.valid[0], expected), "the perturbation sees the same trusted pixels"


def test_trusted_ratio_is_trusted_over_non_padding_pixels_of_the_pseudo_labelled_view() -> None:
    step, *_ = make_step(cutmix_p=1.0)  # the strong view's mixing must not change it
    labeled, unlabeled = batches()  # top half confident, two of eight columns padding
    _, logs = step.semi_supervised(5, StubModel(), StubModel(), labeled, unlabeled)
    assert logs["trusted_ratio"].item() == pytest.approx(0.5), "4 x 6 trusted of 8 x 6 non-padding pixels"


def test_threshold_is_strict_and_teacher_probabilities_are_the_targets() -> None:
    step, strong, _, _ = make_step(threshold=1 / 3)
    labeled, unlabeled = batches()
    step.semi_supervised(5, StubModel(), StubModel(), labeled, unlabeled)
    _, probs, valid = strong.calls[0]
    assert torch.allclose(probs, unlabeled.weak.softmax(dim=1))
    assert not valid[:, 4:].any(), "confidence 1/3 is not above a threshold of 1/3"


def test_loss_weights_with_and_without_the_perturbed_view() -> None:
    """The loss and its gradients: each view's loss enters with its weight, from that view's logits."""
    labeled, unlabeled = batches()
    for step_index, strong_weight, perturbed_weight in ((4, 1.0, None), (5, 0.5, 0.5)):
        step, _, perturbed, _ = make_step()
        student = StubModel()
        loss, logs = step.semi_supervised(step_index, student, StubModel(), labeled, unlabeled)
        assert_loss_and_gradients(loss, stub_step_loss(student, labeled, strong_weight, perturbed_weight), student)
        assert ("loss_perturbed" in logs) == (step_index >= 5), "the perturbed view starts at perturbation_start_iters"
        assert len(perturbed.calls) == (1 if step_index >= 5 else 0)


def test_strong_weight_alone_and_a_perturbation_without_view() -> None:
    labeled, unlabeled = batches()
    step, _, perturbed, _ = make_step(makes_view=False)
    student = StubModel()
    loss, logs = step.semi_supervised(9, student, StubModel(), labeled, unlabeled)
    assert "loss_perturbed" not in logs and not perturbed.calls
    assert_loss_and_gradients(loss, stub_step_loss(student, labeled, 1.0, None), student)
    step, _, _, _ = make_step(makes_view=False, strong_weight_alone=0.25)
    student = StubModel()
    loss, _ = step.semi_supervised(9, student, StubModel(), labeled, unlabeled)
    assert_loss_and_gradients(loss, stub_step_loss(student, labeled, 0.25, None), student)


def test_the_perturbed_view_is_of_the_mixed_strong_images_and_shares_their_targets() -> None:
    step, strong, perturbed, _ = make_step(cutmix_p=1.0)
    labeled, unlabeled = batches()
    unlabeled.weak[:] = 0.0
    unlabeled.weak[0, 1], unlabeled.weak[1, 2] = 10.0, 10.0  # the teacher says class 1 for image 0, 2 for image 1
    unlabeled.strong[0], unlabeled.strong[1] = 1.0, 2.0  # strong images carry their identity
    unlabeled.padding[:] = False
    student = StubModel()
    step.semi_supervised(5, student, StubModel(), labeled, unlabeled)
    mixed = student.inputs[0][2:, 0]
    assert (mixed == 1.0).any() and (mixed == 2.0).any(), "each image got a box from the other"
    for _, probs, _ in (strong.calls[0], perturbed.calls[0]):
        assert torch.equal(probs.argmax(dim=1).float(), mixed), "every pixel's target is its source image's"
    assert torch.allclose(perturbed.calls[0][0], student.inputs[0][2:] + 1.0)


def test_own_teacher_statistics_come_from_its_forward_on_labeled_images_during_warm_up() -> None:
    labeled, _ = batches()
    for statistics, teacher_calls in (("own", 1), ("student", 0)):
        step, *_ = make_step(teacher_statistics=statistics)
        teacher = StubModel()
        step.supervised(StubModel(), teacher, labeled)
        assert len(teacher.inputs) == teacher_calls
        if teacher_calls:
            assert torch.equal(teacher.inputs[0], labeled.images)
            expected = 0.1 * labeled.images.mean(dim=(0, 2, 3))
            assert torch.allclose(teacher.norm.running_mean, expected, atol=1e-6)


def test_own_teacher_statistics_need_a_train_mode_teacher() -> None:
    with pytest.raises(ValueError, match="teacher_statistics = 'own' needs train.teacher_mode = 'train'"):
        TrainSection(teacher_mode="eval")
    assert TrainSection(teacher_mode="eval", teacher_statistics="student").teacher_mode == "eval"



def test_the_perturbation_size_relative_to_the_features_is_logged_on_log_steps() -> None:
    step, *_ = make_step(log_every=3, iters=10, warmup_iters=0)
    labeled, unlabeled = batches()
    unlabeled.strong[:] = 0.0
    unlabeled.strong[:, 0] = 4.0  # norm 4 everywhere; the stub perturbation adds 1 to each of 3 channels
    for index in (5, 8, 9):  # the 6th, 9th and last (10th) iterations write a log line
        _, logs = step.semi_supervised(index, StubModel(), StubModel(), labeled, unlabeled)
        assert logs["perturbation_relative_norm"].item() == pytest.approx(3**0.5 / 4)
    for index in (6, 7):
        _, logs = step.semi_supervised(index, StubModel(), StubModel(), labeled, unlabeled)
        assert "loss_perturbed" in logs and "perturbation_relative_norm" not in logs, "computed for log lines only"
    _, logs = make_step(log_every=1)[0].semi_supervised(4, StubModel(), StubModel(), labeled, unlabeled)
    assert "perturbation_relative_norm" not in logs, "no perturbed view before perturbation_start_iters"


def test_reference_cutmix_box_is_half_the_image_with_width_over_half() -> None:
    boxes = cutmix_boxes(100, 64, 48, 1.0, torch.Generator().manual_seed(4), box="half")
    for box in boxes:
        rows, cols = box.any(dim=1).nonzero()[:, 0], box.any(dim=0).nonzero()[:, 0]
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert box.sum() == height * width
        assert 48 // 2 < width < 48
        assert abs(height * width / (64 * 48) - 0.5) < 0.03


def test_batch_decision_mixes_all_samples_or_none() -> None:
    generator = torch.Generator().manual_seed(5)
    mixed = [cutmix_boxes(4, 16, 16, 0.5, generator, decision="batch").flatten(1).any(dim=1) for _ in range(200)]
    assert all(m.all() or not m.any() for m in mixed)
    assert 60 < sum(bool(m.all()) for m in mixed) < 140


def test_a_single_unlabeled_image_is_not_mixed_with_itself() -> None:
    step, strong, *_ = make_step(cutmix_p=1.0)
    labeled, unlabeled = batches()
    single = UnlabeledBatch(unlabeled.weak[:1], unlabeled.strong[:1], unlabeled.padding[:1])
    student = StubModel()
    step.semi_supervised(5, student, StubModel(), labeled, single)
    assert torch.equal(student.inputs[0][2:], single.strong), "the strong image reaches the student as it is"
    assert torch.equal(strong.calls[0][1], single.weak.softmax(dim=1))


# -- DDFP's step against a transcription ---------------------------------------------------------

DDFP_SETTINGS = {"threshold": 0.47, "cutmix_p": 1.0, "perturbation_start_iters": 0}
"""DDFP's defaults otherwise: teacher pseudo-labels (strict threshold), one strong view CutMixed with
the batch's previous image, its classifier input perturbed, 1 x sup + 0.5 x strong + 0.5 x perturbed,
each unlabeled term a mean over trusted pixels. Threshold 0.47: about half the pixels trusted
(3 classes, random weights)."""
DDFP_SEED, DDFP_STEP, DDFP_SIZE = 3, 11, 16


class SmallNetwork(SegmentationNetwork):
    """A stride-2 conv-BN-ReLU encoder and a Mix-BN classifier layer (no dropout): every kind of
    parameter a DDFP step trains, at a resolution the logits are upsampled from."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4)
        self.classifier = classifier_layers(4, 4, 1, dropout=0.0, mix_bn=True)
        self.final = nn.Conv2d(4, CLASSES, 1)
        self.feature_channels = self.embedding_channels = 4

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.conv.parameters())

    def encode(self, images: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(images)))


def ddfp_batches(seed: int = 1) -> tuple[LabeledBatch, UnlabeledBatch]:
    """Two labeled images (some pixels ignored) and three unlabeled ones, two padded on the right."""
    generator = torch.Generator().manual_seed(seed)
    images = lambda count: torch.randn(count, 3, DDFP_SIZE, DDFP_SIZE, generator=generator)  # noqa: E731
    masks = torch.randint(0, CLASSES, (2, DDFP_SIZE, DDFP_SIZE), generator=generator)
    masks[:, :2] = 255
    padding = torch.zeros(3, DDFP_SIZE, DDFP_SIZE, dtype=torch.bool)
    padding[:2, :, -4:] = True
    return LabeledBatch(images(2), masks), UnlabeledBatch(images(3), images(3), padding)


def ddfp_loss(student: SmallNetwork, teacher: SmallNetwork, labeled: LabeledBatch, unlabeled: UnlabeledBatch) -> Tensor:
    """DDFP's step written out (``ShiftPerturbation``'s features + 1 for the perturbation): the
    teacher's train-mode pass over labeled + weak images gives the pseudo-labels; each strong image
    gets a box of the previous image (and its pseudo-labels, padding); the student's one pass over
    labeled + mixed images; the mixed images' features + 1 through the auxiliary BatchNorms."""
    count, size = labeled.images.shape[0], (DDFP_SIZE, DDFP_SIZE)
    with torch.no_grad():
        probs = teacher(torch.cat([labeled.images, unlabeled.weak])).logits[count:].softmax(dim=1)
    generator = torch.Generator().manual_seed(DDFP_SEED * 1_000_003 + DDFP_STEP)
    boxes = cutmix_boxes(unlabeled.weak.shape[0], *size, 1.0, generator)
    assert boxes.flatten(1).any(dim=1).all(), "the check covers mixed pixels of every image"

    def mix(values: Tensor) -> Tensor:
        box = boxes if values.dim() == 3 else boxes[:, None]
        return torch.where(box, values.roll(1, dims=0), values)

    images, probs, padding = mix(unlabeled.strong), mix(probs), mix(unlabeled.padding)
    trusted = (probs.max(dim=1).values > DDFP_SETTINGS["threshold"]) & ~padding
    targets = probs.argmax(dim=1)
    features = student.encode(torch.cat([labeled.images, images]))
    logits = F.interpolate(classify(student, features).logits, size=size, mode="bilinear", align_corners=True)
    perturbed = classify(student, features[count:] + 1.0, auxiliary=True).logits
    perturbed = F.interpolate(perturbed, size=size, mode="bilinear", align_corners=True)

    def unsupervised(view_logits: Tensor) -> Tensor:
        return F.cross_entropy(view_logits, targets, reduction="none")[trusted].sum() / trusted.sum()

    supervised = F.cross_entropy(logits[:count], labeled.masks, ignore_index=255)
    return supervised + 0.5 * unsupervised(logits[count:]) + 0.5 * unsupervised(perturbed)


def test_the_step_computes_ddfps_loss_and_its_gradients() -> None:
    """Loss and d loss / d every student parameter within RTOL/ATOL of the transcription; the same
    BatchNorm statistics (student: main and auxiliary; teacher: its own train-mode pass)."""
    torch.manual_seed(0)
    student = SmallNetwork().train()
    torch.manual_seed(1)
    teacher = SmallNetwork().train()
    student_copy, teacher_copy = copy.deepcopy(student), copy.deepcopy(teacher)
    loss_fn = PseudoLabelCrossEntropy()
    step = SemiSupervisedStep(TrainSection(**DDFP_SETTINGS), MethodComponents(ShiftPerturbation(), None, loss_fn, loss_fn),
                              255, seed=DDFP_SEED)
    labeled, unlabeled = ddfp_batches()
    loss, logs = step.semi_supervised(DDFP_STEP, StudentPass(student), teacher, labeled, unlabeled)
    expected = ddfp_loss(student_copy, teacher_copy, labeled, unlabeled)
    torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
    assert "loss_perturbed" in logs and 0.1 < float(logs["trusted_ratio"]) < 0.9, "trusted and untrusted pixels"
    gradients = assert_same_gradients(loss, dict(student.named_parameters()), expected, dict(student_copy.named_parameters()))
    assert reached(gradients) == set(gradients), "every parameter's gradient is compared, none trivially zero"
    for ours, theirs in ((student, student_copy), (teacher, teacher_copy)):
        for name, buffer in ours.named_buffers():
            torch.testing.assert_close(buffer, dict(theirs.named_buffers())[name], rtol=RTOL, atol=ATOL, msg=name)


# -- the loss normalisation on several processes (train.loss_pixel_count) ------------------------


def simulated_processes(runs: list[Callable[[], T]]) -> list[T]:
    """``runs[rank]()`` of each of ``len(runs)`` simulated processes, run at once in threads, as under
    DDP: the step's all-reduce (``sum_over_processes``) sums what every thread passes at the same
    call and ``process_count()`` is their number (DDP's average of the gradients is the test's to
    take). The patches hold during this call only."""
    count = len(runs)
    barrier = threading.Barrier(count, timeout=60)
    slots: list[Tensor] = [torch.zeros(())] * count
    local = threading.local()
    results: list[T | None] = [None] * count
    errors: list[BaseException] = []

    def all_reduce(values: Tensor) -> Tensor:
        slots[local.rank] = values.clone()
        barrier.wait()
        summed = torch.stack(slots).sum(dim=0)
        barrier.wait()  # every thread has read the slots before any writes them again
        return summed

    def process(rank: int) -> None:
        local.rank = rank
        try:
            results[rank] = runs[rank]()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)
            barrier.abort()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_module, "sum_over_processes", all_reduce)
        patch.setattr(distributed, "process_count", lambda: count)
        threads = [threading.Thread(target=process, args=(rank,)) for rank in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def mean_gradients(losses: list[Tensor], models: list[nn.Module]) -> dict[str, Tensor]:
    """DDP's gradient: ``d losses[rank] / d models[rank]``'s parameters, averaged over the ranks by name."""
    gradients = [parameter_gradients(loss, dict(model.named_parameters())) for loss, model in zip(losses, models)]
    return {name: torch.stack([gradient[name] for gradient in gradients]).mean(dim=0) for name in gradients[0]}


class ChannelStubModel(StubModel):
    """:class:`StubModel` with one scale per class channel: its gradient tells the classes apart."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 0.5, 1.5]).view(1, CLASSES, 1, 1))


Shares = list[tuple[LabeledBatch, UnlabeledBatch]]


def uneven_batches() -> tuple[tuple[LabeledBatch, UnlabeledBatch], Shares]:
    """:func:`batches`, and its two processes' shares of one image each, whose pixel counts differ:
    process 0's labeled image has 3 of its 8 rows ignored, process 1's unlabeled image is 75% padding."""
    labeled, unlabeled = batches()
    labeled.masks[0, :3] = 255
    unlabeled.padding[1, :, :6] = True
    shares = [
        (LabeledBatch(labeled.images[i : i + 1], labeled.masks[i : i + 1]),
         UnlabeledBatch(unlabeled.weak[i : i + 1], unlabeled.strong[i : i + 1], unlabeled.padding[i : i + 1]))
        for i in range(2)
    ]
    return (labeled, unlabeled), shares


StepResults = tuple[ChannelStubModel, list[tuple[Tensor, dict[str, Tensor]]]]


def stub_process(labeled: LabeledBatch, unlabeled: UnlabeledBatch, **settings: object) -> Callable[[], StepResults]:
    """One process's run: a warm-up step and a semi-supervised step (teacher pseudo-labels, the strong
    view perturbed, cross-entropy on trusted pixels, no CutMix) on its batch; its student and each
    step's ``(loss, logs)``."""

    def run() -> StepResults:
        loss_fn = PseudoLabelCrossEntropy()
        values = {"threshold": 0.9, "cutmix_p": 0.0, "perturbation_start_iters": 0, **settings}
        step = SemiSupervisedStep(TrainSection(**values), MethodComponents(ShiftPerturbation(), None, loss_fn, loss_fn), 255, 0)
        student = ChannelStubModel()
        warm_up = step.supervised(student, ChannelStubModel(), labeled)
        return student, [warm_up, step.semi_supervised(5, student, ChannelStubModel(), labeled, unlabeled)]

    return run


def as_trained(processes: list[StepResults]) -> list[dict[str, Tensor]]:
    """What N processes train with and log, for each step of their runs: the gradient w.r.t. the scales
    averaged over the processes (DDP's) and every logged value averaged over them (the training loop's
    :func:`~sandbox.processes.collectives.mean_over_processes`); ``loss`` is logged."""
    steps = []
    for index in range(len(processes[0][1])):
        losses = [runs[index][0] for _, runs in processes]
        values = {"gradient": mean_gradients(losses, [student for student, _ in processes])["scale"]}
        keys = processes[0][1][index][1].keys()
        assert all(runs[index][1].keys() == keys for _, runs in processes)
        values.update({key: torch.stack([runs[index][1][key].float() for _, runs in processes]).mean() for key in keys})
        steps.append(values)
    return steps


def assert_same_steps(actual: list[dict[str, Tensor]], expected: list[dict[str, Tensor]], skip: tuple[str, ...] = ()) -> None:
    """Every value of every step of :func:`as_trained` equal, within RTOL/ATOL (but those in ``skip``)."""
    assert len(actual) == len(expected) == 2
    for index, (ours, theirs) in enumerate(zip(actual, expected)):
        assert ours.keys() == theirs.keys() and "loss_perturbed" in expected[-1]
        for key in ours.keys() - set(skip):
            torch.testing.assert_close(ours[key], theirs[key], rtol=RTOL, atol=ATOL, msg=f"step {index}: {key}")


def test_global_normalisation_on_two_processes_is_one_process_on_the_whole_batch() -> None:
    """``loss_pixel_count = "global"``: the processes' averaged gradient and logged values (every loss
    term, ``trusted_ratio``) are one process's on the concatenated batch, warm-up and semi-supervised."""
    whole, shares = uneven_batches()
    two = as_trained(simulated_processes([stub_process(*share) for share in shares]))
    assert_same_steps(two, as_trained([stub_process(*whole)()]))


def test_per_process_normalisation_is_the_mean_of_each_processs_own_loss() -> None:
    """``loss_pixel_count = "per_process"`` on 2 processes: each process's loss is the one it computes
    alone on its batch (each term divided by its own pixel counts), so the averaged gradient and logged
    values are the mean of the processes' own (``trusted_ratio`` stays every process's trusted over
    every process's non-padding pixels). Not one process on the whole batch, whose counts differ."""
    whole, shares = uneven_batches()
    processes = simulated_processes([stub_process(*share, loss_pixel_count="per_process") for share in shares])
    alone = [stub_process(*share)() for share in shares]
    for (_, runs), (_, own_runs) in zip(processes, alone):
        for (loss, _), (own, _) in zip(runs, own_runs):
            torch.testing.assert_close(loss, own, rtol=RTOL, atol=ATOL)
    two, one, own = as_trained(processes), as_trained([stub_process(*whole)()]), as_trained(alone)
    assert_same_steps(two, own, skip=("trusted_ratio",))
    torch.testing.assert_close(two[-1]["trusted_ratio"], one[-1]["trusted_ratio"], rtol=RTOL, atol=ATOL)
    for index, key in ((0, "loss_sup"), (0, "gradient"), (1, "loss_unsup"), (1, "loss_perturbed"), (1, "gradient")):
        difference = float((two[index][key] - one[index][key]).norm() / one[index][key].norm())
        assert difference > 0.01, f"step {index}: {key} is the whole batch's (measured: 1.8% to 19% apart)"
    alone_per_process = [stub_process(*share, loss_pixel_count="per_process")() for share in shares]
    assert_same_steps(as_trained(alone_per_process), own)  # one process: the same in both modes


def test_per_process_normalisation_is_ddfps_code_on_each_gpu() -> None:
    """train_ddfp_pascal.py's loss on each GPU is :func:`ddfp_loss` of that GPU's batch (each term a mean
    over its own pixels), DDP averaging the gradients: ``loss_pixel_count = "per_process"`` on 2
    processes gives each process that loss and the same averaged gradient of every parameter."""
    shares = [ddfp_batches(), ddfp_batches(seed=2)]
    shares[1][0].masks[:, :8] = 255  # process 1: half its labeled pixels ignored,
    shares[1][1].padding[0, :, 4:] = True  # one of its unlabeled images 75% padding
    assert (shares[0][0].masks != 255).sum() != (shares[1][0].masks != 255).sum()
    torch.manual_seed(0)
    student = SmallNetwork().train()
    torch.manual_seed(1)
    teacher = SmallNetwork().train()
    models = [(copy.deepcopy(student), copy.deepcopy(teacher)) for _ in range(4)]  # the step's two, the transcription's two
    loss_fn = PseudoLabelCrossEntropy()
    settings = TrainSection(**DDFP_SETTINGS, loss_pixel_count="per_process")

    def process(rank: int) -> Callable[[], Tensor]:
        step = SemiSupervisedStep(settings, MethodComponents(ShiftPerturbation(), None, loss_fn, loss_fn), 255, seed=DDFP_SEED)
        return lambda: step.semi_supervised(DDFP_STEP, StudentPass(models[rank][0]), models[rank][1], *shares[rank])[0]

    losses = simulated_processes([process(0), process(1)])
    expected = [ddfp_loss(*models[2 + rank], *shares[rank]) for rank in range(2)]
    for loss, reference in zip(losses, expected):
        torch.testing.assert_close(loss, reference, rtol=RTOL, atol=ATOL)
    ours = mean_gradients(losses, [models[rank][0] for rank in range(2)])
    theirs = mean_gradients(expected, [models[2 + rank][0] for rank in range(2)])
    for name, gradient in theirs.items():
        torch.testing.assert_close(ours[name], gradient, rtol=RTOL, atol=ATOL, msg=name)
    assert reached(ours) == set(ours), "every parameter's gradient is compared, none trivially zero"
