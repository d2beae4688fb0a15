"""Evaluation: confusion matrix and IoU by hand, sliding windows against whole-image prediction."""

from __future__ import annotations

import math

import torch
from torch import nn

from sandbox.api import SegmentationOutput
from sandbox.recipe import EvalSection
from sandbox.train.evaluate import predict, window_starts
from sandbox.train.metrics import confusion_matrix, mean_iou, per_class_iou


class PixelwiseModel(nn.Module):
    """A 1x1-conv 'segmenter': its prediction at a pixel does not depend on the window."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        logits = self.conv(images)
        return SegmentationOutput(logits, logits, None)


def test_confusion_matrix_and_iou_by_hand() -> None:
    targets = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
    matrix = confusion_matrix(predictions, targets, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    ious = per_class_iou(matrix)
    expected = [1 / 3, 3 / 4, 1 / 2]
    assert torch.allclose(ious, torch.tensor(expected, dtype=torch.float64))
    assert math.isclose(mean_iou(matrix), sum(expected) / 3)


def test_absent_classes_are_left_out_of_the_mean() -> None:
    matrix = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 3)
    assert math.isnan(per_class_iou(matrix)[2]) and mean_iou(matrix) == 1.0


def test_window_starts_cover_the_image() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(3, 4, 3) == [0]
    for size, crop, stride in ((37, 16, 10), (16, 16, 5), (100, 33, 22)):
        covered = torch.zeros(size, dtype=torch.bool)
        for start in window_starts(size, crop, stride):
            covered[start : start + crop] = True
        assert covered.all()


def test_sliding_window_equals_whole_image_for_a_pixelwise_model() -> None:
    model = PixelwiseModel()
    images = torch.randn(2, 3, 23, 31)
    whole = model(images).logits.softmax(1)
    sliding = predict(model, images, EvalSection(mode="sliding", crop_size=12, stride=7))
    assert sliding.shape == whole.shape
    assert torch.allclose(sliding, whole, atol=1e-6)
    bigger = predict(model, images, EvalSection(mode="sliding", crop_size=40))
    assert torch.allclose(bigger, whole, atol=1e-6)
