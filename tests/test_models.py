from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import GatedAttentionMIL, build_model, cox_loss


@pytest.mark.parametrize("mean_term", [False, True])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_mil_permutation_invariant(mean_term, n, seed):
    g = torch.Generator().manual_seed(seed)
    mil = GatedAttentionMIL(8, 16, dropout=0.0, mean_term=mean_term).eval()
    x = torch.randn(2, n, 8, generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    perm = torch.randperm(n, generator=g)
    z1, a1 = mil(x, mask)
    z2, a2 = mil(x[:, perm], mask)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1[:, perm], a2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mean_term", [False, True])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 10), pad=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_mil_padding_changes_nothing(mean_term, n, pad, seed):
    g = torch.Generator().manual_seed(seed)
    mil = GatedAttentionMIL(8, 16, dropout=0.0, mean_term=mean_term).eval()
    x = torch.randn(1, n, 8, generator=g)
    junk = 1e3 * torch.randn(1, pad, 8, generator=g)  # padding with garbage must not leak in
    xp = torch.cat([x, junk], dim=1)
    mp = torch.cat([torch.ones(1, n, dtype=torch.bool), torch.zeros(1, pad, dtype=torch.bool)], dim=1)
    z1, a1 = mil(x, torch.ones(1, n, dtype=torch.bool))
    z2, a2 = mil(xp, mp)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)
    assert torch.all(a2[:, n:] == 0) and torch.allclose(a2.sum(1), torch.ones(1))


def test_mean_term_adds_the_mean_of_the_valid_tile_embeddings():
    torch.manual_seed(0)
    plain = GatedAttentionMIL(4, 8, dropout=0.0).eval()
    with_mean = GatedAttentionMIL(4, 8, dropout=0.0, mean_term=True).eval()
    with_mean.load_state_dict(plain.state_dict())  # same parameters: the term adds none
    x, mask = torch.randn(1, 3, 4), torch.tensor([[True, True, False]])
    (z0, a0), (z1, a1) = plain(x, mask), with_mean(x, mask)
    torch.testing.assert_close(z1 - z0, plain.embed(x[:, :2]).mean(1))
    torch.testing.assert_close(a0, a1)


@pytest.mark.parametrize("mean_term", [False, True])
def test_empty_bag_is_zero_and_masked_in_fusion(mean_term):
    mil = GatedAttentionMIL(4, 8, dropout=0.0, mean_term=mean_term)
    z, a = mil(torch.randn(2, 3, 4), torch.tensor([[True, True, False], [False, False, False]]))
    assert torch.all(z[1] == 0) and torch.all(a[1] == 0) and torch.isfinite(z).all()
    m = build_model(4, 5, 0, dropout=0.0).eval()
    feats = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    om = torch.randn(2, 5)
    out1 = m(feats, mask, om, torch.ones(2, dtype=torch.bool)).log_hz
    out2 = m(
        feats * 7, mask * torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool), om, torch.ones(2, dtype=torch.bool)
    ).log_hz
    assert out1[1] == out2[1]  # the empty bag's garbage features never matter


@pytest.mark.parametrize("dims", [(16, 10, 3), (16, 0, 0), (0, 10, 0), (0, 0, 3), (16, 10, 0)])
def test_every_trainable_parameter_gets_a_gradient(dims):
    torch.manual_seed(0)
    d, g, c = dims
    m = build_model(d, g, c, hidden=16, omics_hidden=8, clinical_hidden=4)
    b = 6
    kw = {}
    if d:
        kw |= {"features": torch.randn(b, 5, d), "mask": torch.ones(b, 5, dtype=torch.bool)}
    if g:
        kw |= {"omics": torch.randn(b, g), "omics_mask": torch.ones(b, dtype=torch.bool)}
    if c:
        kw |= {"clinical": torch.randn(b, c), "clinical_mask": torch.ones(b, dtype=torch.bool)}
    out = m(**kw)
    loss = cox_loss(out.log_hz, torch.tensor([1, 0, 1, 1, 0, 1]), torch.arange(1.0, 7.0))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_model_needs_a_modality():
    with pytest.raises(ValueError, match="at least one modality"):
        build_model(0, 0, 0)


def _statsmodels_loglike(time, event, x, beta, strata, ties):
    from statsmodels.duration.hazard_regression import PHReg

    m = PHReg(time, x[:, None], status=event.astype(int), strata=strata, ties=ties)
    return m.loglike(np.array([beta]))


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("stratified", [False, True])
def test_cox_loss_matches_statsmodels(ties, stratified):
    rng = np.random.default_rng(1)
    n = 40
    time = rng.integers(1, 8, n).astype(float)  # many ties
    event = rng.random(n) < 0.6
    x = rng.normal(size=n)
    beta = 0.7
    strata = rng.integers(0, 3, n) if stratified else None
    ref = -_statsmodels_loglike(time, event, x, beta, strata, ties) / event.sum()
    got = cox_loss(
        torch.tensor(x * beta),
        torch.tensor(event),
        torch.tensor(time),
        None if strata is None else torch.tensor(strata),
        ties,
    )
    assert float(got) == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_cox_loss_without_events_is_zero_with_gradient():
    lh = torch.randn(5, requires_grad=True)
    loss = cox_loss(lh, torch.zeros(5, dtype=torch.bool), torch.arange(5.0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(lh.grad == 0)


def _skip_inputs(b: int = 6, d: int = 8, g: int = 5, c: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 4, dtype=torch.bool)
    mask[0, 2:] = False  # padding
    mask[1] = False  # an empty bag
    return {
        "features": torch.randn(b, 4, d, generator=gen),
        "mask": mask,
        "omics": torch.randn(b, g, generator=gen),
        "omics_mask": torch.tensor([True, True, False, True, True, True])[:b],
        "clinical": torch.randn(b, c, generator=gen),
        "clinical_mask": torch.ones(b, dtype=torch.bool),
    }


def test_linear_skip_with_the_gate_at_zero_is_exactly_a_linear_cox_model():
    torch.manual_seed(0)
    m = build_model(8, 5, 3, skip="linear", hidden=16, omics_hidden=8, clinical_hidden=4, dropout=0.0).eval()
    x = _skip_inputs()
    assert torch.all(m(**x).log_hz == 0)  # skip weights and the gate start at 0: the null model
    mean, scale = torch.randn(8), torch.rand(8) + 0.5
    m.skip.set_slide_norm(mean, scale)
    ws, wg, wc = torch.randn(1, 8), torch.randn(1, 5), torch.randn(1, 3)
    with torch.no_grad():
        m.skip.slide.weight.copy_(ws), m.skip.omics.weight.copy_(wg), m.skip.clinical.weight.copy_(wc)
    w = x["mask"].float()
    pooled = (w.unsqueeze(-1) * x["features"]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    z = ((pooled - mean) / scale).masked_fill(~x["mask"].any(1, keepdim=True), 0.0)
    om = x["omics"].masked_fill(~x["omics_mask"].unsqueeze(1), 0.0)
    want = (z @ ws.T / 8**0.5 + om @ wg.T / 5**0.5 + x["clinical"] @ wc.T / 3**0.5).squeeze(1)
    torch.testing.assert_close(m(**x).log_hz, want)
    with torch.no_grad():  # the residual branch has no say while the gate is 0 ...
        for name, p in m.named_parameters():
            if not name.startswith(("skip.", "residual_gate")):
                p.add_(torch.randn_like(p))
    torch.testing.assert_close(m(**x).log_hz, want)
    with torch.no_grad():  # ... and adds its output, scaled, once the gate opens
        m.residual_gate.fill_(0.5)
    assert not torch.allclose(m(**x).log_hz, want)


@pytest.mark.parametrize("dims", [(8, 5, 3), (8, 0, 0), (0, 5, 3)])
def test_linear_skip_every_parameter_gets_a_gradient_and_the_gate_one_at_zero(dims):
    torch.manual_seed(0)
    d, g, c = dims
    m = build_model(d, g, c, skip="linear", hidden=16, omics_hidden=8, clinical_hidden=4, dropout=0.0)
    x = {k: v for k, v in _skip_inputs().items() if (d or k not in ("features", "mask"))}
    x = {k: v for k, v in x.items() if (g or not k.startswith("omics")) and (c or not k.startswith("clinical"))}
    x["mask"] = torch.ones(6, 4, dtype=torch.bool) if d else None
    event, time = torch.tensor([1, 0, 1, 1, 0, 1]), torch.arange(1.0, 7.0)
    cox_loss(m(**x).log_hz, event, time).backward()
    assert float(m.residual_gate.grad.abs()) > 0  # at init only the gate and the skip term move
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if n.startswith("skip."))
    m.zero_grad()
    with torch.no_grad():
        m.residual_gate.fill_(0.5)
    cox_loss(m(**x).log_hz, event, time).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_linear_skip_rejects_bad_names_and_norms():
    with pytest.raises(ValueError, match="unknown skip 'ridge'.*'none', 'linear'"):
        build_model(8, 5, 0, skip="ridge")
    m = build_model(8, 5, 0, skip="linear")
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        m.skip.set_slide_norm(torch.zeros(7), torch.ones(7))
    with pytest.raises(ValueError, match="scale must be > 0"):
        m.skip.set_slide_norm(torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="no slide part"):
        build_model(0, 5, 0, skip="linear").skip.set_slide_norm(torch.zeros(0), torch.ones(0))
