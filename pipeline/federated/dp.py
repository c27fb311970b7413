"""Differential privacy of the federated updates: the Gaussian mechanism's noise and its RDP accountant.

:func:`dp_noise_std` is the noise std of the mean of ``n`` clipped updates (``sigma`` times its replace-one
sensitivity ``2C / n``), :func:`add_dp_noise` draws that noise from a generator seeded by the operating system's
CSPRNG (at the server for central DP, at each site for ``federated.dp_local``), and :class:`PrivacyLedger` is the
(epsilon, delta) of the rounds so far. What the guarantee covers: the :mod:`pipeline.federated.server` docstring.
"""

from __future__ import annotations

import secrets

import numpy as np

from pipeline.federated.protocol import Arrays


def dp_noise_std(noise_multiplier: float, clip: float, n_sites: int) -> float:
    """Std of the Gaussian noise on the mean of ``n_sites`` updates clipped to L2 norm ``clip``:
    ``noise_multiplier`` times the replace-one sensitivity of that mean, ``2 * clip / n_sites``."""
    return noise_multiplier * 2.0 * clip / n_sites


def add_dp_noise(mean: Arrays, std: float, rng: np.random.Generator | None = None) -> Arrays:
    """``mean`` plus N(0, std^2) per value, from a generator seeded by the OS CSPRNG (128 bits of
    ``secrets``): nothing saved with the run (seed, config, checkpoint) regenerates the noise."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    return {k: v + rng.normal(0.0, std, size=v.shape) for k, v in mean.items()}


class PrivacyLedger:
    """(epsilon, delta) of the Gaussian mechanism on clipped site updates, by Opacus' RDP accountant.

    Every site takes part in every round (sampling rate 1), so each round is one full-batch Gaussian step
    with noise multiplier ``sigma`` (noise std ``sigma`` times the mean's replace-one sensitivity ``2C/n``,
    :func:`dp_noise_std`): RDP(alpha) = rounds * alpha / (2 sigma^2), converted to (epsilon, delta).
    The guarantee is per site (site-level DP), for the aggregated updates (under DP no validation scalar is sent).
    """

    def __init__(self, noise_multiplier: float, delta: float, history: list | None = None):
        from opacus.accountants import RDPAccountant

        self.sigma, self.delta = noise_multiplier, delta
        self.acc = RDPAccountant()
        self.acc.history = list(history or [])

    def step(self) -> float:
        self.acc.step(noise_multiplier=self.sigma, sample_rate=1.0)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        return float(self.acc.get_epsilon(self.delta)) if self.acc.history else 0.0
