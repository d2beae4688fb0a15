"""Public building blocks for class-conditional density estimators (``DensityEstimator`` plugins).

A third-party estimator can reuse what the built-in ``glow``, ``nflows`` and ``gmm`` share:
:class:`OnlineMixtureDensity` (pixel sampling, input noise, one Adam step with clipping and a
decaying learning rate, a sampled-pixel budget shared by all processes, pooling across processes
weighted by real pixel count, checkpoint state) and
:class:`GaussianMixturePrior` (one Gaussian per class in latent space, DDFP's equal-weight
mixture for unlabeled features). May import ``api``, ``errors`` and ``processes``; nothing from
``train`` or above.
"""

from sandbox.density.mixture_prior import GaussianMixturePrior
from sandbox.density.online import (
    OnlineMixtureDensity,
    pool_gradients_and_sum,
    proportional_shares,
    require_positive,
)
from sandbox.processes.collectives import process_count, process_rank, sum_over_processes

__all__ = [
    "GaussianMixturePrior",
    "OnlineMixtureDensity",
    "pool_gradients_and_sum",
    "process_count",
    "process_rank",
    "proportional_shares",
    "require_positive",
    "sum_over_processes",
]
