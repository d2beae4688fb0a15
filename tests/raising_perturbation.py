"""A test plugin (given as ``--plugin tests/raising_perturbation.py``): a perturbation that raises.

``raise_on_call`` is the identity, except on its call number ``call`` (0-based) on the processes
``only_rank`` (-1: every process), where it raises ``RuntimeError("planted failure on process R")``.
"""

import torch

from sandbox.api import Perturbation, hookimpl


class RaiseOnCall(Perturbation):
    """Identity; raises on call ``call`` on process ``only_rank`` (-1: on every process)."""

    def __init__(self, call: int = 1, only_rank: int = -1) -> None:
        super().__init__()
        self.call, self.only_rank, self.count = call, only_rank, 0

    def forward(self, features: torch.Tensor, context: object) -> torch.Tensor:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        call, self.count = self.count, self.count + 1
        if call == self.call and self.only_rank in (-1, rank):
            raise RuntimeError(f"planted failure on process {rank}")
        return features * 1.0


@hookimpl
def sandbox_register_perturbations(register) -> None:  # noqa: ANN001 - the hook's signature
    """Register ``raise_on_call``."""
    register("raise_on_call", RaiseOnCall)
