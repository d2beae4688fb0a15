"""Segmentation metrics from a confusion matrix."""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(K, K)`` int64 counts, rows = ground truth, columns = prediction; ignored pixels skipped."""
    keep = targets != ignore_index
    index = targets[keep].long() * num_classes + predictions[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(matrix: Tensor) -> Tensor:
    """IoU per class, NaN for classes absent from both ground truth and predictions."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))


def mean_iou(matrix: Tensor) -> float:
    """Mean IoU over classes present in ground truth or predictions."""
    return float(per_class_iou(matrix).nanmean())
