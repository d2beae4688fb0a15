"""Built-in perturbations do what their names say."""

from __future__ import annotations

import torch

from sandbox_builtins.density_glow import GlowFlowDensity
from sandbox_builtins.perturbations import DensityDescending, FeatureDropout, NoPerturbation
from sandbox.api import ClassifierOutput, PerturbationContext


def linear_classifier(channels: int, dim: int) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(channels, dim, 1)


def context_for(classifier: torch.nn.Module, valid: torch.Tensor, density=None) -> PerturbationContext:
    def classify(x: torch.Tensor) -> ClassifierOutput:
        embedding = classifier(x)
        return ClassifierOutput(embedding[:, :2], embedding)

    return PerturbationContext(classify, valid, density)


def test_ddfp_step_has_norm_eps_per_pixel_and_lowers_the_density() -> None:
    torch.manual_seed(0)
    dim, classes = 4, 2
    flow = GlowFlowDensity(dim, classes, total_steps=200, hidden=16, sampled_pixels=4096)
    centers = torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]])
    for _ in range(150):
        labels = torch.randint(0, classes, (512,))
        flow.fit_step(centers[labels] + 0.5 * torch.randn(512, dim), labels)
    classifier = torch.nn.Identity()
    features = (centers[torch.randint(0, 2, (2 * 3 * 3,))] + 0.3 * torch.randn(18, dim)).T.reshape(dim, 2, 3, 3).permute(1, 0, 2, 3)
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    ddfp = DensityDescending(eps=0.5)
    perturbed = ddfp(features, context_for(classifier, valid, flow))
    step = (perturbed - features).norm(dim=1)
    assert torch.allclose(step[valid], torch.full_like(step[valid], 0.5), atol=1e-4)
    assert step[0, 0, 0] == 0, "untrusted pixels do not enter the NLL, so they get no gradient"
    before = flow.log_prob(features.permute(0, 2, 3, 1)[valid])
    after = flow.log_prob(perturbed.permute(0, 2, 3, 1)[valid])
    assert (after < before).float().mean() > 0.9 and after.mean() < before.mean()


def test_ddfp_gradient_flows_to_the_unperturbed_features() -> None:
    flow = GlowFlowDensity(4, 2, total_steps=10, hidden=8)
    features = torch.randn(1, 4, 2, 2, requires_grad=True)
    perturbed = DensityDescending(eps=1.0)(features, context_for(torch.nn.Identity(), torch.ones(1, 2, 2, dtype=torch.bool), flow))
    perturbed.sum().backward()
    assert torch.allclose(features.grad, torch.ones_like(features))


def test_dropout_zeroes_whole_channels_at_rate_p() -> None:
    torch.manual_seed(0)
    dropout = FeatureDropout(p=0.3).train()
    features = torch.ones(64, 100, 2, 2)
    out = dropout(features, context_for(torch.nn.Identity(), torch.ones(64, 2, 2, dtype=torch.bool)))
    channel_zero = (out == 0).all(dim=(2, 3))
    assert abs(channel_zero.float().mean().item() - 0.3) < 0.02
    assert torch.allclose(out[~channel_zero.unsqueeze(-1).unsqueeze(-1).expand_as(out)], torch.tensor(1 / 0.7))


def test_none_gives_no_perturbed_view() -> None:
    features = torch.randn(1, 3, 2, 2)
    assert NoPerturbation()(features, context_for(torch.nn.Identity(), torch.ones(1, 2, 2, dtype=torch.bool))) is None
    assert not NoPerturbation.uses_density and DensityDescending.uses_density


def test_vat_raises_the_prediction_kl_more_than_random_noise_of_the_same_norm() -> None:
    from sandbox_builtins.perturbations import FeatureNoise, VirtualAdversarial

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.Tanh(), torch.nn.Conv2d(16, 3, 1))
    features = 5.0 * torch.randn(4, 8, 5, 5)  # per-pixel norms in the tens, like real features
    valid = torch.ones(4, 5, 5, dtype=torch.bool)

    def classify(x: torch.Tensor) -> ClassifierOutput:
        logits = classifier(x)
        return ClassifierOutput(logits, logits)

    context = PerturbationContext(classify, valid)

    @torch.no_grad()
    def kl(perturbed: torch.Tensor) -> float:
        clean = classifier(features).log_softmax(1)
        moved = classifier(perturbed).log_softmax(1)
        return float(torch.nn.functional.kl_div(moved, clean, log_target=True, reduction="none").sum(1).mean())

    eps = 0.5
    vat = VirtualAdversarial(eps=eps)(features, context)  # default xi and one power iteration
    noise = FeatureNoise(scale=eps, fixed_norm=True)(features, context)
    assert torch.allclose((vat - features).norm(dim=1), torch.full((4, 5, 5), eps), atol=1e-4)
    assert torch.allclose((noise - features).norm(dim=1), torch.full((4, 5, 5), eps), atol=1e-4)
    assert kl(vat) > 2 * kl(noise)


def test_noise_distributions_and_scale() -> None:
    from sandbox_builtins.perturbations import FeatureNoise

    torch.manual_seed(0)
    features = torch.zeros(2, 64, 8, 8)
    context = context_for(torch.nn.Identity(), torch.ones(2, 8, 8, dtype=torch.bool))
    gaussian = FeatureNoise("gaussian", scale=0.5, fixed_norm=False)(features, context)
    uniform = FeatureNoise("uniform", scale=0.5, fixed_norm=False)(features, context)
    fixed = FeatureNoise("uniform", scale=0.5)(features, context)
    assert torch.allclose(fixed.norm(dim=1), torch.full((2, 8, 8), 0.5), atol=1e-5)
    assert abs(gaussian.std().item() - 0.5) < 0.02
    assert uniform.abs().max() <= 0.5 and abs(uniform.std().item() - 0.5 / 3**0.5) < 0.02


def test_ddfp_linf_step_is_eps_times_the_gradient_sign() -> None:
    flow = GlowFlowDensity(4, 2, total_steps=10, hidden=8)
    features = torch.randn(1, 4, 2, 2)
    context = context_for(torch.nn.Identity(), torch.ones(1, 2, 2, dtype=torch.bool), flow)
    step = DensityDescending(eps=0.25, norm="linf")(features, context) - features
    gradient = DensityDescending().gradient(features, context)
    assert torch.allclose(step, 0.25 * gradient.sign())


def test_ddfp_direction_under_fp16_autocast_matches_float32_at_a_realistic_pixel_count() -> None:
    """4 x 129 x 129 trusted pixels (the paper's 513 crop at stride 4): the direction keeps fp32's precision.

    A mean NLL makes every pixel's gradient ~1e-6 here, in fp16's subnormal range: its median
    per-pixel direction error is ~0.03; the summed NLL's is ~7e-4.
    """
    torch.manual_seed(0)
    channels, dim = 32, 16
    classifier = torch.nn.Sequential(torch.nn.Conv2d(channels, dim, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(dim, dim, 1))
    flow = GlowFlowDensity(dim, 5, total_steps=10, hidden=32)
    features = torch.randn(4, channels, 129, 129)
    context = context_for(classifier, torch.ones(4, 129, 129, dtype=torch.bool), flow)
    ddfp = DensityDescending(eps=1.0)
    reference = torch.nn.functional.normalize(ddfp.gradient(features, context), dim=1)
    with torch.autocast("cpu", dtype=torch.float16):
        half = torch.nn.functional.normalize(ddfp.gradient(features, context), dim=1)
    error = (half - reference).norm(dim=1).flatten()
    assert half.norm(dim=1).min() > 0.99, "no pixel lost its direction"
    assert error.median() < 5e-3 and torch.quantile(error[:100_000], 0.9) < 1e-2


def test_complementary_dropout_pairs_the_two_views_of_each_image_and_leaves_the_kept_share_unmasked() -> None:
    """UniMatch V2's masks: per image one channel mask for every map of the same width, each channel
    x0 or x2, the second view's mask 2 minus the first's, ``int(pairs * kept)`` pairs left at x1."""
    from sandbox_builtins.perturbations import ComplementaryChannelDropout

    torch.manual_seed(0)
    pairs, width = 8, 64
    maps = [torch.ones(2 * pairs, width, 3, 3), torch.ones(2 * pairs, width, 5, 5), torch.ones(2 * pairs, 16, 2, 2)]
    context = PerturbationContext(lambda x: None, torch.ones(2 * pairs, 3, 3, dtype=torch.bool), views=2)
    moved = ComplementaryChannelDropout(kept=0.25).perturb_maps(maps, context)
    first, second = moved[0][:pairs, :, 0, 0], moved[0][pairs:, :, 0, 0]
    assert torch.equal(first + second, torch.full_like(first, 2.0)), "complementary: what one view drops, the other keeps"
    assert torch.equal(moved[0][:, :, 0, 0], moved[1][:, :, 4, 4]), "one mask for every map of the same width"
    assert torch.equal(moved[0], moved[0][:, :, :1, :1].expand_as(moved[0])), "whole channels"
    unmasked = (first == 1.0).all(dim=1)
    assert int(unmasked.sum()) == int(pairs * 0.25) == 2
    assert torch.equal(unmasked, (moved[2][:pairs, :, 0, 0] == 1.0).all(dim=1)), "the same pairs unmasked at every width"
    masked = first[~unmasked]
    assert set(masked.unique().tolist()) == {0.0, 2.0} and 0.4 < float((masked == 0).float().mean()) < 0.6
    one_view = ComplementaryChannelDropout(kept=0.0)(torch.ones(4, 8, 2, 2), PerturbationContext(lambda x: None, torch.ones(4, 2, 2, dtype=torch.bool)))
    assert set(one_view.unique().tolist()) == {0.0, 2.0}, "one view: each image's mask alone, none unmasked at kept = 0"
