"""``sandbox plan``'s predicted peak memory of a training step against a measured one (a benchmark).

    python benchmarks/plan_check.py                       # the three configurations below
    python benchmarks/plan_check.py RECIPE [--set KEY=VALUE ...] [--num-classes K]

For each configuration the steps ``sandbox plan`` traces (a step of each phase of the run, two
where a phase has two) are traced on fake tensors, then built again and run for real on this
process's device, and the peak of live tensor memory over them is measured: on a GPU
``torch.cuda.max_memory_allocated`` (the trace then predicts what the GPU holds: CUDA's autocast
policy, foreach optimizers, 512-byte blocks), on a CPU the CPU allocator's allocations and frees as
torch's profiler records them (the trace predicts what this CPU holds: CPU autocast, fp16 as
float32, as a CPU run computes). The table prints predicted, measured and their ratio; the claim is
a ratio within 0.75 to 1.25, and the exit status is 1 when a configuration misses it.

Default configurations: ``recipes/quickstart.toml`` as it is, ``recipes/ddfp_pascal.toml`` and
``recipes/unimatch_pascal.toml`` at crop 129 with random weights (``backbone.weights=none``) and 21
classes (their data need not be here: synthetic images).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.bench.plan import measure_plan_steps, trace_plan  # noqa: E402
from sandbox.recipe import load_resolved_recipe  # noqa: E402
from sandbox.train.builder import build_dataset  # noqa: E402

CLAIM = (0.75, 1.25)
PASCAL = ["--set", "train.crop_size=129", "--set", "backbone.weights=none", "--num-classes", "21"]
CONFIGURATIONS = [
    ["recipes/quickstart.toml"],
    ["recipes/ddfp_pascal.toml", *PASCAL],
    ["recipes/unimatch_pascal.toml", *PASCAL],
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="A recipe (default: the three configurations of the docstring).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE (repeatable).")
    parser.add_argument("--num-classes", type=int, help="Classes, if the dataset cannot be read here.")
    return parser.parse_args(argv)


def check(arguments: argparse.Namespace) -> tuple[str, int, int, float]:
    """``(label, predicted bytes, measured bytes, seconds)`` of one configuration."""
    recipe, registry = load_resolved_recipe(ROOT / arguments.recipe, arguments.overrides, None)
    classes = arguments.num_classes or build_dataset(recipe, registry).num_classes
    start = time.perf_counter()
    target = "cuda" if torch.cuda.is_available() else "cpu"
    predicted = trace_plan(recipe, registry, classes, target=target).peak_bytes
    measured = measure_plan_steps(recipe, registry, classes)
    label = " ".join([arguments.recipe, *arguments.overrides])
    return label, predicted, measured.peak_bytes, time.perf_counter() - start


def main(argv: list[str]) -> int:
    arguments = parse(argv)
    runs = [arguments] if arguments.recipe else [parse(configuration) for configuration in CONFIGURATIONS]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    how = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "torch.profiler's CPU allocator events"
    print(f"plan check on {device}, torch {torch.__version__}: predicted peak vs measured ({how})", flush=True)
    rows, ok = [], True
    for run in runs:
        label, predicted, measured, seconds = check(run)
        ratio = predicted / measured
        inside = CLAIM[0] <= ratio <= CLAIM[1]
        ok &= inside
        rows.append((label, f"{predicted / 2**20:.1f}", f"{measured / 2**20:.1f}", f"{ratio:.3f}", "ok" if inside else "OUTSIDE"))
        print(f"measured {label}: {seconds:.0f} s", file=sys.stderr, flush=True)
    header = ("configuration", "predicted MiB", "measured MiB", "ratio", f"within {CLAIM[0]}-{CLAIM[1]}")
    print("| " + " | ".join(header) + " |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
