"""How far gradient accumulation lies from the larger run it stands for, through BatchNorm.

A recipe stating ``train.total_batch_size`` runs on N processes by accumulating K micro-batches a
step. Without BatchNorm, or without ``sync_bn``, that is the N x K-process run's gradient
(``tests/test_parity.py``). With ``sync_bn`` the N x K processes normalise the step's whole batch
together; the N processes accumulating normalise each micro-batch alone. This measures, for a
recipe's network (``--weights``: a run's ``best.pt`` or ``last.pt``, for trained statistics) on its
own augmented labeled stream, the supervised loss's gradient both ways on the same images and the
same loss (each micro-batch's mean over its own pixels, averaged: ``loss_pixel_count =
"per_process"``): ``||g_accumulated - g_whole|| / ||g_whole||`` and their cosine, median (largest)
over ``--batches`` steps; beside it the scale an optimiser sees anyway, the same figure between two
different steps' whole-batch gradients. Prints a markdown table::

    .venv/bin/python benchmarks/accumulation_batchnorm.py recipes/ssl_benchmark.toml --weights RUN/best.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sandbox.data.views import StreamSampler  # noqa: E402
from sandbox.recipe import load_resolved_recipe  # noqa: E402
from sandbox.train.builder import build_dataset, build_model, build_train_views  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE (repeatable).")
    parser.add_argument("--weights", type=Path, help="A run's best.pt or last.pt (default: the recipe's initial network).")
    parser.add_argument("--micro-batches", type=int, default=2, help="K: micro-batches of train.batch_size a step.")
    parser.add_argument("--batches", type=int, default=8, help="Steps measured.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    return parser.parse_args(argv)


def gradient(network: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, parts: int, ignore: int) -> torch.Tensor:
    """The flat gradient of the mean over ``parts`` micro-batches of each one's mean cross-entropy;
    ``parts`` forward passes (each micro-batch normalised alone) or one (``parts = 1``: the whole batch
    normalised together, the loss still split into the same micro-batches' means)."""
    network.zero_grad(set_to_none=True)
    micro = len(images) // parts
    chunks = [(images, masks)] if parts == 1 else [(images[i:i + micro], masks[i:i + micro]) for i in range(0, len(images), micro)]
    for chunk_images, chunk_masks in chunks:
        logits = network(chunk_images)[0]
        losses = [F.cross_entropy(logits[i:i + micro], chunk_masks[i:i + micro], ignore_index=ignore)
                  for i in range(0, len(chunk_images), micro)]
        (sum(losses) / len(images) * micro).backward()
    return torch.cat([p.grad.flatten() for p in network.parameters() if p.grad is not None])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe, registry = load_resolved_recipe(Path(args.recipe), args.overrides, None)
    source = build_dataset(recipe, registry)
    torch.manual_seed(recipe.seed)
    network = build_model(recipe, registry, source.num_classes)
    if args.weights:
        network.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True)["model"])
    network.train()
    labeled, _ = build_train_views(source, recipe, announce=False)
    micro, parts = recipe.train.batch_size, args.micro_batches
    loader = DataLoader(labeled, batch_size=micro * parts, sampler=StreamSampler(len(source.labeled), recipe.seed))
    batches = iter(loader)
    accumulated, cosines, between = [], [], []
    previous = None
    for _ in range(args.batches):
        images, masks = next(batches)
        whole = gradient(network, images, masks, 1, source.ignore_index)
        split = gradient(network, images, masks, parts, source.ignore_index)
        accumulated.append(relative(split, whole))
        cosines.append(float(F.cosine_similarity(split, whole, dim=0)))
        if previous is not None:
            between.append(relative(previous, whole))
        previous = whole

    def figure(values: list[float]) -> str:
        return f"{statistics.median(values):.1%} ({max(values):.1%})"

    weights = args.weights.as_posix() if args.weights else "initial (random) weights"
    print(f"{recipe.name}, crop {recipe.train.crop_size}, {parts} micro-batches of {micro} vs one batch of {micro * parts}, "
          f"{weights}, torch {torch.__version__.split('+')[0]}, {torch.get_num_threads()} threads")
    print()
    print("| gradient | median (largest) | cosine, median (lowest) |")
    print("| --- | --- | --- |")
    print(f"| accumulated vs whole batch, same images | {figure(accumulated)} | {statistics.median(cosines):.4f} ({min(cosines):.4f}) |")
    print(f"| two steps' whole batches | {figure(between)} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
