"""Tests of the "glow" density estimator and its Gaussian-mixture prior."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import distributions as D

from sandbox_builtins.density_glow import GlowFlowDensity, mlp, sandbox_register_density_estimators
from sandbox.density import GaussianMixturePrior
from sandbox.errors import SandboxError
from sandbox.registry import Registry



def make_clusters(num: int, dim: int, classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated gaussian clusters and their labels."""
    centers = 3.0 * torch.randn(classes, dim, generator=generator)
    labels = torch.randint(0, classes, (num,), generator=generator)
    return centers[labels] + 0.5 * torch.randn(num, dim, generator=generator), labels


# ----------------------------------------------------------------------------------------------
# The flow against FrEIA
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim,hidden_layers", [(9, 1), (10, 2)])
def test_flow_matches_freia(dim: int, hidden_layers: int) -> None:
    """Identical weights in FrEIA's SequenceINN give the same z and log|det J|."""
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(0)
    ours = GlowFlowDensity(dim, 3, 10, blocks=2, hidden=16, hidden_layers=hidden_layers, permutation_seed=3).double()
    with torch.no_grad():  # large weights, so that the soft clamp is exercised
        for param in ours.couplings.parameters():
            param.normal_(0.0, 0.5)

    def subnet(c_in: int, c_out: int) -> torch.nn.Module:
        return mlp(c_in, 16, c_out, hidden_layers)

    inn = Ff.SequenceINN(dim)
    for k in range(2):
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=2.0)
        inn.append(Fm.PermuteRandom, seed=3 + k)
    inn = inn.double()
    with torch.no_grad():
        for k in range(2):
            coupling, permute = inn.module_list[2 * k], inn.module_list[2 * k + 1]
            coupling.subnet1.load_state_dict(ours.couplings[k].subnet1.state_dict())
            coupling.subnet2.load_state_dict(ours.couplings[k].subnet2.state_dict())
            assert torch.equal(permute.perm.data, ours.permutations[k].perm)  # same seeded permutation
            permute.perm.data.copy_(ours.permutations[k].perm)
            permute.perm_inv.data.copy_(ours.permutations[k].perm_inv)

    x = 2.0 * torch.randn(64, dim, dtype=torch.float64)
    z, log_det = ours.flow_forward(x)
    z_ref, log_det_ref = inn(x)
    assert log_det.abs().max() > 0.1  # non-trivial transform
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det, log_det_ref, atol=1e-5, rtol=1e-5)
    x_back, _ = inn(z_ref, rev=True)
    torch.testing.assert_close(ours.flow_inverse(z), x_back, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.flow_inverse(z), x, atol=1e-8, rtol=1e-8)


def test_log_det_is_the_jacobian_log_determinant() -> None:
    """log|det J| equals the autograd Jacobian's log-determinant."""
    torch.manual_seed(0)
    est = GlowFlowDensity(6, 2, 10, hidden=8).double()
    with torch.no_grad():
        for param in est.couplings.parameters():
            param.normal_(0.0, 0.5)
    x = torch.randn(6, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: est.flow_forward(v[None])[0][0], x)
    _, log_det = est.flow_forward(x[None])
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jacobian)[1])


# ----------------------------------------------------------------------------------------------
# The mixture prior
# ----------------------------------------------------------------------------------------------


def test_prior_components_equal_naive_and_torch_distributions() -> None:
    """The one-matmul component log-densities equal the N x K x D computation and torch's."""
    generator = torch.Generator().manual_seed(0)
    prior = GaussianMixturePrior(5, 7, generator=generator).double()
    z = 3.0 * torch.randn(50, 7, dtype=torch.float64, generator=generator)
    means = prior.means.detach()
    naive = -0.5 * ((z[:, None, :] - means[None]) ** 2).sum(-1) - 3.5 * math.log(2 * math.pi)
    ours = prior.component_log_probs(z)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    mvn = D.MultivariateNormal(means, covariance_matrix=torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(ours, mvn.log_prob(z[:, None, :]), atol=1e-5, rtol=1e-5)
    independent = D.Independent(D.Normal(means, 1.0), 1)
    torch.testing.assert_close(ours, independent.log_prob(z[:, None, :]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior.classify(z), naive.argmax(1))

    prior32 = GaussianMixturePrior(5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior32.component_log_probs(z.float()), naive.float(), atol=1e-4, rtol=1e-5)


def test_prior_labeled_and_unlabeled_semantics() -> None:
    """Labeled points use their component alone; unlabeled (-1 or None) the equal-weight mixture."""
    prior = GaussianMixturePrior(4, 3, generator=torch.Generator().manual_seed(1)).double()
    z = torch.randn(20, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, -1] * 4)
    means = prior.means.detach()
    components = D.Independent(D.Normal(means, 1.0), 1)
    mixture = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(4, dtype=torch.float64)), components)
    own = components.log_prob(z[:, None, :])[torch.arange(20), labels.clamp(min=0)]
    expected = torch.where(labels >= 0, own, mixture.log_prob(z))
    torch.testing.assert_close(prior.log_prob(z, labels), expected)
    torch.testing.assert_close(prior.log_prob(z), mixture.log_prob(z))
    torch.testing.assert_close(prior.log_prob(z, torch.full((20,), -1)), mixture.log_prob(z))


# ----------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------


def test_fit_step_learns_separable_clusters() -> None:
    """Online updates lower the NLL and the FlowGMM posterior classifies far above chance."""
    torch.manual_seed(0)
    x, y = make_clusters(1024, 16, 3, torch.Generator().manual_seed(0))
    partial = y.clone()
    partial[512:] = -1
    est = GlowFlowDensity(16, 3, 100, hidden=32, sampled_pixels=256, lr=1e-2)
    with torch.no_grad():
        nll_before = -est.log_prob(x, partial).mean().item()
    history = [est.fit_step(x, partial) for _ in range(100)]
    with torch.no_grad():
        nll_after = -est.log_prob(x, partial).mean().item()
        z, _ = est.flow_forward(x)
        accuracy = (est.prior.classify(z) == y).float().mean().item()
    assert nll_after < nll_before - 30
    assert accuracy > 0.9
    assert history[-1]["accuracy"] > 0.9
    assert set(history[0]) == {"nll", "accuracy", "lr"}
    assert history[0]["lr"] == pytest.approx(1e-2)
    assert est.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # decayed to 1% over total_steps


def test_fit_step_edge_cases() -> None:
    """A NaN accuracy without labeled pixels; an empty batch makes no update."""
    torch.manual_seed(0)
    est = GlowFlowDensity(8, 2, 10, hidden=8, sampled_pixels=16)
    stats = est.fit_step(torch.randn(40, 8), torch.full((40,), -1))
    assert set(stats) == {"nll", "lr", "accuracy"} and math.isfinite(stats["nll"]) and math.isnan(stats["accuracy"])
    before = copy.deepcopy(est.state_dict())
    stats = est.fit_step(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    assert math.isnan(stats["nll"])
    assert all(torch.equal(before[key], value) for key, value in est.state_dict().items())


def test_log_prob_is_float32_and_differentiable_wrt_features() -> None:
    """The DDFP perturbation differentiates the NLL w.r.t. features, also under autocast."""
    torch.manual_seed(0)
    est = GlowFlowDensity(8, 3, 10, hidden=16)
    features = torch.randn(32, 8, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        log_prob = est.log_prob(features)
    assert log_prob.dtype == torch.float32 and log_prob.shape == (32,)
    (grad,) = torch.autograd.grad(-log_prob.mean(), features)
    assert grad.shape == features.shape and torch.isfinite(grad.float()).all() and grad.abs().sum() > 0


def test_optimizer_follows_the_module_parameters() -> None:
    """The optimizer holds the module's own parameters (flow and prior means), also after .to()."""
    est = GlowFlowDensity(8, 3, 10, hidden=8).to(torch.device("cpu"))
    held = [p for group in est.optimizer.param_groups for p in group["params"]]
    assert len(held) == len(list(est.parameters()))
    assert all(a is b for a, b in zip(held, est.parameters()))
    assert any(p is est.prior.means for p in held)


def test_registered_with_validated_options() -> None:
    """The plugin registers "glow"; recipe options validate through its signature."""
    registry = Registry()
    sandbox_register_density_estimators(
        lambda name, factory, description=None: registry.add("density", name, factory, description, "test")
    )
    component = registry.get("density", "glow")
    assert "total_steps" not in component.option_names() and "betas" in component.option_names()
    resolved = component.resolve_options({"betas": [0.9, 0.99], "hidden": 8}, "test")
    assert resolved["sampled_pixels"] == 20480 and resolved["clamp"] == 2.0
    est = component.build({"betas": [0.9, 0.99], "hidden": 8, "blocks": 1}, feature_dim=6, num_classes=2, total_steps=5)
    assert isinstance(est, GlowFlowDensity) and est.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(SandboxError):
        component.resolve_options({"blocks": "many"}, "test")
    with pytest.raises(SandboxError):
        component.build({"blocks": 0}, feature_dim=6, num_classes=2, total_steps=5)
