"""Survival losses against reference implementations, and their degenerate-batch policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import CoxMemoryBank, cox_loss, discrete_time_edges, nll_loss, survival_from_logits, time_to_bin

REF = json.loads((Path(__file__).parent / "data" / "cox_reference.json").read_text())


def _rossi():
    from lifelines.datasets import load_rossi

    d = load_rossi()
    x = torch.tensor(d[REF["covariates"]].to_numpy(float))
    return d, x, torch.tensor(d.arrest.to_numpy(bool)), torch.tensor(d.week.to_numpy(float))


@pytest.mark.parametrize("case", ["efron", "efron_strata_race"])
def test_cox_loss_equals_lifelines_log_likelihood_with_ties(case):
    """At lifelines' fitted coefficients, -loss x events equals lifelines' partial log-likelihood."""
    d, x, event, time = _rossi()
    beta = torch.tensor(REF[case]["beta"], dtype=torch.float64)
    strata = torch.tensor(d.race.to_numpy()) if "strata" in case else None
    loss = cox_loss(x @ beta, event, time, strata, ties="efron")
    # rel 1e-6: torchsurv accumulates in float32 even for float64 log_hz
    assert -float(loss) * int(event.sum()) == pytest.approx(REF[case]["log_likelihood"], rel=1e-6)


@pytest.mark.parametrize(("case", "ties"), [("efron", "efron"), ("efron_strata_race", "efron"), ("breslow", "breslow")])
def test_cox_loss_is_stationary_at_the_reference_fit(case, ties):
    """lifelines (Efron) and scikit-survival (Breslow) optima are optima of our loss: zero gradient."""
    d, x, event, time = _rossi()
    beta = torch.tensor(REF[case]["beta"], dtype=torch.float64, requires_grad=True)
    strata = torch.tensor(d.race.to_numpy()) if "strata" in case else None
    cox_loss(x @ beta, event, time, strata, ties=ties).backward()
    assert beta.grad is not None and beta.grad.abs().max() < 1e-5
    if ties == "breslow":  # and the two tie rules really differ on these data
        other = torch.tensor(REF["efron"]["beta"], dtype=torch.float64, requires_grad=True)
        cox_loss(x @ other, event, time, ties="breslow").backward()
        assert other.grad is not None and other.grad.abs().max() > 1e-4


def _person_period(event: np.ndarray, y: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Discrete-time hazards as logistic regression: one row per patient and bin at risk."""
    targets, probs = [], []
    for e, k, lg in zip(event, y, logits, strict=True):
        for j in range(k + 1):
            targets.append(1 if (e and j == k) else 0)
            probs.append(1 / (1 + np.exp(-lg[j])))
    return np.array(targets), np.array(probs)


def test_nll_equals_person_period_logistic_log_loss():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    b, k = 40, 5
    logits = rng.normal(size=(b, k)) * 2
    event = rng.random(b) < 0.5
    y = rng.integers(0, k, b)
    got = nll_loss(torch.tensor(logits), torch.tensor(event), torch.tensor(y))
    targets, probs = _person_period(event, y, logits)
    ref = log_loss(targets, probs, normalize=False, labels=[0, 1]) / b
    assert float(got) == pytest.approx(ref, rel=1e-9)


def test_nll_alpha_weights_uncensored_terms():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(12, 4)))
    event = torch.tensor(rng.random(12) < 0.5)
    y = torch.tensor(rng.integers(0, 4, 12))
    full = nll_loss(logits, event, y, 0.0)
    only_unc = nll_loss(logits, event, y, 1.0)
    ref_unc = nll_loss(logits[event], event[event], y[event]) * event.sum() / len(event)
    torch.testing.assert_close(only_unc, ref_unc)
    torch.testing.assert_close(nll_loss(logits, event, y, 0.3), 0.7 * full + 0.3 * only_unc)
    with pytest.raises(ValueError, match="alpha"):
        nll_loss(logits, event, y, 1.5)


def test_nll_without_events_still_trains_and_extreme_logits_stay_finite():
    logits = torch.tensor([[50.0, -50.0, 0.0], [-80.0, 80.0, 3.0]], requires_grad=True)
    loss = nll_loss(logits, torch.zeros(2, dtype=torch.bool), torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_survival_is_cumprod_of_one_minus_hazard_and_risk_orders_patients():
    logits = torch.tensor([[-2.0, -1.0, 0.0], [0.0, 1.0, 2.0]])
    hz, s, risk = survival_from_logits(logits)
    torch.testing.assert_close(s, torch.cumprod(1 - torch.sigmoid(logits), dim=1))
    torch.testing.assert_close(hz, torch.sigmoid(logits))
    assert torch.all(s[:, 1:] <= s[:, :-1]) and risk[1] > risk[0]


def test_bins_are_event_time_quantiles_and_times_map_to_bins():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 100.0])
    event = torch.tensor([True, True, True, True, False, True, True, True, False])
    edges = discrete_time_edges(time, event, 2)
    # the median of the 7 event times read off their histogram on 100 bins of [0, 100] (4 of them lie below
    # [4, 5), whose middle is the median); the last edge is the grid's end, nice_ceiling(max(time)) = 100
    assert edges.tolist() == [0.0, 4.5, 100.0]
    assert time_to_bin(torch.tensor([0.5, 4.5, 4.51, 100.0, 500.0]), edges).tolist() == [0, 0, 1, 1, 1]
    assert time_to_bin(time, discrete_time_edges(time, event, 1)).eq(0).all()
    with pytest.raises(ValueError, match="all 9 training patients are censored"):
        discrete_time_edges(time, torch.zeros(9, dtype=torch.bool), 4)


def test_cox_policy_single_patient_and_no_event_batches_are_zero():
    for event in ([False, False, False], [True]):
        lh = torch.randn(len(event), requires_grad=True)
        loss = cox_loss(lh, torch.tensor(event), torch.arange(1.0, len(event) + 1))
        loss.backward()
        assert float(loss.detach()) == 0.0 and lh.grad is not None and torch.all(lh.grad == 0)


def test_memory_bank_is_plain_cox_on_the_union():
    g = torch.Generator().manual_seed(0)
    bank = CoxMemoryBank(size=5)
    lh1, e1, t1 = torch.randn(4, generator=g), torch.tensor([1, 0, 1, 0]).bool(), torch.tensor([3.0, 5, 2, 8])
    first = bank.loss(lh1, e1, t1, index=torch.arange(4))
    torch.testing.assert_close(first, cox_loss(lh1, e1, t1))  # empty bank: the batch alone
    lh2 = torch.randn(2, generator=g, requires_grad=True)
    e2, t2 = torch.tensor([True, False]), torch.tensor([4.0, 6.0])
    loss = bank.loss(lh2, e2, t2, index=torch.tensor([10, 11]))
    ref = cox_loss(torch.cat([lh2, lh1]), torch.cat([e2, e1]), torch.cat([t2, t1]))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert lh2.grad is not None and torch.all(lh2.grad != 0)
    assert len(bank) == 5 and bank.index.tolist() == [1, 2, 3, 10, 11]  # the oldest entry dropped


def test_memory_bank_gives_batch_size_one_a_risk_set_and_skips_duplicates():
    bank = CoxMemoryBank(size=8)
    bank.loss(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1, 0]).bool(), torch.tensor([1.0, 2, 3]), None,
              torch.tensor([0, 1, 2]))  # fmt: skip
    lh = torch.zeros(1, requires_grad=True)
    loss = bank.loss(lh, torch.tensor([True]), torch.tensor([2.5]), None, torch.tensor([7]))
    loss.backward()
    assert float(loss.detach()) > 0 and lh.grad is not None and lh.grad.abs().sum() > 0  # alone it would be 0
    # the same patient seen again is not its own competitor from the bank
    before = bank.index.tolist()
    again = bank.loss(torch.zeros(1), torch.tensor([True]), torch.tensor([2.5]), None, torch.tensor([7]), update=False)
    ref = cox_loss(torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.tensor([1, 1, 1, 0]).bool(), torch.tensor([2.5, 1, 2, 3]))
    torch.testing.assert_close(again, ref)
    assert bank.index.tolist() == before
    assert len(CoxMemoryBank(0).loss(torch.zeros(2), torch.tensor([1, 1]).bool(), torch.ones(2)).shape) == 0
    with pytest.raises(ValueError, match="memory bank size"):
        CoxMemoryBank(-1)
