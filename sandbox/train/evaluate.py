"""Evaluation: confusion matrix over the val part, reduced across processes, and IoUs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

from sandbox.api import SegmentationSource
from sandbox.data.errors import read_batches
from sandbox.data.views import EvalSet
from sandbox.recipe import EvalSection
from sandbox.processes.failures import beat
from sandbox.train.metrics import confusion_matrix, mean_iou, per_class_iou


@dataclass
class EvalResult:
    """mIoU, IoU per class (by name; None where a class never occurs) and the confusion matrix."""

    miou: float
    per_class: dict[str, float | None]
    matrix: torch.Tensor


def build_val_view(source: SegmentationSource, settings: EvalSection) -> EvalSet:
    """The val images as evaluation reads them (sliding windows are cut later, in :func:`predict`)."""
    mode = "center_crop" if settings.mode == "center_crop" else "whole"
    return EvalSet(source.val, mode, settings.crop_size, source.ignore_index)


def val_loader(source: SegmentationSource, settings: EvalSection, accelerator: Accelerator) -> DataLoader:
    """This process's shard of the val part (no padding duplicates: every image counts once)."""
    dataset = build_val_view(source, settings)
    shard = Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    return DataLoader(shard, batch_size=settings.batch_size, generator=torch.Generator())


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` covering ``size`` with ``stride`` (the last one flush)."""
    last = max(size - crop, 0)
    return sorted(set(range(0, last, stride)) | {last})


def sliding_window_probs(model: nn.Module, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Class probabilities averaged over overlapping ``crop`` windows (images padded if smaller)."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    total: torch.Tensor | None = None
    counts = torch.zeros(padded.shape[-2:], device=images.device)
    for top in window_starts(padded.shape[-2], crop, stride):
        for left in window_starts(padded.shape[-1], crop, stride):
            window = (..., slice(top, top + crop), slice(left, left + crop))
            probs = model(padded[window]).logits.float().softmax(dim=1)
            if total is None:
                total = padded.new_zeros(images.shape[0], probs.shape[1], *padded.shape[-2:], dtype=torch.float32)
            total[window] += probs
            counts[window[1:]] += 1
    assert total is not None
    return (total / counts)[..., :height, :width]


def predict(model: nn.Module, images: torch.Tensor, settings: EvalSection) -> torch.Tensor:
    """Per-pixel scores ``(B, K, H, W)`` for the evaluation ``mode`` of ``settings``."""
    if settings.mode == "sliding":
        crop = settings.crop_size or max(images.shape[-2:])
        return sliding_window_probs(model, images, crop, settings.stride or max(crop * 2 // 3, 1))
    return model(images).logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    class_names: list[str],
    accelerator: Accelerator,
    settings: EvalSection,
    ignore_index: int = 255,
) -> EvalResult:
    """Predict every batch of ``loader`` (this process's shard) and reduce the confusion matrix."""
    num_classes = len(class_names)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=accelerator.device)
    was_training = model.training
    model.eval()
    try:
        for images, masks in read_batches(loader, "val data"):
            beat()  # the main thread moves on: a peer's failure leaves it time to fail by itself
            images, masks = images.to(accelerator.device), masks.to(accelerator.device)
            with accelerator.autocast():
                scores = predict(model, images, settings)
            matrix += confusion_matrix(scores.argmax(dim=1), masks, num_classes, ignore_index)
    finally:
        model.train(was_training)
    matrix = accelerator.reduce(matrix, reduction="sum").cpu()
    ious = per_class_iou(matrix)
    per_class = {name: (None if torch.isnan(iou) else float(iou)) for name, iou in zip(class_names, ious)}
    return EvalResult(mean_iou(matrix), per_class, matrix)
