"""Data-loading throughput: decoded and augmented samples per second (``sandbox bench --data``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from sandbox.api import SegmentationSource
from sandbox.data.views import StreamSampler
from sandbox.recipe import Recipe
from sandbox.train.builder import build_train_views
from sandbox.train.evaluate import build_val_view


@dataclass
class DataThroughput:
    """Samples per second of one view with a number of workers."""

    view: str
    workers: int
    samples_per_s: float


def views_of(source: SegmentationSource, recipe: Recipe) -> dict[str, tuple[Dataset, int]]:
    """The training and evaluation views of ``source`` with their batch sizes, as a run builds them."""
    labeled, unlabeled = build_train_views(source, recipe)
    return {
        "labeled (weak)": (labeled, recipe.train.batch_size),
        "unlabeled (weak + strong)": (unlabeled, recipe.train.unlabeled_batch_size),
        "val": (build_val_view(source, recipe.eval), 1),
    }


def measure(dataset: Dataset, size: int, batch_size: int, workers: int, batches: int, stream: bool) -> float:
    """Samples/s over ``batches`` batches after the first (worker start-up is not counted)."""
    sampler = StreamSampler(size, 0) if stream else None
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(), drop_last=stream,
    )
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        count += len(batch[0])
    return count / max(time.perf_counter() - start, 1e-9)


def data_throughput(source: SegmentationSource, recipe: Recipe, workers: list[int], batches: int) -> list[DataThroughput]:
    """Throughput of every view for every number of workers."""
    results = []
    for name, (dataset, batch_size) in views_of(source, recipe).items():
        size = len(dataset)  # type: ignore[arg-type]
        if size == 0:
            continue
        for count in workers:
            rate = measure(dataset, size, batch_size, count, batches, stream=name != "val")
            results.append(DataThroughput(name, count, rate))
    return results
