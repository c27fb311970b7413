"""Survival losses. ``log_hz`` is the log relative hazard (higher = higher risk)."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


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


TIME_GRID_BINS = 100  # event-time histogram bins on [0, nice ceiling]: pipeline.stats.curves.TIME_BINS


def nice_ceiling(x: float) -> float:
    """``x`` rounded up to two significant digits (3652.3 -> 3700.0; 1.0 for ``x <= 0``): the grid-end rule of
    ``pipeline.stats.curves.nice_ceil`` (tested equal), here so that ``models`` stays free of ``pipeline``."""
    if not math.isfinite(x) or x <= 0:
        return 1.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return float(math.ceil(x / step) * step)


def discrete_time_edges(time: torch.Tensor, event: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin edges for a discrete-time model: quantiles of the *event* times (PORPOISE, SurvPath), read off a
    histogram on a fixed grid so that no edge is a training patient's time.

    The grid is :data:`TIME_GRID_BINS` equal bins on ``[0, nice_ceiling(max(time))]``; the inner edges are the
    quantiles of the event times' histogram on it (uniform within a bin, as
    ``pipeline.stats.curves.histogram_quantiles``), the last edge is the grid's end. This is the federated rule
    (``pipeline.stats.curves.discrete_time_bins``) with one site and no merging: the edges depend on the times
    only through their grid bins.

    Args:
        time: ``[P]`` float, the training patients' times.
        event: ``[P]`` bool.
        n_bins: K >= 1.

    Returns:
        ``[K + 1]`` float64 edges ``0 = e_0 < e_1 <= ... <= e_{K-1} < e_K = nice_ceiling(max(time))``; bin ``k``
        is ``(e_k, e_{k+1}]`` (the last bin is open to the right: later times fall in it).

    Raises:
        ValueError: ``n_bins < 1``, or no event among the patients.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    time = time.reshape(-1).double()
    event = event.reshape(-1).bool()
    if not bool(event.any()):
        raise ValueError(f"discrete-time bins need event times: all {len(time)} training patients are censored")
    end = nice_ceiling(float(time.max()))
    grid = torch.linspace(0.0, end, TIME_GRID_BINS + 1, dtype=torch.float64)
    k = (torch.bucketize(time[event], grid, right=True) - 1).clamp(0, TIME_GRID_BINS - 1)
    p = torch.bincount(k, minlength=TIME_GRID_BINS).double() / int(event.sum())
    cdf = torch.cat([p.new_zeros(1), torch.cumsum(p, 0)])  # at each grid edge
    q = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    i = torch.searchsorted(cdf, q, right=False).clamp(1, TIME_GRID_BINS)  # grid bin i - 1 holds quantile q
    frac = ((q - cdf[i - 1]) / p[i - 1].clamp_min(1e-300)).clamp(0.0, 1.0)
    inner = grid[i - 1] + frac * (grid[i] - grid[i - 1])
    return torch.cat([grid[:1], inner, grid[-1:]])


def time_to_bin(time: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``[B]`` long bin index of each time, ``k`` with ``e_k < t <= e_{k+1}`` (clamped to ``[0, K-1]``)."""
    inner = edges[1:-1].to(time.dtype)
    return torch.bucketize(time.reshape(-1).contiguous(), inner.contiguous(), right=False)


def nll_loss(logits: torch.Tensor, event: torch.Tensor, bin_index: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    r"""Negative log-likelihood of the discrete-time hazard model (PORPOISE / MCAT / SurvPath ``NLLSurvLoss``).

    With hazards :math:`h_k = \sigma(\text{logit}_k)` and :math:`S_k = \prod_{j \le k}(1 - h_j)`, a patient
    whose time falls in bin :math:`y` contributes

    .. math::
        \ell_\text{event} = -\log S_{y-1} - \log h_y, \qquad \ell_\text{censored} = -\log S_y,

    and the loss is the batch mean of :math:`(1-\alpha)\,\ell + \alpha\,\ell_\text{event}` (``alpha`` up-weights
    uncensored patients). Computed in log space (``logsigmoid``), so no clamping is needed.

    Policy: a batch without events works unchanged (only survival terms), and a batch of one patient is valid.

    Args:
        logits: ``[B, K]`` float hazard logits.
        event: ``[B]`` bool.
        bin_index: ``[B]`` long, from :func:`time_to_bin`.
        alpha: weight of the uncensored term, in ``[0, 1]``.

    Example:
        >>> logits = torch.zeros(2, 3); event = torch.tensor([True, False]); y = torch.tensor([1, 2])
        >>> round(float(nll_loss(logits, event, y)), 4)  # (2 log 2 + 3 log 2) / 2
        1.7329
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    event = event.reshape(-1).to(logits.dtype)
    y = bin_index.reshape(-1, 1).long()
    log_h = F.logsigmoid(logits)  # (B, K) log h_k
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)  # (B, K) log S_k
    log_s_prev = torch.cat([log_s.new_zeros(len(log_s), 1), log_s[:, :-1]], dim=1)  # (B, K) log S_{k-1}
    uncensored = -event * (log_s_prev.gather(1, y) + log_h.gather(1, y)).squeeze(1)  # (B,)
    censored = -(1 - event) * log_s.gather(1, y).squeeze(1)  # (B,)
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def survival_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hazards [B, K], survival [B, K], risk [B])`` with ``survival = cumprod(1 - hazards)`` (``S`` at the
    end of each bin) and ``risk = -sum_k S_k`` (SurvPath's ranking score; higher = higher risk)."""
    hazards = torch.sigmoid(logits)
    survival = torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1))
    return hazards, survival, -survival.sum(dim=1)


class CoxMemoryBank:
    """Recent detached ``log_hz``/time/event/strata kept so that small batches still see a real risk set.

    With batch size 1 (large bags) a batch alone has no Cox risk set. ``loss`` evaluates the partial
    likelihood of the current batch together with the last ``size`` patients seen (their ``log_hz`` detached,
    as computed when they were seen; a MoCo-style queue). Gradients flow through the current batch's terms:
    its own events against the enlarged risk set, and its membership in the banked events' risk sets. A
    patient already in the current batch is not taken from the bank twice. The loss is normalised by the
    number of events in the union (the same normalisation as :func:`cox_loss`); with no event in the union
    it is the usual zero with zero gradients.

    Args:
        size: patients kept (0 disables the bank: ``loss`` is plain :func:`cox_loss`).
    """

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"memory bank size must be >= 0, got {size}")
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.log_hz = torch.zeros(0)
        self.event = torch.zeros(0, dtype=torch.bool)
        self.time = torch.zeros(0)
        self.strata = torch.zeros(0, dtype=torch.long)
        self.index = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.log_hz)

    def loss(
        self,
        log_hz: torch.Tensor,
        event: torch.Tensor,
        time: torch.Tensor,
        strata: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        ties: str = "efron",
        update: bool = True,
    ) -> torch.Tensor:
        """Cox loss of the batch (``[B]`` tensors; ``index`` = patient ids for de-duplication) with the bank,
        then (if ``update``) push the batch into the bank, dropping the oldest entries."""
        log_hz, event, time = log_hz.reshape(-1), event.reshape(-1).bool(), time.reshape(-1).float()
        strata_b = torch.zeros_like(event, dtype=torch.long) if strata is None else strata.reshape(-1).long()
        index_b = torch.full_like(strata_b, -1) if index is None else index.reshape(-1).long()
        dev = log_hz.device
        keep = ~torch.isin(self.index, index_b[index_b >= 0].cpu())  # (bank,) the bank lives on the CPU
        total = cox_loss(
            torch.cat([log_hz, self.log_hz[keep].to(log_hz)]),
            torch.cat([event, self.event[keep].to(dev)]),
            torch.cat([time, self.time[keep].to(dev)]),
            torch.cat([strata_b, self.strata[keep].to(dev)]),
            ties,
        )
        if update and self.size:
            self.log_hz = torch.cat([self.log_hz[keep], log_hz.detach().float().cpu()])[-self.size :]
            self.event = torch.cat([self.event[keep], event.cpu()])[-self.size :]
            self.time = torch.cat([self.time[keep], time.cpu()])[-self.size :]
            self.strata = torch.cat([self.strata[keep], strata_b.cpu()])[-self.size :]
            self.index = torch.cat([self.index[keep], index_b.cpu()])[-self.size :]
        return total
