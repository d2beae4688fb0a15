"""The method's semantics, checked on the step itself: CutMix, the EMA teacher, masks, loss weights.

The step runs with stub models whose logits are their input images (3 classes = 3 channels), so
a test controls the teacher's confidence and can trace every pixel back to its source image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sandbox.api import ClassifierOutput, ConsistencyLoss, Perturbation, PerturbationContext
from sandbox.api import SegmentationOutput
from sandbox.recipe import TrainSection
from sandbox.train.builder import MethodComponents
from sandbox.train.cutmix import apply_cutmix, cutmix_boxes
from sandbox.train.ema import ema_decay, update_teacher
from sandbox.train.step import LabeledBatch, SemiSupervisedStep, UnlabeledBatch

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
        update_teacher(teacher, student, ema_decay(10 + k, 10, 0.999), copy_buffers=False)
        assert teacher.weight.item() == pytest.approx(sum(values[: k + 1]) / (k + 1), abs=1e-5)


def test_update_teacher_copies_buffers_only_when_asked() -> None:
    teacher, student = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    student.running_mean.fill_(5.0)
    student.weight.data.fill_(2.0)
    update_teacher(teacher, student, 0.5, copy_buffers=False)
    assert torch.equal(teacher.running_mean, torch.zeros(3)), "own statistics: the EMA touches parameters only"
    assert torch.allclose(teacher.weight, torch.full((3,), 1.5))
    update_teacher(teacher, student, 0.5, copy_buffers=True)
    assert torch.equal(teacher.running_mean, student.running_mean)


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


class RecordingLoss(ConsistencyLoss):
    """A loss of fixed value that records what it was given."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, logits: Tensor, target_probs: Tensor, valid: Tensor) -> Tensor:
        self.calls.append((logits, target_probs, valid))
        return logits.sum() * 0.0 + self.value


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


def sup_loss(model_input: Tensor, labeled: LabeledBatch) -> float:
    return F.cross_entropy(model_input[: labeled.images.shape[0]], labeled.masks).item()


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


def test_threshold_is_strict_and_teacher_probabilities_are_the_targets() -> None:
    step, strong, _, _ = make_step(threshold=1 / 3)
    labeled, unlabeled = batches()
    step.semi_supervised(5, StubModel(), StubModel(), labeled, unlabeled)
    _, probs, valid = strong.calls[0]
    assert torch.allclose(probs, unlabeled.weak.softmax(dim=1))
    assert not valid[:, 4:].any(), "confidence 1/3 is not above a threshold of 1/3"


def test_loss_weights_with_and_without_the_perturbed_view() -> None:
    labeled, unlabeled = batches()
    for step_index, expected_extra in ((4, 1.0 * 0.7), (5, 0.5 * 0.7 + 0.5 * 0.3)):
        step, _, perturbed, _ = make_step()
        student = StubModel()
        loss, logs = step.semi_supervised(step_index, student, StubModel(), labeled, unlabeled)
        assert loss.item() == pytest.approx(sup_loss(student.inputs[0], labeled) + expected_extra, rel=1e-5)
        assert ("loss_perturbed" in logs) == (step_index >= 5), "the perturbed view starts at perturbation_start_iters"
        assert len(perturbed.calls) == (1 if step_index >= 5 else 0)


def test_strong_weight_alone_and_a_perturbation_without_view() -> None:
    labeled, unlabeled = batches()
    step, _, perturbed, _ = make_step(makes_view=False)
    student = StubModel()
    loss, logs = step.semi_supervised(9, student, StubModel(), labeled, unlabeled)
    assert "loss_perturbed" not in logs and not perturbed.calls
    assert loss.item() == pytest.approx(sup_loss(student.inputs[0], labeled) + 1.0 * 0.7, rel=1e-5)
    step, _, _, _ = make_step(makes_view=False, strong_weight_alone=0.25)
    student = StubModel()
    loss, _ = step.semi_supervised(9, student, StubModel(), labeled, unlabeled)
    assert loss.item() == pytest.approx(sup_loss(student.inputs[0], labeled) + 0.25 * 0.7, rel=1e-5)


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



def test_the_perturbation_size_relative_to_the_features_is_logged() -> None:
    step, *_ = make_step()
    labeled, unlabeled = batches()
    unlabeled.strong[:] = 0.0
    unlabeled.strong[:, 0] = 4.0  # norm 4 everywhere; the stub perturbation adds 1 to each of 3 channels
    _, logs = step.semi_supervised(5, StubModel(), StubModel(), labeled, unlabeled)
    assert logs["perturbation_relative_norm"].item() == pytest.approx(3**0.5 / 4)
    _, logs = make_step()[0].semi_supervised(4, StubModel(), StubModel(), labeled, unlabeled)
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
