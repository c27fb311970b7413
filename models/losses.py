"""Survival losses. ``log_hz`` is the log relative hazard (higher = higher risk)."""

from __future__ import annotations

import warnings

import torch


def cox_loss(
    log_hz: torch.Tensor,
    event: torch.Tensor,
    time: torch.Tensor,
    strata: torch.Tensor | None = None,
    ties: str = "efron",
) -> torch.Tensor:
    r"""Negative Cox partial log-likelihood per event, optionally stratified.

    .. math::
        \ell = -\frac{1}{n_\text{events}} \sum_{s} \sum_{j \in \text{event times of } s}
        \Big[\sum_{i \in D_j} \eta_i - \sum_{r=0}^{d_j-1}
        \log\Big(\sum_{i \in R_j} e^{\eta_i} - \tfrac{r}{d_j}\sum_{i \in D_j} e^{\eta_i}\Big)\Big]

    (Efron; Breslow drops the ``r/d_j`` term). Computed by torchsurv with ``reduction="sum"`` and
    normalised here by the number of events (torchsurv's ``"mean"`` divides by distinct event times).

    Policy for degenerate batches: with no event at all, or a single patient, the loss is an exact zero that
    still depends on ``log_hz`` (so backward works and gives zero gradients); strata without events contribute
    nothing.

    Args:
        log_hz: ``[B]`` (or ``[B, 1]``) float log hazards.
        event: ``[B]`` bool.
        time: ``[B]`` float, one unit per cohort.
        strata: ``[B]`` int stratum per patient (e.g. site index), or None.
        ties: ``"efron"`` or ``"breslow"``.

    Example:
        >>> log_hz = torch.tensor([0.5, -0.2, 0.1]); event = torch.tensor([True, False, True])
        >>> time = torch.tensor([1.0, 2.0, 3.0])
        >>> float(cox_loss(log_hz, event, time)) > 0
        True
    """
    from torchsurv.loss.cox import neg_partial_log_likelihood

    log_hz = log_hz.reshape(-1)
    event = event.reshape(-1).bool()
    n_events = int(event.sum())
    if n_events == 0 or len(log_hz) < 2:  # one patient alone is its own risk set: log(1) = 0
        return (log_hz * 0.0).sum()
    with warnings.catch_warnings():  # torchsurv warns on every batch with tied times; ties are handled
        warnings.filterwarnings("ignore", "Ties in `time` detected")
        total = neg_partial_log_likelihood(
            log_hz,
            event,
            time.reshape(-1).to(log_hz.dtype),
            ties_method=ties,
            reduction="sum",
            strata=None if strata is None else strata.reshape(-1).long(),
        )
    return total / n_events
