"""Conformance of every registered density estimator, plus the "nflows" and "gmm" specifics."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch import distributions as D

from sandbox_builtins.density_gmm import FALLBACK_SEED, GaussianMixtureDensity
from sandbox_builtins.density_nflows import NflowsDensity
from sandbox.api import DensityEstimator
from sandbox.errors import SandboxError
from sandbox.plugins import load_registry

REGISTRY = load_registry()
SMALL_OPTIONS: dict[str, Any] = {"hidden": 16, "blocks": 2, "sampled_pixels": 256}
"""Small versions of common options; each estimator gets those it has."""
CASES = [(name, {}) for name in REGISTRY.names("density")]
if "nflows" in REGISTRY.names("density"):
    CASES.append(("nflows", {"transform": "autoregressive"}))
CASE_IDS = [name + "".join(f"-{value}" for value in options.values()) for name, options in CASES]


def build(name: str, dim: int, classes: int, total_steps: int, **options: Any) -> DensityEstimator:
    """Build estimator ``name`` through the registry with small options plus ``options``."""
    component = REGISTRY.get("density", name)
    chosen = {key: value for key, value in {**SMALL_OPTIONS, **options}.items() if key in component.option_names()}
    return component.build(chosen, feature_dim=dim, num_classes=classes, total_steps=total_steps)


def make_clusters(num: int, dim: int, classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Well-separated gaussian clusters and their labels."""
    centers = 3.0 * torch.randn(classes, dim, generator=generator)
    labels = torch.randint(0, classes, (num,), generator=generator)
    return centers[labels] + 0.5 * torch.randn(num, dim, generator=generator), labels


def class_log_probs(est: DensityEstimator, x: Tensor, classes: int) -> Tensor:
    """``log p(x | k)`` for every class, ``(N, K)``, through the labeled semantics of ``log_prob``."""
    return torch.stack([est.log_prob(x, torch.full((x.shape[0],), k)) for k in range(classes)], dim=1)


# ----------------------------------------------------------------------------------------------
# Every registered estimator
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_log_prob_shape_dtype_and_gradient(name: str, options: dict[str, Any]) -> None:
    """(N,) finite float32 log-densities, differentiable w.r.t. the features, also under bf16 autocast."""
    torch.manual_seed(0)
    est = build(name, 8, 3, 10, **options)
    features = torch.randn(32, 8, requires_grad=True)
    log_prob = est.log_prob(features)
    assert log_prob.shape == (32,) and log_prob.dtype == torch.float32 and torch.isfinite(log_prob).all()
    (grad,) = torch.autograd.grad(-log_prob.mean(), features)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    half = features.detach().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        log_prob = est.log_prob(half, torch.tensor([0, 1, 2, -1] * 8))
    assert log_prob.dtype == torch.float32 and log_prob.shape == (32,) and torch.isfinite(log_prob).all()
    (grad,) = torch.autograd.grad(-log_prob.mean(), half)
    assert grad.shape == half.shape and torch.isfinite(grad.float()).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_labeled_and_unlabeled_semantics(name: str, options: dict[str, Any]) -> None:
    """Unlabeled (-1 or None) = logsumexp over the classes' labeled log-probs + log(1/K)."""
    torch.manual_seed(0)
    classes = 4
    x, y = make_clusters(200, 6, classes, torch.Generator().manual_seed(1))
    est = build(name, 6, classes, 10, **options)
    for _ in range(3):  # non-trivial parameters (and the gmm's data initialisation)
        est.fit_step(x, y)
    with torch.no_grad():
        per_class = class_log_probs(est, x, classes)
        mixture = torch.logsumexp(per_class, dim=1) - math.log(classes)
        torch.testing.assert_close(est.log_prob(x), mixture, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(est.log_prob(x, torch.full((200,), -1)), mixture, atol=1e-4, rtol=1e-5)
        mixed = torch.where(torch.arange(200) % 3 == 0, torch.full_like(y, -1), y)
        expected = torch.where(mixed >= 0, per_class.gather(1, y[:, None])[:, 0], mixture)
        torch.testing.assert_close(est.log_prob(x, mixed), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_fit_step_learns_separable_clusters(name: str, options: dict[str, Any]) -> None:
    """Online updates lower the NLL and the posterior classifies far above chance (1/3)."""
    torch.manual_seed(0)
    x, y = make_clusters(1024, 16, 3, torch.Generator().manual_seed(0))
    partial = y.clone()
    partial[512:] = -1
    est = build(name, 16, 3, 100, lr=1e-2, **options)
    with torch.no_grad():
        nll_before = -est.log_prob(x, partial).mean().item()
    history = [est.fit_step(x, partial) for _ in range(100)]
    with torch.no_grad():
        nll_after = -est.log_prob(x, partial).mean().item()
        accuracy = (class_log_probs(est, x, 3).argmax(dim=1) == y).float().mean().item()
    assert nll_after < 0.6 * nll_before  # e.g. 85 -> 19 (glow), 47 -> 12 (gmm)
    # the NLL logged at the last update is below the one before any update (not the first logged one:
    # gmm's data initialisation already starts the first update at the moment estimates, about 12)
    assert history[-1]["nll"] < nll_before
    assert accuracy > 0.9
    assert history[-1]["accuracy"] > 0.9
    assert all(math.isfinite(stats["nll"]) for stats in history)


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_fit_step_edge_cases(name: str, options: dict[str, Any]) -> None:
    """A NaN accuracy without labeled pixels (left out of the logged mean); an empty batch makes no
    update and reports NaN."""
    torch.manual_seed(0)
    est = build(name, 8, 2, 10, **options)
    stats = est.fit_step(torch.randn(40, 8), torch.full((40,), -1))
    assert math.isnan(stats["accuracy"]) and math.isfinite(stats["nll"])
    before = copy.deepcopy(est.state_dict())
    stats = est.fit_step(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    assert math.isnan(stats["nll"])
    assert all(torch.equal(before[key], value) for key, value in est.state_dict().items())


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_an_update_whose_nll_is_not_finite_is_undone_on_the_device(name: str, options: dict[str, Any]) -> None:
    """Parameters and Adam's moments stay as they were (decided without reading the device)."""
    torch.manual_seed(0)
    x, y = make_clusters(200, 8, 3, torch.Generator().manual_seed(2))
    est = build(name, 8, 3, 10, **options)
    est.fit_step(x, y)  # moments exist
    before = copy.deepcopy(est.state_dict())
    moments = copy.deepcopy(est.optimizer.state_dict()["state"])
    bad = x.clone()
    bad[0, 0] = float("inf")
    stats = est.fit_step(bad, y)
    assert not math.isfinite(stats["nll"])
    assert all(torch.equal(before[key], value) for key, value in est.state_dict().items())
    after = est.optimizer.state_dict()["state"]
    for index, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[index][key], state[key]), f"Adam {index} {key}"
    assert math.isfinite(est.fit_step(x, y)["nll"]), "the next finite batch updates again"


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_a_first_update_whose_nll_is_not_finite_leaves_zero_moments(name: str, options: dict[str, Any]) -> None:
    """The very first update undone: the parameters as they were just before it (after gmm's data
    initialisation), Adam's moments zeros, its step count advanced."""
    torch.manual_seed(0)
    x, y = make_clusters(200, 8, 3, torch.Generator().manual_seed(2))
    x[0, 0] = float("inf")
    est = build(name, 8, 3, 10, **options)
    step_if_finite, before = est._step_if_finite, {}

    def snapshot_then_step(finite: Tensor) -> None:
        assert not est.optimizer.state, "no moments before the first update"
        before.update(copy.deepcopy(est.state_dict()))
        step_if_finite(finite)

    est._step_if_finite = snapshot_then_step
    assert not math.isfinite(est.fit_step(x, y)["nll"])
    assert before
    for key, value in est.state_dict().items():  # gmm's means initialised from the infinite pixel are not finite
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    for index, state in est.optimizer.state_dict()["state"].items():
        assert int(state["step"]) == 1, f"Adam {index}: the step count advances"
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], torch.zeros_like(state[key])), f"Adam {index} {key}"


@pytest.mark.parametrize("name,options", CASES, ids=CASE_IDS)
def test_checkpoint_round_trip_gives_identical_next_update(name: str, options: dict[str, Any]) -> None:
    """A resumed estimator (through torch.save) makes exactly the same next update."""
    torch.manual_seed(0)
    x, y = make_clusters(300, 8, 3, torch.Generator().manual_seed(2))
    y[150:] = -1
    original = build(name, 8, 3, 20, **options)
    for _ in range(3):
        original.fit_step(x, y)
    buffer = io.BytesIO()
    torch.save(original.checkpoint_state(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    resumed = build(name, 8, 3, 20, **options)
    resumed.load_checkpoint_state(torch.load(buffer))

    torch.manual_seed(5)
    stats_original = original.fit_step(x, y)
    torch.manual_seed(5)
    stats_resumed = resumed.fit_step(x, y)
    assert stats_original == stats_resumed
    for (key, a), (_, b) in zip(original.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), key
    assert original.optimizer_state()["scheduler"] == resumed.optimizer_state()["scheduler"]


# ----------------------------------------------------------------------------------------------
# nflows
# ----------------------------------------------------------------------------------------------


def randomised_nflows(transform: str, dim: int, classes: int) -> NflowsDensity:
    """A small nflows estimator with large random weights, so the transform is far from identity."""
    torch.manual_seed(0)
    est = NflowsDensity(dim, classes, 10, transform=transform, blocks=3, hidden=8)
    with torch.no_grad():
        for param in est.flow.parameters():
            param.normal_(0.0, 0.4)
    return est


@pytest.mark.parametrize("transform", ["affine_coupling", "autoregressive"])
def test_nflows_log_prob_is_the_change_of_variables(transform: str) -> None:
    """log p(x) = log p_prior(z) + log|det dz/dx|, with the autograd Jacobian and torch's mixture."""
    classes, dim = 3, 5
    est = randomised_nflows(transform, dim, classes)
    reference = copy.deepcopy(est).double()
    x = 1.5 * torch.randn(6, dim, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -1, 2, -1])

    z, log_det = reference.flow_forward(x)
    jacobians = [torch.autograd.functional.jacobian(lambda v: reference.flow_forward(v[None])[0][0], row) for row in x]
    autograd_log_det = torch.stack([torch.linalg.slogdet(j)[1] for j in jacobians])
    assert log_det.abs().max() > 0.1  # a non-trivial transform
    torch.testing.assert_close(log_det, autograd_log_det)
    torch.testing.assert_close(reference.flow_inverse(z), x)

    means = reference.prior.means.detach()
    components = D.Independent(D.Normal(means, 1.0), 1)
    mixture = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(classes, dtype=torch.float64)), components)
    own = components.log_prob(z[:, None, :])[torch.arange(6), labels.clamp(min=0)]
    expected = torch.where(labels >= 0, own, mixture.log_prob(z)) + autograd_log_det
    with torch.no_grad():
        actual = est.log_prob(x.float(), labels)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-5)


def test_nflows_builds_nflows_transforms_and_validates_options() -> None:
    """The flow is an nflows CompositeTransform of the chosen transforms; bad options are rejected."""
    from nflows.transforms import (
        AffineCouplingTransform,
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        ReversePermutation,
    )

    coupling = NflowsDensity(6, 2, 10, blocks=2, hidden=8)
    assert isinstance(coupling.flow, CompositeTransform)
    layers = list(coupling.flow._transforms)
    assert [type(t) for t in layers] == [AffineCouplingTransform] * 2
    assert set(layers[0].transform_features.tolist()) == {0, 2, 4}  # alternating masks
    assert set(layers[1].transform_features.tolist()) == {1, 3, 5}
    autoregressive = NflowsDensity(6, 2, 10, transform="autoregressive", blocks=2, hidden=8)
    types = [type(t) for t in autoregressive.flow._transforms]
    assert types == [MaskedAffineAutoregressiveTransform, ReversePermutation, MaskedAffineAutoregressiveTransform]

    x = torch.randn(10, 6)
    z, log_det = autoregressive.flow_forward(x)  # identity_init: MADE blocks start as the identity
    torch.testing.assert_close(z, x.flip(1))  # one ReversePermutation between the two blocks
    torch.testing.assert_close(log_det, torch.zeros(10), atol=1e-5, rtol=0)
    z, log_det = coupling.flow_forward(x)  # a coupling starts as a 0.882 scaling of its half
    scale = torch.sigmoid(torch.tensor(2.0)) + 1e-3
    torch.testing.assert_close(z, x * scale)
    torch.testing.assert_close(log_det, torch.full((10,), 6 * scale.log().item()))

    component = REGISTRY.get("density", "nflows")
    assert {"transform", "blocks", "hidden", "lr", "input_noise"} <= set(component.option_names())
    with pytest.raises(SandboxError):
        component.resolve_options({"transform": "spline"}, "test")
    with pytest.raises(SandboxError):
        component.build({"blocks": 0}, feature_dim=6, num_classes=2, total_steps=5)


# ----------------------------------------------------------------------------------------------
# gmm
# ----------------------------------------------------------------------------------------------


def test_gmm_equals_torch_distributions() -> None:
    """Labeled: Independent Normal of the class; unlabeled: MixtureSameFamily with equal weights."""
    torch.manual_seed(0)
    classes, dim = 4, 7
    est = GaussianMixtureDensity(dim, classes, 10, data_init=False)
    with torch.no_grad():
        est.prior.means.mul_(2.0)
        est.prior.log_vars.normal_(0.0, 0.7)
    means, log_vars = est.prior.means.detach().double(), est.prior.log_vars.detach().double()
    components = D.Independent(D.Normal(means, (0.5 * log_vars).exp()), 1)
    mixture = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(classes, dtype=torch.float64)), components)
    x = 2.0 * torch.randn(50, dim, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, -1] * 10)
    own = components.log_prob(x[:, None, :])[torch.arange(50), labels.clamp(min=0)]
    expected = torch.where(labels >= 0, own, mixture.log_prob(x))
    with torch.no_grad():
        torch.testing.assert_close(est.log_prob(x.float(), labels).double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(est.log_prob(x.float()).double(), mixture.log_prob(x), atol=1e-5, rtol=1e-5)
        prior64 = copy.deepcopy(est.prior).double()
        torch.testing.assert_close(prior64.component_log_probs(x), components.log_prob(x[:, None, :]), atol=1e-10, rtol=1e-10)


def test_gmm_data_initialisation() -> None:
    """The first batch sets class means and the pooled within-class variance; once, and checkpointed."""
    torch.manual_seed(0)
    x, y = make_clusters(400, 5, 3, torch.Generator().manual_seed(3))
    y[y == 2] = -1  # class 2 has no labeled pixel: its mean is batch mean + std x a fixed N(0, I) draw
    est = GaussianMixtureDensity(5, 3, 10)
    assert not bool(est.initialized)
    est.prior.initialize_from(x, y)
    for k in range(2):
        torch.testing.assert_close(est.prior.means[k].detach(), x[y == k].mean(dim=0))
    draw = torch.randn(3, 5, generator=torch.Generator().manual_seed(FALLBACK_SEED))[2]
    expected = x.mean(dim=0) + x.var(dim=0, unbiased=False).sqrt() * draw
    torch.testing.assert_close(est.prior.means[2].detach(), expected, rtol=1e-4, atol=1e-5)
    residuals = torch.cat([x[y == k] - x[y == k].mean(dim=0) for k in range(2)])
    pooled = residuals.pow(2).sum(dim=0) / (residuals.shape[0] - 2)
    torch.testing.assert_close(est.prior.log_vars.detach(), pooled.log().expand(3, 5))

    est = GaussianMixtureDensity(5, 3, 10, lr=1e-6)
    est.fit_step(x, y)
    assert bool(est.initialized)
    torch.testing.assert_close(est.prior.means[0].detach(), x[y == 0].mean(dim=0), atol=1e-4, rtol=0)
    means = est.prior.means.detach().clone()
    est.fit_step(x + 10.0, y)  # no second initialisation
    torch.testing.assert_close(est.prior.means.detach(), means, atol=1e-4, rtol=0)

    fixed = GaussianMixtureDensity(5, 3, 10, data_init=False, init_scale=0.0)
    assert bool(fixed.initialized) and fixed.prior.means.abs().sum() == 0
