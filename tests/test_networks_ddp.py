"""smp networks train under DistributedDataParallel without ``find_unused_parameters``, as the trainer wraps
the student (through Accelerate): every parameter they own takes part in the loss.

Two CPU processes (gloo, the session's shared launch) wrap PSPNet (resnet18, smp's ``encoder_depth`` 3) and DPT (a ViT) in DDP and
make two training steps with a perturbed view. DDP without ``find_unused_parameters`` refuses the second
step if any parameter got no gradient in the first (resnet18's ``layer3``/``layer4`` under PSPNet, the
ViT's final ``norm`` and ``head`` under DPT, until the plugin removed them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shared_launch import Job, SharedLaunch, process_group

CASES = {"PSPNet": "resnet18:64", "DPT": "tu-vit_tiny_patch16_224:64"}
"""The architectures that owned parameters their forward never used, each with a small encoder and crop."""


def train_two_ddp_steps(folder: Path) -> None:
    """Launch job: each of :data:`CASES` wrapped in DDP (no ``find_unused_parameters``) makes two
    training steps with a perturbed view; saves each architecture's outcome to ``rank{i}.pt``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sandbox.plugins import load_registry
    from sandbox.train.student_pass import StudentPass

    process_group()
    rank = dist.get_rank()
    outcomes = {}
    for architecture, case in CASES.items():
        encoder, crop = case.split(":")
        options = {"decoder_intermediate_channels": (16, 16, 16, 16), "decoder_fusion_channels": 16} if architecture == "DPT" else {}
        torch.manual_seed(0)  # the same construction on every process, as the trainer's seed
        network = load_registry().get("network", "smp").build(
            {"architecture": architecture, "encoder": encoder, "options": options}, num_classes=3).train()
        model = DistributedDataParallel(StudentPass(network))  # no find_unused_parameters: Accelerate's default, the trainer's
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        torch.manual_seed(100 + rank)  # each process's own batch
        try:
            for step in range(2):  # DDP refuses the second step if a parameter got no gradient in the first
                images = torch.randn(2, 3, int(crop), int(crop))
                output = model(images, perturb=lambda features, classify, clean: features + 1.0, num_perturbed=1)
                loss = output.logits.square().mean() + output.perturbed_logits.square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        except RuntimeError as error:  # raised on every process alike, before any collective of the step
            outcomes[architecture] = " ".join(str(error).split())[:240]
            continue
        flat = torch.cat([p.detach().reshape(-1) for p in network.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        outcomes[architecture] = "trained" if torch.equal(gathered[0], gathered[1]) else "the processes' networks differ"
    torch.save(outcomes, folder / f"rank{rank}.pt")


LAUNCH_JOBS = {"networks_ddp": Job(train_two_ddp_steps)}


def test_ddp_without_find_unused_parameters_trains_two_steps(shared_launch: SharedLaunch) -> None:
    folder = shared_launch.folder("networks_ddp")
    for rank in range(2):
        outcomes = torch.load(folder / f"rank{rank}.pt", weights_only=True)
        assert outcomes == {architecture: "trained" for architecture in CASES}, f"rank {rank}: {outcomes}"
