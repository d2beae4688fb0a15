"""Evaluation: confusion matrix over the val part, reduced across processes, and IoUs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

from sandbox.api import SegmentationSource
from sandbox.data.views import EvalSet
from sandbox.recipe import EvalSection
from sandbox.train.metrics import confusion_matrix, mean_iou, per_class_iou


@dataclass
class EvalResult:
    """mIoU, IoU per class (by name; None where a class never occurs) and the confusion matrix."""

    miou: float
    per_class: dict[str, float | None]
    matrix: torch.Tensor


def val_loader(source: SegmentationSource, settings: EvalSection, accelerator: Accelerator) -> DataLoader:
    """This process's shard of the val part (no padding duplicates: every image counts once)."""
    dataset = EvalSet(source.val, settings.mode, settings.crop_size, source.ignore_index)
    shard = Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    return DataLoader(shard, batch_size=settings.batch_size, generator=torch.Generator())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    class_names: list[str],
    accelerator: Accelerator,
    ignore_index: int = 255,
) -> EvalResult:
    """Predict every batch of ``loader`` (this process's shard) and reduce the confusion matrix."""
    num_classes = len(class_names)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=accelerator.device)
    was_training = model.training
    model.eval()
    try:
        for images, masks in loader:
            images, masks = images.to(accelerator.device), masks.to(accelerator.device)
            with accelerator.autocast():
                logits = model(images).logits
            matrix += confusion_matrix(logits.argmax(dim=1), masks, num_classes, ignore_index)
    finally:
        model.train(was_training)
    matrix = accelerator.reduce(matrix, reduction="sum").cpu()
    ious = per_class_iou(matrix)
    per_class = {name: (None if torch.isnan(iou) else float(iou)) for name, iou in zip(class_names, ious)}
    return EvalResult(mean_iou(matrix), per_class, matrix)
