"""Consistency losses: masking semantics for every registered loss, values for ce, kl and mse."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sandbox.api import ConsistencyLoss
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry

REGISTRY = load_registry()
ALL_LOSSES = REGISTRY.names("consistency")



def build(name: str, **options: float) -> ConsistencyLoss:
    """The consistency loss ``name`` built through the registry."""
    return REGISTRY.get("consistency", name).build(options)


def random_batch(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Student logits, teacher probabilities ``(2, 4, 3, 5)`` and a mask with some trusted pixels."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(2, 4, 3, 5, generator=generator)
    target = torch.softmax(2.0 * torch.randn(2, 4, 3, 5, generator=generator), dim=1)
    valid = torch.rand(2, 3, 5, generator=generator) > 0.4
    valid[0, 0, 0], valid[1, 2, 4] = True, False
    return logits, target, valid


def test_soft_losses_are_registered() -> None:
    """kl and mse arrive through the entry-point group beside ce."""
    assert {"ce", "kl", "mse"} <= set(ALL_LOSSES)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_untrusted_pixels_do_not_change_the_loss(name: str) -> None:
    """Changing logits and targets at untrusted pixels leaves the loss unchanged."""
    loss = build(name)
    logits, target, valid = random_batch()
    reference = loss(logits, target, valid)
    assert reference.dtype == torch.float32 and reference.shape == () and torch.isfinite(reference)
    mask = (~valid).unsqueeze(1)
    other_logits = torch.where(mask, 50.0 * torch.randn_like(logits), logits)
    other_target = torch.where(mask, torch.softmax(9.0 * torch.randn_like(target), dim=1), target)
    torch.testing.assert_close(loss(other_logits, other_target, valid), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_all_untrusted_gives_zero(name: str) -> None:
    """An all-untrusted batch gives 0 (not NaN) and a zero gradient."""
    logits, target, valid = random_batch()
    logits.requires_grad_(True)
    value = build(name)(logits, target, torch.zeros_like(valid))
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradient_only_on_trusted_pixels(name: str) -> None:
    """The student gets gradient at trusted pixels and none at untrusted ones."""
    logits, target, valid = random_batch(1)
    logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(build(name)(logits, target, valid), logits)
    per_pixel = grad.abs().sum(dim=1)
    assert torch.equal(per_pixel[~valid], torch.zeros_like(per_pixel[~valid]))
    assert (per_pixel[valid] > 0).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_reduced_precision_inputs_give_a_float32_loss(name: str) -> None:
    """bf16 logits and targets are scored in float32."""
    logits, target, valid = random_batch(2)
    loss = build(name)
    value = loss(logits.bfloat16(), target.bfloat16(), valid)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.bfloat16().float(), target.bfloat16().float(), valid))


@pytest.mark.parametrize("name", ["ce", "kl", "mse"])
def test_confident_student_matching_a_one_hot_teacher_has_zero_loss(name: str) -> None:
    """A one-hot teacher and a student putting all its mass on the same class: loss ~ 0."""
    classes = torch.randint(0, 4, (2, 3, 5), generator=torch.Generator().manual_seed(3))
    one_hot = torch.nn.functional.one_hot(classes, 4).permute(0, 3, 1, 2).float()
    value = build(name)(200.0 * one_hot, one_hot, torch.ones(2, 3, 5, dtype=torch.bool))
    assert 0.0 <= value.item() < 1e-6


@pytest.mark.parametrize("name", ["kl", "mse"])
def test_soft_losses_vanish_for_a_matching_soft_teacher(name: str) -> None:
    """kl and mse are 0 when softmax(student) equals the soft teacher, and positive otherwise."""
    logits, _, valid = random_batch(4)
    loss = build(name)
    assert abs(loss(logits, torch.softmax(logits, dim=1), valid).item()) < 1e-6
    assert loss(logits, torch.softmax(logits.flip(1), dim=1), valid).item() > 1e-3


def hand_example() -> tuple[Tensor, Tensor, Tensor]:
    """A 1x2x1x2 batch: pixel 0 trusted (student [1/4, 3/4], teacher [0.6, 0.4]), pixel 1 not."""
    logits = torch.tensor([[[[0.0, 5.0]], [[math.log(3.0), -5.0]]]])
    target = torch.tensor([[[[0.6, 0.0]], [[0.4, 1.0]]]])
    valid = torch.tensor([[[True, False]]])
    return logits, target, valid


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("ce", {}, math.log(4.0)),  # teacher argmax 0, student p_0 = 1/4
        ("kl", {}, 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75)),
        ("mse", {}, ((0.25 - 0.6) ** 2 + (0.75 - 0.4) ** 2) / 2),
        ("kl", {"temperature": 2.0},  # student softmax([0, ln 3] / 2) = [1, sqrt 3] / (1 + sqrt 3)
         0.6 * math.log(0.6 * (1 + math.sqrt(3))) + 0.4 * math.log(0.4 * (1 + math.sqrt(3)) / math.sqrt(3))),
    ],
    ids=["ce", "kl", "mse", "kl-T2"],
)
def test_hand_computed_value(name: str, options: dict[str, float], expected: float) -> None:
    """The loss on a two-pixel example equals the value computed by hand (untrusted pixel ignored)."""
    logits, target, valid = hand_example()
    assert build(name, **options)(logits, target, valid).item() == pytest.approx(expected, rel=1e-6)


def test_kl_temperature_is_validated() -> None:
    """A non-positive temperature is an error at build time."""
    with pytest.raises(SandboxError):
        build("kl", temperature=0.0)
    assert REGISTRY.get("consistency", "kl").option_names() == ["temperature"]
    assert REGISTRY.get("consistency", "mse").option_names() == []
