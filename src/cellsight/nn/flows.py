"""Normalising-flow priors (built on ``zuko``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import zuko
from torch import nn

__all__ = ["FlowPrior"]


class FlowPrior(nn.Module):
    """An unconditional neural spline flow ``p(z)`` over a ``n_latent``-dimensional latent space.

    The flow maps ``Normal(0, I)`` through ``zuko.flows.NSF`` transforms (monotonic rational
    quadratic splines on ``[-5, 5]``, identity outside), so at initialisation it is close to the
    standard normal prior it replaces. There is no closed-form KL divergence to a Gaussian
    posterior; use a Monte Carlo estimate ``log q(z|x) - log p(z)`` at a posterior sample ``z``.

    Parameters
    ----------
    n_latent
        Dimension of the latent space.
    hidden_features
        Widths of the hidden layers of each transform's conditioner network.
    transforms
        Number of autoregressive spline transforms.
    bins
        Number of spline bins.
    """

    def __init__(
        self,
        n_latent: int,
        hidden_features: Sequence[int] = (64, 64),
        transforms: int = 3,
        bins: int = 8,
    ) -> None:
        super().__init__()
        self.n_latent = n_latent
        self.flow = zuko.flows.NSF(
            features=n_latent,
            context=0,
            transforms=transforms,
            bins=bins,
            hidden_features=list(hidden_features),
        )

    def log_prob(self, z_nk: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` of each row; any leading dimensions (``(s, n, k)`` -> ``(s, n)``)."""
        return self.flow().log_prob(z_nk)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws ``(n, n_latent)`` from the prior."""
        return self.flow().sample((n,))
