"""Gradient comparisons for the reference-equivalence tests: a loss equal in value can still train
differently (a detached branch leaves the value alone), so these tests compare gradients too."""

from __future__ import annotations

import torch
from torch import Tensor, nn

RTOL, ATOL = 1e-5, 1e-6
"""The float32 tolerance of every gradient comparison: the same computation summed in another order."""


def parameter_gradients(loss: Tensor, parameters: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """``d loss / d p`` for each named parameter ``p`` (zeros where the loss does not reach ``p``)."""
    grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(parameters.items(), grads)}


def assert_same_gradients(
    loss: Tensor, parameters: dict[str, nn.Parameter], expected_loss: Tensor, expected_parameters: dict[str, nn.Parameter]
) -> dict[str, Tensor]:
    """Assert that ``loss`` has the gradients of ``expected_loss`` w.r.t. every parameter, matched by
    name, within ``RTOL``/``ATOL``; return them (a test checks that they are not trivially zero)."""
    assert parameters.keys() == expected_parameters.keys()
    ours, expected = parameter_gradients(loss, parameters), parameter_gradients(expected_loss, expected_parameters)
    for name, gradient in expected.items():
        torch.testing.assert_close(ours[name], gradient, rtol=RTOL, atol=ATOL, msg=lambda m, name=name: f"d loss / d {name}: {m}")
    return ours


def reached(gradients: dict[str, Tensor]) -> set[str]:
    """The names of the parameters with a nonzero gradient."""
    return {name for name, gradient in gradients.items() if bool(gradient.abs().sum() > 0)}
