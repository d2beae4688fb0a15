"""The online training protocol shared by the class-conditional density estimators.

An :class:`OnlineMixtureDensity` scores a feature ``x`` against every class ``k`` as
``log p(x | k) = log p_prior(z | k) + log|det dz/dx|`` with ``z`` a latent (for a flow; ``z = x``
and ``log|det| = 0`` for a density without one). A labeled feature uses its class alone, an
unlabeled one the equal-weight mixture (:meth:`GaussianMixturePrior.combine`, DDFP's semantics).
This module owns what every such estimator trains the same way: pixel sampling (a total over
every process), input noise, one Adam step with gradient-norm clipping, pooling across processes, an exponential learning-rate decay over ``total_steps``,
the FlowGMM posterior-accuracy diagnostic and the optimizer's checkpoint state.
"""

from __future__ import annotations

import abc
import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from sandbox.density.mixture_prior import GaussianMixturePrior
from sandbox.api import DensityEstimator
from sandbox.processes.collectives import host_values_of_every_process, process_count, process_rank


def require_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def proportional_shares(counts: list[int], budget: int) -> list[int]:
    """How many of ``budget`` sampled pixels each process draws from its ``counts`` pixels.

    Every pixel when all processes together have at most ``budget``; otherwise shares
    proportional to the counts, rounded by largest remainder (ties to the lower rank), so they sum
    to exactly ``budget`` whatever the number of processes. The same on every process.
    """
    total = sum(counts)
    if total <= budget:
        return list(counts)
    exact = [count * budget / total for count in counts]
    shares = [int(value) for value in exact]
    order = sorted(range(len(counts)), key=lambda index: (-(exact[index] - shares[index]), index))
    for index in order[: budget - sum(shares)]:
        shares[index] += 1
    return shares


def pool_gradients_and_sum(parameters: list[nn.Parameter], weight: float, summary: Tensor, total: int) -> Tensor:
    """Gradients weighted by ``weight`` (this process's real pixel count) summed over processes, and ``summary`` summed.

    One all-reduce of one flat buffer. ``total`` is the sum of every process's ``weight``: the
    pooled gradients are divided by it, so they are those of the mean loss over every process's
    pixels, and a process without pixels contributes nothing. Every process then makes the same
    Adam update, so the estimator stays identical across processes.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1).float() * weight for g in grads] + [summary.float()])
    torch.distributed.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        size = grad.numel()
        parameter.grad = (flat[offset : offset + size] / max(total, 1.0)).view_as(grad).to(grad.dtype)
        offset += size
    return flat[offset:]


class OnlineMixtureDensity(DensityEstimator):
    """A class-conditional density with a mixture over classes, trained online by Adam.

    Subclasses build their modules, including ``self.prior`` (a :class:`GaussianMixturePrior`
    or a subclass), then call :meth:`configure_training`, and implement
    :meth:`component_scores`. Everything else (``log_prob``, ``fit_step``, the optimizer
    state) is shared.
    """

    prior: GaussianMixturePrior
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.ExponentialLR

    def configure_training(
        self,
        total_steps: int,
        lr: float,
        betas: tuple[float, float],
        grad_clip: float,
        final_lr_ratio: float,
        sampled_pixels: int,
        input_noise: float,
    ) -> None:
        """Create Adam over all parameters and a schedule decaying ``lr`` to ``lr * final_lr_ratio``
        over ``total_steps`` updates; call once, after every parameter exists."""
        require_positive(sampled_pixels=sampled_pixels)
        if not 0.0 < final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio must be in (0, 1], got {final_lr_ratio}")
        self.sampled_pixels = sampled_pixels
        self.input_noise = input_noise
        self.grad_clip = grad_clip
        # nn.Module.to() keeps Parameter identity, so the optimizer survives moving the module.
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, betas=(float(betas[0]), float(betas[1])))
        gamma = final_lr_ratio ** (1.0 / max(total_steps, 1))
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=gamma)

    @abc.abstractmethod
    def component_scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(log p_prior(z | k) (N, K), log|det dz/dx| (N,))`` for float32 ``features`` ``(N, D)``.

        Called with autocast disabled; must be differentiable w.r.t. the features.
        """

    def _scores(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`component_scores` in float32 with autocast disabled."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.component_scores(features.float())

    def log_prob(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Log density of ``features`` ``(N, D)`` in float32, differentiable w.r.t. the features."""
        components, log_det = self._scores(features)
        return self.prior.combine(components, labels) + log_det

    def classify(self, features: Tensor) -> Tensor:
        """The most probable class of each feature under equal class weights, shape ``(N,)``."""
        components, _ = self._scores(features)
        return components.argmax(dim=1)

    def fit_step(self, features: Tensor, labels: Tensor) -> dict[str, Tensor | float]:
        """One Adam update on ``sampled_pixels`` noisy pixels of every process; returns nll, accuracy, lr.

        ``sampled_pixels`` is the total over all processes: each process samples its share,
        proportional to its real pixel count (:func:`proportional_shares`; every pixel when all of
        them fit). Each process's mean gradient and NLL is weighted by its real pixel count, so
        the pooled gradient estimates the gradient of the mean loss over every process's pixels,
        and equals it when nothing is sampled away: what one process computes on all the pixels.
        ``accuracy`` is the FlowGMM posterior classification accuracy on the labeled sampled
        pixels (absent when none is labeled). With no pixels at all, no update is made (the
        schedule still advances) and ``nll`` is NaN; a process without pixels contributes nothing.

        Nothing here waits for the device (on several processes the pixel counts, sizes known to
        the host, are exchanged in host memory): ``nll`` and ``accuracy`` are returned as tensors, and an update whose NLL is not
        finite (on any process) is undone on the device (:meth:`_step_if_finite`).
        """
        lr = float(self.optimizer.param_groups[0]["lr"])
        features, labels = features.detach(), labels.detach()
        count = features.shape[0]
        processes = process_count()
        counts = host_values_of_every_process(count)  # sizes are host numbers: exchanged in host memory
        shares = proportional_shares(counts, self.sampled_pixels)
        share = shares[process_rank()]
        if sum(counts) == 0:
            self.scheduler.step()
            return {"nll": math.nan, "lr": lr}
        self.optimizer.zero_grad(set_to_none=True)
        weight = count if share > 0 else 0
        total = sum(c for c, s in zip(counts, shares) if s > 0)  # every process's weight
        if share > 0:
            if count > share:
                index = torch.randperm(count, device=features.device)[:share]
                features, labels = features[index], labels[index]
            features = features.float()
            noisy = features + self.input_noise * torch.randn_like(features)
            with torch.enable_grad():
                components, log_det = self._scores(noisy)
                loss = -(self.prior.combine(components, labels) + log_det).mean()
                loss.backward()
            with torch.no_grad():
                labeled = labels >= 0
                correct = ((components.argmax(dim=1) == labels) & labeled).sum()
                summary = torch.stack([loss.detach() * weight, correct.float(), labeled.sum().float()])
        else:  # this process has no pixels (or no share) but must join the others' reduction, contributing nothing
            summary = torch.zeros(3, device=self.prior.means.device)
        if processes > 1:
            summary = pool_gradients_and_sum(list(self.parameters()), weight, summary, total)
        nll_sum, num_correct, num_labeled = summary.unbind()
        nll = nll_sum / total
        self._step_if_finite(torch.isfinite(nll))  # a non-finite NLL (on any process) skips the update everywhere
        self.scheduler.step()
        accuracy = torch.where(num_labeled > 0, num_correct / num_labeled.clamp(min=1.0), torch.nan)  # NaN: none labeled
        return {"nll": nll, "lr": lr, "accuracy": accuracy}

    def _step_if_finite(self, finite: Tensor) -> None:
        """Clip the gradient norm and make the Adam update where ``finite`` (a device boolean) holds;
        elsewhere the parameters and Adam's moments are left as they were (Adam's step count, in host
        memory, advances either way). Decided on the device: the host does not wait."""
        parameters = [p for p in self.parameters() if p.grad is not None]
        moments = ("exp_avg", "exp_avg_sq")
        if not parameters:  # no gradient reached any parameter: nothing to update or undo
            self.optimizer.step()
            return
        with torch.no_grad():  # one flat vector: every parameter, then every exp_avg, then every exp_avg_sq
            before = torch.cat([p.reshape(-1) for p in parameters] + [
                self.optimizer.state[p][name].reshape(-1) if self.optimizer.state.get(p) else p.new_zeros(p.numel())
                for name in moments for p in parameters  # a first update's moments were zeros
            ])
        torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
        self.optimizer.step()
        with torch.no_grad():  # the same vector after the step, then each tensor's part of the chosen one copied back
            tensors = parameters + [self.optimizer.state[p][name] for name in moments for p in parameters]
            after = torch.cat([t.reshape(-1) for t in tensors])
            kept = torch.where(finite, after, before).split([t.numel() for t in tensors])
            torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(kept, tensors)])

    def optimizer_state(self) -> dict[str, Any]:
        """Adam's and the learning-rate schedule's state dicts."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state` (copied, so the source dict is never aliased)."""
        state = copy.deepcopy(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
